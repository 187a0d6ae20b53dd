"""Shared host folders with the real QEMU, the real virtiofsd and the test guest (its
virtiofs.ko): one VM with a read-write and a read-only [[share]] serves every check,
each read back from the guest through its agent and from the host's own files.
"""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from framework.harness import GUEST_DIR, Qvm, one_line_error, owned_qvm
from framework.jsonschema_lite import validate
from framework.wait import wait_until

pytestmark = pytest.mark.integration

SECRET = "host-secret-outside-the-share"


@pytest.fixture(scope="module")
def vm() -> Iterator[Qvm]:
    """vm1 with /mnt/data (read-write, holding a symlink that points out of it) and
    /mnt/ro (read-only), both mounted by the guest; killed after the module."""
    if not (GUEST_DIR / "vmlinuz").exists():
        pytest.fail(f"no test guest in {GUEST_DIR} (run scripts/build-test-guest)")
    with owned_qvm() as harness:
        _boot(harness)
        yield harness


def _boot(harness: Qvm) -> None:
    for folder in ("data", "ro", "live"):
        (harness.root / folder).mkdir()
    (harness.root / "secret.txt").write_text(SECRET)
    (harness.root / "data" / "escape").symlink_to(harness.root / "secret.txt")
    (harness.root / "data" / "from-host.txt").write_text("written by the host\n")
    (harness.root / "ro" / "keep.txt").write_text("read-only\n")
    harness.machine(
        "vm1",
        f"""
[memory]
size = "256M"
max = "512M"
slots = 1

[boot]
kernel = "{{guest}}/vmlinuz"
initrd = "{{guest}}/initrd.img"
append = "console=ttyS0 quiet irqaffinity=0 no_timer_check"

[[share]]
host = "{harness.root}/data"
guest = "/mnt/data"

[[share]]
host = "{harness.root}/ro"
guest = "/mnt/ro"
readonly = true
""",
    )
    harness("up", "vm1")
    harness("wait", "vm1", "--for", "agent", "--timeout", "120")
    wait_until(lambda: all_mounted(harness), 30, "the guest to mount the boot shares")


def checked(qvm: Qvm, schema: str, *args: str) -> Any:
    """``qvm ARGS --json``: exit 0, and its output matches ``schema``."""
    data = qvm.json(*args, "--json")
    validate(data, schema)
    return data


def shares(qvm: Qvm) -> list[dict[str, Any]]:
    return checked(qvm, "share-list.json", "share", "list", "vm1")["shares"]  # type: ignore[no-any-return]


def all_mounted(qvm: Qvm) -> bool:
    return all(share["mount"] == "mounted" for share in shares(qvm))


def guest(qvm: Qvm, script: str, check: bool = True) -> str:
    done = qvm("exec", "vm1", "--", "sh", "-c", script, check=check)
    return done.stdout + done.stderr


def guest_mounts(qvm: Qvm) -> str:
    return guest(qvm, "cat /proc/mounts")


def test_boot_shares_are_mounted_by_the_guest_and_carry_files_both_ways(vm: Qvm) -> None:
    listed = {share["guest"]: share for share in shares(vm)}
    assert set(listed) == {"/mnt/data", "/mnt/ro"}
    assert listed["/mnt/ro"]["readonly"] is True
    mounts = guest_mounts(vm)
    assert "fs0 /mnt/data virtiofs rw" in mounts
    assert "fs1 /mnt/ro virtiofs ro" in mounts
    assert guest(vm, "cat /mnt/data/from-host.txt") == "written by the host\n"
    guest(vm, "echo written by the guest > /mnt/data/from-guest.txt")
    assert (vm.root / "data" / "from-guest.txt").read_text() == "written by the guest\n"


def test_a_readonly_share_refuses_writes_on_the_host_side(vm: Qvm) -> None:
    assert "Read-only file system" in guest(vm, "echo x > /mnt/ro/new.txt", check=False)
    # the guest's own read-only mount is not what stops it: remounted read-write in the
    # guest, the write still fails, refused by the host's kernel under virtiofsd
    guest(vm, "mount -o remount,rw /mnt/ro")
    assert "fs1 /mnt/ro virtiofs rw" in guest_mounts(vm)
    said = guest(vm, "echo x > /mnt/ro/new.txt; echo y >> /mnt/ro/keep.txt", check=False)
    assert said.count("Read-only file system") == 2, said
    assert sorted(p.name for p in (vm.root / "ro").iterdir()) == ["keep.txt"]
    assert (vm.root / "ro" / "keep.txt").read_text() == "read-only\n"


def test_the_guest_cannot_reach_outside_the_folder(vm: Qvm) -> None:
    # the symlink's target is a host path: the guest resolves it in its own tree
    said = guest(vm, "readlink /mnt/data/escape; cat /mnt/data/escape", check=False)
    assert str(vm.root / "secret.txt") in said
    assert SECRET not in said
    said = guest(vm, "ls -a /mnt/data/..; cat /mnt/data/../../secret.txt", check=False)
    assert SECRET not in said


