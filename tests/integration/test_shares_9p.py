"""Shared host folders through QEMU's own 9p server (``via = "9p"``), booted for real:
the test guest's cloud kernel has no 9p, so this module boots its --9p flavour (Debian's
generic kernel of the same version and its 9p modules; scripts/build-test-guest builds
it on first use, then takes it from its cache). One VM with a read-write and a read-only
9p share serves every check, each read back from the guest through its agent and from
the host's own files.
"""

from __future__ import annotations

import contextlib
import os
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from framework.harness import GUEST_DIR, QVM_BIN, Qvm, build_test_guest, owned_qvm
from framework.jsonschema_lite import validate
from framework.wait import wait_until

pytestmark = pytest.mark.integration

SECRET = "host-secret-outside-the-share"


@pytest.fixture(scope="module")
def vm() -> Iterator[Qvm]:
    """vm9 with /mnt/data (9p, read-write, holding links that point out of it) and
    /mnt/ro (9p, read-only), both mounted by the guest; killed after the module."""
    guest_dir = build_test_guest("--9p")
    with owned_qvm() as harness:
        root = harness.root
        for folder in ("data", "ro", "outside"):
            (root / folder).mkdir()
        (root / "secret.txt").write_text(SECRET)
        (root / "outside" / "secret.txt").write_text(SECRET)
        (root / "data" / "escape").symlink_to(root / "secret.txt")
        (root / "data" / "escape-relative").symlink_to("../secret.txt")
        (root / "data" / "escape-folder").symlink_to(root / "outside")
        (root / "data" / "from-host.txt").write_text("written by the host\n")
        (root / "ro" / "keep.txt").write_text("read-only\n")
        shares = "".join(
            f'[[share]]\nhost = "{root}/{folder}"\nguest = "/mnt/{folder}"\nvia = "9p"\n'
            f"readonly = {str(folder == 'ro').lower()}\n"
            for folder in ("data", "ro")
        )
        harness.guest_machine("vm9", max=1, extra=shares, guest_dir=guest_dir)
        with mounted_inside(root / "data"):
            harness("up", "vm9")
            harness("wait", "vm9", "--for", "agent", "--timeout", "120")
            wait_until(lambda: all_mounted(harness), 30, "the guest to mount the 9p shares")
            yield harness


@contextlib.contextmanager
def mounted_inside(folder: Path) -> Iterator[None]:
    """As root, two fresh tmpfs at FOLDER/t1 and FOLDER/t2, each holding a file x (the
    same inode number on both); lazily unmounted at the end (QEMU may still hold them).
    Where they cannot be mounted, nothing is."""
    if os.geteuid() != 0:
        yield
        return
    mounts = [folder / "t1", folder / "t2"]
    try:
        for mount in mounts:
            mount.mkdir()
            argv = ["mount", "-t", "tmpfs", "-o", "size=1m", "qvm-test", str(mount)]
            if subprocess.run(argv, check=False, capture_output=True).returncode == 0:
                (mount / "x").write_text(mount.name)
        yield
    finally:
        for mount in mounts:
            subprocess.run(["umount", "-l", mount], check=False, capture_output=True)


def shares(qvm: Qvm) -> list[dict[str, Any]]:
    listed = qvm.json("share", "list", "vm9")
    validate(listed, "share-list.json")
    return listed["shares"]  # type: ignore[no-any-return]


def all_mounted(qvm: Qvm) -> bool:
    return all(share["mount"] == "mounted" for share in shares(qvm))


def guest(qvm: Qvm, script: str, check: bool = True, name: str = "vm9") -> str:
    done = qvm("exec", name, "--", "sh", "-c", script, check=check)
    return done.stdout + done.stderr


def guest_mount(qvm: Qvm, path: str) -> list[str]:
    """The guest's own /proc/mounts line of ``path``, split."""
    for line in guest(qvm, "cat /proc/mounts").splitlines():
        if line.split()[1] == path:
            return line.split()
    raise AssertionError(f"{path} is not mounted in the guest")


