"""A VM is found by its name from any folder: its run dir records the machine file it was
started from. Real QEMU, the real test guest; every command after `up` runs from a folder
where no lookup of machine files could find the VM.
"""

from __future__ import annotations

import subprocess
import time
from pathlib import Path

import pytest
from framework.harness import GUEST_DIR, QVM_BIN, Qvm, one_line_error

pytestmark = pytest.mark.integration


def run_in(qvm: Qvm, cwd: Path, *args: str) -> subprocess.CompletedProcess[str]:
    if args and args[0] in ("up", "restart"):
        qvm.started.add(args[1])
    env = qvm.env()
    del env["QVM_MACHINES"]  # only ./machines and the (empty) config folder are searched
    return subprocess.run(
        [str(QVM_BIN), *args], capture_output=True, text=True, timeout=120, cwd=cwd, env=env
    )


def test_a_started_vm_is_found_by_name_from_any_folder(qvm: Qvm) -> None:
    project = qvm.root / "project"
    elsewhere = qvm.root / "elsewhere"
    elsewhere.mkdir()
    (project / "machines").mkdir(parents=True)
    definition = project / "machines" / "far.toml"
    qvm.guest_machine("far", memory="192M").rename(definition)

    # not found from another folder before it ever ran: nothing records it yet
    missing = one_line_error(run_in(qvm, elsewhere, "up", "far"))
    assert missing.startswith("qvm: no VM named 'far'")

    up = run_in(qvm, project, "up", "far")
    assert up.returncode == 0, up.stderr
    first = qvm.serial("far").wait_ready()
    assert first["ncpus"] == "1"

    status = run_in(qvm, elsewhere, "status", "far")
    assert status.returncode == 0, status.stderr
    assert status.stdout.startswith("far: running")
    assert f"definition  {definition}" in status.stdout
    assert status.stderr == ""

    again = run_in(qvm, elsewhere, "up", "far")
    assert again.returncode == 0, again.stderr
    assert again.stdout.startswith("far: already running")
    assert again.stderr == ""

    # the file changes under the running VM: said in one line, with what to do
    time.sleep(0.05)
    definition.write_text(definition.read_text().replace('size = "192M"', 'size = "256M"'))
    said = (
        f"qvm: far: {definition} changed since far was started "
        "(hint: qvm restart far runs the new definition)"
    )
    changed = run_in(qvm, elsewhere, "up", "far")
    assert changed.returncode == 0
    assert changed.stderr.strip().splitlines() == [said]
    assert run_in(qvm, elsewhere, "status", "far").stderr.strip().splitlines() == [said]
    # JSON output stays clean: the definition's path is in it for a script to compare
    assert run_in(qvm, elsewhere, "status", "far", "--json").stderr == ""

    # restart from elsewhere runs the new definition: the guest itself sees the memory
    pid = qvm.status("far")["pid"]
    restarted = run_in(qvm, elsewhere, "restart", "far", "--timeout", "20")
    assert restarted.returncode == 0, restarted.stderr
    assert qvm.status("far")["pid"] != pid
    after = qvm.serial("far").wait_ready()
    assert int(after["mem_kb"]) > int(first["mem_kb"]) + 40_000
    assert run_in(qvm, elsewhere, "up", "far").stderr == ""

    down = run_in(qvm, elsewhere, "down", "far", "--timeout", "20")
    assert down.returncode == 0, down.stderr
    assert qvm.serial("far").guest().powered_off

    # the file is gone: one line naming it and what to do; nothing starts
    definition.unlink()
    gone = one_line_error(run_in(qvm, elsewhere, "up", "far"))
    assert gone == (
        f"qvm: far: its machine file {definition} is gone (it was there when far was last "
        "started or made) (hint: put it back, or qvm up path/to/far.toml; "
        "qvm rm far forgets the VM)"
    )
    assert qvm.status("far")["state"] == "stopped"


def test_new_writes_where_up_finds_it_from_any_folder(qvm: Qvm) -> None:
    """`qvm new` without --machines writes into the user's config folder; its hint works
    from anywhere. With --machines DIR (relative, here), the run dir records the file."""
    project = qvm.root / "project"
    elsewhere = qvm.root / "elsewhere"
    project.mkdir()
    elsewhere.mkdir()
    boot = ("--kernel", str(GUEST_DIR / "vmlinuz"), "--initrd", str(GUEST_DIR / "initrd.img"))
    extra = ("--append", "console=ttyS0 quiet", "--memory", "192M", "--no-cloud-init")
    made = run_in(qvm, project, "new", "mine", *boot, *extra)
    assert made.returncode == 0, made.stderr
    written = qvm.root / "config" / "qvm" / "machines" / "mine.toml"
    assert made.stdout.splitlines()[:2] == [f"mine: wrote {written}", "  start it:   qvm up mine"]

    local = run_in(qvm, project, "--machines", "vms", "new", "local", *boot, *extra)
    assert local.returncode == 0, local.stderr
    assert local.stdout.splitlines()[0] == f"local: wrote {project / 'vms' / 'local.toml'}"
    # the hint printed works from another folder
    for name in ("mine", "local"):
        cmdline = run_in(qvm, elsewhere, "cmdline", name)
        assert cmdline.returncode == 0, cmdline.stderr
        assert f"guest={name}," in cmdline.stdout
    up = run_in(qvm, elsewhere, "up", "local")
    assert up.returncode == 0, up.stderr
    assert qvm.serial("local").wait_ready()["ncpus"] == "1"
    assert run_in(qvm, elsewhere, "kill", "local").returncode == 0
