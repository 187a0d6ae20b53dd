"""Commands about several VMs, on real QEMU and the test guest (128 MiB each): six VMs of
a group started at once, one of which QEMU refuses at its start, the five others running
by their guests' own word; then kill, restart and snapshot save of two at once, status
and down of every running VM, every QEMU gone. One scenario, so that the guests boot once.
"""

from __future__ import annotations

import json

import pytest
from framework.harness import GUEST_DIR, Qvm, one_line_error
from framework.jsonschema_lite import validate

pytestmark = pytest.mark.integration

GOOD = ["g1", "g2", "g3", "g4", "g5"]


def group_machine(qvm: Qvm, name: str, kernel: str | None = None) -> None:
    """A test guest of 128 MiB in group "six" (top-level keys come before any table)."""
    path = qvm.guest_machine(name, max=1, memory="128M")
    text = path.read_text()
    if kernel is not None:
        text = text.replace(f"{GUEST_DIR}/vmlinuz", kernel)
    path.write_text('group = "six"\n' + text)


def qemu_pids(qvm: Qvm) -> set[int]:
    return {pid for pid, cmd in qvm.processes() if "qemu-system" in cmd.split()[0]}


def test_six_at_once_one_failing_then_kill_restart_save_status_and_down(qvm: Qvm) -> None:
    for name in GOOD:
        group_machine(qvm, name)
    # the kernel file is there, so every check before QEMU passes; QEMU refuses it
    not_a_kernel = qvm.root / "not-a-kernel"
    not_a_kernel.write_bytes(b"\0" * 4096)
    group_machine(qvm, "bad", kernel=str(not_a_kernel))
    qvm.started.update([*GOOD, "bad"])

    done = qvm("up", "@six", "--json", check=False)
    assert done.returncode == 1, done.stderr
    entries = json.loads(done.stdout)
    validate(entries, "up.json")
    assert [e["name"] for e in entries] == ["bad", *GOOD]  # the group's order, not the finish's
    bad, *started = entries
    assert bad["exit_code"] == 1 and "bad: QEMU failed to start" in bad["error"]
    assert all(e["qmp_ready"] and e["pid"] for e in started)
    assert done.stderr.splitlines()[-1] == "qvm: 1 of 6 failed: bad"
    assert "qvm: bad: QEMU failed to start" in done.stderr

    # the five run, each by its own guest's word
    for name in GOOD:
        assert int(qvm.serial(name).wait_ready(timeout=120)["ncpus"]) == 1
    listed = qvm.json("status", "--all")
    validate(listed, "status.json")
    assert sorted((e["name"], e["state"]) for e in listed) == [(n, "running") for n in GOOD]
    assert len(qemu_pids(qvm)) == 5

    killed = qvm("kill", "g4", "g5")
    assert sorted(killed.stdout.splitlines()) == [
        "g4: killed: QEMU was killed (SIGKILL)",
        "g5: killed: QEMU was killed (SIGKILL)",
    ]
    before = {e["name"]: e["pid"] for e in listed}
    restarted = qvm.json("restart", "g2", "g3", "--force")
    validate(restarted, "restart.json")
    assert [e["name"] for e in restarted] == ["g2", "g3"]
    for entry in restarted:
        assert entry["stopped"]["ended_by"] == "quit"
        assert entry["pid"] != before[entry["name"]] and entry["qmp_ready"]
        qvm.serial(entry["name"]).wait_ready(timeout=120)  # a new boot: the log was rotated

    saved = qvm.json("snapshot", "save", "g1", "g2", "both")
    validate(saved, "snapshot-save.json")
    assert [(e["name"], e["tag"], e["disk_only"]) for e in saved] == [
        ("g1", "both", False),
        ("g2", "both", False),
    ]

    down = qvm("down", "--all")
    assert sorted(down.stdout.splitlines()) == [
        f"{name}: stopped: the guest powered off after the ACPI power button"
        for name in ("g1", "g2", "g3")
    ]
    assert qemu_pids(qvm) == set()
    assert qvm.json("status", "--all") == []
    # none of them runs now: each is its own failure, named in the group's order
    again = qvm("down", "@six", check=False)
    assert again.returncode == 1
    assert again.stderr.splitlines()[-1] == "qvm: 6 of 6 failed: bad, g1, g2, g3, g4, g5"


def test_naming_mistakes_exit_2_before_anything_starts(qvm: Qvm) -> None:
    group_machine(qvm, "g1")
    unknown = qvm("up", "@nosuch", check=False)
    assert unknown.returncode == 2
    assert one_line_error(unknown) == (
        f"qvm: no machine is in group 'nosuch' (looked in: {qvm.machines_dir}, "
        f"{qvm.root / 'config' / 'qvm' / 'machines'}) "
        '(hint: put group = "nosuch" in their machine files)'
    )
    both = qvm("down", "g1", "--all", check=False)
    assert both.returncode == 2 and "--all: names given too" in both.stderr
    assert qvm("status", "--jobs", "0", "g1", check=False).returncode == 2
    assert not qvm.state_dir.exists() or not any(qvm.state_dir.iterdir())