def test_the_guest_mounts_the_9p_shares_and_files_go_both_ways(vm: Qvm) -> None:
    listed = {share["guest"]: share for share in shares(vm)}
    assert {path: (s["via"], s["readonly"], s["daemon_pid"]) for path, s in listed.items()} == {
        "/mnt/data": ("9p", False, None),  # QEMU serves it: no daemon
        "/mnt/ro": ("9p", True, None),
    }
    tag, _, fstype, options, *_ = guest_mount(vm, "/mnt/data")
    assert (tag, fstype) == ("fs0", "9p")
    assert {"rw", "trans=virtio", "msize=512000"} <= set(options.split(","))
    assert guest(vm, "cat /mnt/data/from-host.txt") == "written by the host\n"
    guest(vm, "echo written by the guest > /mnt/data/from-guest.txt")
    assert (vm.root / "data" / "from-guest.txt").read_text() == "written by the guest\n"
    # a change on the host is seen at once (no cache in the guest)
    (vm.root / "data" / "from-host.txt").write_text("changed by the host\n")
    assert guest(vm, "cat /mnt/data/from-host.txt") == "changed by the host\n"


def test_files_of_two_host_file_systems_keep_apart_in_the_guest(vm: Qvm) -> None:
    if not all((vm.root / "data" / t / "x").exists() for t in ("t1", "t2")):
        pytest.skip("two tmpfs could not be mounted in the share (that needs root)")
    host = {(vm.root / "data" / t / "x").stat().st_ino for t in ("t1", "t2")}
    assert len(host) == 1  # the same inode number on the host, on two devices
    said = guest(vm, "stat -c %i /mnt/data/t1/x /mnt/data/t2/x; cat /mnt/data/t1/x /mnt/data/t2/x")
    first, second, text = said.split("\n", 2)
    assert first != second and text == "t1t2", said  # multidevs=remap
    log = (vm.run_dir("vm9") / "qemu.log").read_text()
    assert "Multiple devices detected" not in log


def test_a_readonly_9p_share_refuses_writes_in_qemu(vm: Qvm) -> None:
    tag, _, fstype, options, *_ = guest_mount(vm, "/mnt/ro")
    assert (tag, fstype, options.split(",")[0]) == ("fs1", "9p", "ro")
    assert "Read-only file system" in guest(vm, "echo x > /mnt/ro/new.txt", check=False)
    # the guest's own read-only mount is not what stops it: remounted read-write in the
    # guest, the writes still fail, refused by QEMU (-fsdev readonly=on)
    guest(vm, "mount -o remount,rw /mnt/ro")
    assert guest_mount(vm, "/mnt/ro")[3].split(",")[0] == "rw"
    said = guest(
        vm, "echo x > /mnt/ro/new.txt; echo y >> /mnt/ro/keep.txt; rm /mnt/ro/keep.txt", check=False
    )
    assert said.count("Read-only file system") == 3, said
    assert sorted(p.name for p in (vm.root / "ro").iterdir()) == ["keep.txt"]
    assert (vm.root / "ro" / "keep.txt").read_text() == "read-only\n"


def test_the_guest_cannot_reach_outside_the_9p_folder(vm: Qvm) -> None:
    # the host's symlinks are read as links, whose targets the guest resolves in its own
    # tree: QEMU never follows them on the host
    said = guest(vm, "readlink /mnt/data/escape; readlink /mnt/data/escape-relative")
    assert said.split() == [str(vm.root / "secret.txt"), "../secret.txt"]
    said = guest(
        vm,
        "cat /mnt/data/escape; cat /mnt/data/escape-relative; ls /mnt/data/escape-folder/;"
        " cat /mnt/data/escape-folder/secret.txt",
        check=False,
    )
    assert SECRET not in said and "No such file or directory" in said
    # nor does a write through them reach the host's file
    guest(
        vm,
        "echo overwritten > /mnt/data/escape; echo overwritten > /mnt/data/escape-relative",
        check=False,
    )
    assert (vm.root / "secret.txt").read_text() == SECRET
    # `..` from the share's top, or from a folder in it, stays in the guest's tree
    guest(vm, "mkdir -p /mnt/data/sub")
    said = guest(
        vm,
        "ls -a /mnt/data/..; cat /mnt/data/../secret.txt /mnt/data/sub/../../secret.txt",
        check=False,
    )
    assert SECRET not in said and "outside" not in said