def test_share_add_and_del_on_the_running_vm(vm: Qvm) -> None:
    (vm.root / "live" / "big.txt").write_text("live share\n")
    added = checked(vm, "share-add.json", "share", "add", "vm1", str(vm.root / "live"), "/mnt/live")
    share = added["share"]
    assert (share["origin"], share["mount"], share["guest"]) == ("qvm", "mounted", "/mnt/live")
    daemon = int(share["daemon_pid"])
    assert Path(f"/proc/{daemon}").exists()
    assert guest(vm, "cat /mnt/live/big.txt") == "live share\n"
    guest(vm, "echo back > /mnt/live/back.txt")
    assert (vm.root / "live" / "back.txt").read_text() == "back\n"
    again = vm("share", "add", "vm1", str(vm.root / "live"), "/mnt/live", check=False)
    assert again.returncode == 1 and "already a share" in one_line_error(again)

    # busy: a process with its working folder in the share holds the mount
    guest(vm, "cd /mnt/live && exec sleep 60 </dev/null >/dev/null 2>&1 &")
    busy = vm("share", "del", "vm1", "/mnt/live", check=False)
    message = one_line_error(busy)
    assert busy.returncode == 1 and "in use in the guest" in message and "sleep" in message
    assert "/mnt/live" in guest_mounts(vm)
    guest(vm, "kill $(pidof sleep)")

    removed = checked(vm, "share-del.json", "share", "del", "vm1", "/mnt/live")
    assert removed["outcome"] == "removed"
    assert "/mnt/live" not in guest_mounts(vm)
    wait_until(lambda: not Path(f"/proc/{daemon}").exists(), 5, "virtiofsd to end")
    assert [s["guest"] for s in shares(vm)] == ["/mnt/data", "/mnt/ro"]
    boot = vm("share", "del", "vm1", "/mnt/data", check=False)
    assert boot.returncode == 1 and "is a boot share" in one_line_error(boot)


@pytest.mark.parametrize(
    ("args", "expected"),
    [
        (["/nonexistent-qvm", "/mnt/x"], "HOST: folder not found"),
        (["{root}/secret.txt", "/mnt/x"], "HOST: is not a folder"),
        (["{root}/live", "mnt/x"], "GUEST must be an absolute path"),
        (["{root}/live", "/mnt/x", "--via", "9p"], "QEMU has no 9p hotplug"),
    ],
)
def test_share_add_refuses_bad_input_with_exit_2(vm: Qvm, args: list[str], expected: str) -> None:
    done = vm("share", "add", "vm1", *(a.format(root=vm.root) for a in args), check=False)
    assert done.returncode == 2
    assert expected in one_line_error(done)


def test_snapshot_save_is_refused_naming_the_share_and_the_way_out(vm: Qvm) -> None:
    started = time.monotonic()
    done = vm("snapshot", "save", "vm1", "t1", "--json", check=False)
    assert done.returncode == 1
    error = json.loads(done.stdout)["error"]
    assert "share fs0 (" in error and "/mnt/data" in error
    assert "remove the [[share]]" in error and "qvm restart vm1" in error
    assert time.monotonic() - started < 10
    assert vm.status("vm1")["state"] == "running"
    assert guest(vm, "cat /mnt/data/from-host.txt") == "written by the host\n"


def test_a_dimm_added_to_a_vm_with_shared_memory_is_shared_too(vm: Qvm) -> None:
    before = int(vm.serial("vm1").guest().latest_state["mem_kb"])  # type: ignore[index]
    added = vm.json("mem", "add", "vm1", "128M", "--json")
    backend = added["device"]["backend"]
    path = f"/objects/{backend}"
    kind = vm.json("qmp", "vm1", "qom-get", f"path={path}", "property=type")
    shared = vm.json("qmp", "vm1", "qom-get", f"path={path}", "property=share")
    assert (kind, shared) == ("memory-backend-memfd", True)
    # the guest onlines it, and virtiofs goes on working
    vm.serial("vm1").wait_for(rf"QVM-STATE .*mem_kb=(?!{before}\b)\d+", 30)
    assert guest(vm, "cat /mnt/data/from-host.txt") == "written by the host\n"


def test_a_guest_rebooted_from_inside_mounts_its_shares_again(vm: Qvm) -> None:
    """Last in this module: the guest's mounts go with a reboot; its supervisor has the
    new boot's agent mount every share again."""
    before = guest(vm, "cat /proc/sys/kernel/random/boot_id").strip()
    # in the background: the agent's guest-exec must return before the guest goes
    guest(vm, "(sleep 1; reboot -f) >/dev/null 2>&1 </dev/null &")
    wait_until(lambda: not all_mounted(vm), 30, "share list to say the mounts are gone")
    wait_until(lambda: all_mounted(vm), 90, "the rebooted guest to mount its shares again")
    assert guest(vm, "cat /proc/sys/kernel/random/boot_id").strip() != before
    mounts = guest_mounts(vm)
    assert "fs0 /mnt/data virtiofs rw" in mounts
    assert "fs1 /mnt/ro virtiofs ro" in mounts
    assert guest(vm, "cat /mnt/data/from-host.txt") == "written by the host\n"
