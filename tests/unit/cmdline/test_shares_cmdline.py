"""A machine's shares on QEMU's command line, and the guest's mount commands."""

from __future__ import annotations

from pathlib import Path

from qvm.cmdline.argv import LaunchInputs, build_argv, has_shared_memory
from qvm.cmdline.share_mount import holders_argv, mount_argv, mount_failure, unmount_argv
from qvm.definition.schema import Machine, MemorySpec, ShareSpec
from qvm.layout.rundir import RunDir

RUN = RunDir(Path("/s/vm1"))


def argv_of(machine: Machine) -> list[str]:
    return build_argv(machine, LaunchInputs("tcg", RUN))


def vm(*shares: ShareSpec, shared: bool = False) -> Machine:
    return Machine(
        name="vm1",
        path=Path("/m/vm1.toml"),
        memory=MemorySpec(size=256 * 1024**2, shared=shared),
        shares=shares,
    )


def test_a_virtiofs_share_makes_the_ram_shared_and_connects_to_its_daemon() -> None:
    argv = argv_of(vm(ShareSpec(Path("/h/data"), "/mnt/data")))
    assert "q35,accel=tcg,memory-backend=qvm.ram" in argv
    assert "memory-backend-memfd,id=qvm.ram,size=256M,share=on" in argv
    assert has_shared_memory(argv)
    assert "socket,id=qvm.fs0,path=/s/vm1/share-fs0.sock" in argv
    assert "vhost-user-fs-pci,chardev=qvm.fs0,tag=fs0,id=fs0" in argv


def test_a_9p_share_is_qemus_own_and_readonly_there() -> None:
    argv = argv_of(vm(ShareSpec(Path("/h/a,b"), "/mnt/x", readonly=True, via="9p")))
    assert "local,id=qvm.fs0,path=/h/a,,b,security_model=none,multidevs=remap,readonly=on" in argv
    assert "virtio-9p-pci,fsdev=qvm.fs0,mount_tag=fs0,id=fs0" in argv
    assert not has_shared_memory(argv)  # 9p needs no shared RAM


def test_memory_shared_alone_and_no_shares() -> None:
    assert has_shared_memory(argv_of(vm(shared=True)))
    plain = argv_of(vm())
    assert not has_shared_memory(plain)
    assert not any("memory-backend" in arg for arg in plain)


def test_the_guest_commands_take_paths_as_arguments_never_as_script_text() -> None:
    odd = "/mnt/$(reboot)"
    for argv in (mount_argv("fs0", odd, "virtiofs", True), unmount_argv(odd), holders_argv(odd)):
        assert argv[:2] == ["/bin/sh", "-c"]
        assert odd not in argv[2]
        assert odd in argv[4:]
    assert mount_argv("fs0", "/m", "virtiofs", True)[-2:] == ["virtiofs", "defaults,ro"]


def test_a_mount_the_guest_kernel_cannot_do_says_why_and_the_way_out() -> None:
    # busybox's words on the cloud kernel (no 9p), as the supervisor records them
    said = "exit status 255: mount: mounting fs0 on /mnt/data failed: No such device"
    assert mount_failure("9p", said) == (
        f"{said} (hint: the guest kernel has no 9p, as Debian's cloud kernels: boot one that "
        'has, or use via = "virtiofs")'
    )
    assert 'use via = "9p"' in mount_failure("virtiofs", said)
    other = "exit status 255: mount: mounting fs0 on /mnt/data failed: No such file or directory"
    assert mount_failure("9p", other) == other