def test_snapshot_save_is_refused_and_qemu_says_the_9p_mount_blocks_it(vm: Qvm) -> None:
    done = vm("snapshot", "save", "vm9", "t1", check=False)
    assert done.returncode == 1 and "share fs0 (" in done.stderr, done.stderr
    # QEMU's own word: a 9p export mounted in the guest blocks migration (and savevm)
    reasons = vm.json("qmp", "vm9", "query-migrate").get("blocked-reasons", [])
    assert any("VirtFS export path" in reason and "'fs0'" in reason for reason in reasons), reasons
    assert vm.status("vm9")["state"] == "running"
    assert "from-host.txt" in guest(vm, "ls /mnt/data").split()


def test_a_guest_kernel_without_9p_fails_the_mount_and_share_list_says_why(qvm: Qvm) -> None:
    # the default test guest: Debian's cloud kernel, which has no 9p
    (qvm.root / "data").mkdir()
    share = f'[[share]]\nhost = "{qvm.root}/data"\nguest = "/mnt/data"\nvia = "9p"\n'
    qvm.guest_machine("cloud9", max=1, extra=share, guest_dir=GUEST_DIR)
    qvm("up", "cloud9")
    qvm("wait", "cloud9", "--for", "agent", "--timeout", "120")
    failed = wait_until(
        lambda: [
            s for s in qvm.json("share", "list", "cloud9")["shares"] if s["mount"] == "failed"
        ],
        30,
        "the guest's mount of the 9p share to fail",
    )
    said = failed[0]["mount_error"]
    assert "mounting fs0 on /mnt/data failed: No such device" in said  # the guest's word
    assert "the guest kernel has no 9p" in said and 'via = "virtiofs"' in said
    listed = qvm("share", "list", "cloud9").stdout
    assert "failed: exit status" in listed and "has no 9p" in listed


NOBODY = 65534


def test_run_as_a_user_the_guest_has_that_users_rights_in_the_folder() -> None:
    """What 9p is for: qvm run by a user other than root (security_model=none)."""
    if os.geteuid() != 0:
        pytest.skip("becoming another user needs root")
    guest_dir = build_test_guest("--9p")
    with owned_qvm() as harness:
        harness.user = NOBODY
        (harness.root / "data").mkdir()
        share = f'[[share]]\nhost = "{harness.root}/data"\nguest = "/mnt/data"\nvia = "9p"\n'
        harness.guest_machine("vmu", max=1, extra=share, guest_dir=guest_dir)
        subprocess.run(["chown", "-R", f"{NOBODY}:{NOBODY}", harness.root], check=True)
        reach = [*harness.as_user(), "test", "-x", str(QVM_BIN), "-a", "-r", f"{guest_dir}/vmlinuz"]
        if subprocess.run(reach, check=False).returncode != 0:
            pytest.skip(f"uid {NOBODY} cannot reach qvm or the 9p test guest in this checkout")
        harness("up", "vmu")
        harness("wait", "vmu", "--for", "agent", "--timeout", "120")
        wait_until(
            lambda: harness.json("share", "list", "vmu")["shares"][0]["mount"] == "mounted",
            30,
            "the guest to mount the 9p share",
        )
        said = guest(
            harness,
            "id -u; echo hi > /mnt/data/f; chown 0:0 /mnt/data/f; chmod 4755 /mnt/data/f",
            check=False,
            name="vmu",
        )
        assert said.startswith("0\n")  # the guest's root...
        assert "Operation not permitted" in said  # ...cannot give a host file to root
        made = (harness.root / "data" / "f").stat()
        assert (made.st_uid, made.st_gid) == (NOBODY, NOBODY)
        assert made.st_mode & 0o4000  # setuid, but to nobody: no more than the user has
