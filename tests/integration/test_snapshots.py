"""Snapshots with memory on the real test guest: what comes back is checked in the guest
itself (through its agent), and what QEMU has through qvm's lists.

Each test boots small VMs (256 MiB, TCG); the ``qvm`` fixture kills them all.
"""

from __future__ import annotations

import base64
import json
import os
import secrets
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from framework.harness import QVM_BIN, Qvm, one_line_error
from framework.jsonschema_lite import validate

pytestmark = pytest.mark.integration

MARK = "/tmp/qvm-mark"
SLEEPER = "sleep 123457"


def guest_sh(qvm: Qvm, name: str, script: str, timeout: float = 30) -> str:
    """Run ``script`` with the guest's /bin/sh through its agent; its stdout."""
    from qvm.control.agent import open_agent
    from qvm.layout.rundir import RunDir

    with open_agent(RunDir(qvm.run_dir(name)), sync_timeout=10) as client:
        started = client.execute(
            "guest-exec", {"path": "/bin/sh", "arg": ["-c", script], "capture-output": True}
        )
        deadline = time.monotonic() + timeout
        while True:
            status = client.execute("guest-exec-status", {"pid": started["pid"]})
            if status["exited"]:
                return base64.b64decode(status.get("out-data", "")).decode()
            assert time.monotonic() < deadline, f"{script!r} still runs after {timeout} s"
            time.sleep(0.05)


def sleeper_running(qvm: Qvm, name: str) -> bool:
    return SLEEPER in guest_sh(qvm, name, "ps")


def present_cpus(qvm: Qvm, name: str) -> int:
    return sum(1 for slot in qvm.json("cpu", "list", name) if slot["present"])


def boot(qvm: Qvm, name: str, **machine: object) -> None:
    qvm.guest_machine(name, **machine)  # type: ignore[arg-type]
    qvm("up", name)
    qvm("wait", name, "--for", "agent", "--timeout", "90")


def image_tags(path: Path) -> list[str]:
    done = subprocess.run(
        ["qemu-img", "info", "-U", "--output=json", str(path)],
        capture_output=True, text=True, check=True,
    )  # fmt: skip
    return [s["name"] for s in json.loads(done.stdout).get("snapshots", [])]


# --- save, list, restore in place and from stopped ----------------------------------------


def test_file_and_process_come_back(qvm: Qvm) -> None:
    boot(qvm, "vm1")
    secret = secrets.token_hex(8)
    guest_sh(qvm, "vm1", f"echo {secret} > {MARK}; ({SLEEPER} >/dev/null 2>&1 &)")
    assert sleeper_running(qvm, "vm1")
    saved = qvm.json("snapshot", "save", "vm1", "ready")
    validate(saved, "snapshot-save.json")
    assert saved["state_disk_added"] is True  # the VM has no disk of its own
    assert saved["devices"]["cpu_slots"] == [0]
    assert saved["ram_bytes"] == 256 * 1024**2
    assert saved["guest_time_ns"] is not None and saved["vmstate_bytes"] > 0
    # what the guest broke after the save
    guest_sh(qvm, "vm1", f"rm {MARK}; pkill -f '{SLEEPER}' || killall sleep")
    assert not sleeper_running(qvm, "vm1")
    assert guest_sh(qvm, "vm1", f"cat {MARK} 2>/dev/null || echo gone").strip() == "gone"
    pid = qvm.status("vm1")["pid"]

    restored = qvm.json("snapshot", "restore", "vm1", "ready")
    validate(restored, "snapshot-restore.json")
    assert restored["how"] == "loaded in place", restored
    assert qvm.status("vm1")["pid"] == pid  # the same QEMU
    assert guest_sh(qvm, "vm1", f"cat {MARK}").strip() == secret
    assert sleeper_running(qvm, "vm1")

    listed = qvm.json("snapshot", "list", "vm1")
    assert [(s["tag"], s["state"]) for s in listed] == [("ready", "ok")]
    validate(listed, "snapshot-list.json")

    # from stopped: QEMU starts with -loadvm
    qvm("kill", "vm1")
    text = qvm("up", "vm1", "--restore", "ready").stdout
    assert "restored snapshot ready: restarted QEMU" in text, text
    assert guest_sh(qvm, "vm1", f"cat {MARK}").strip() == secret
    assert sleeper_running(qvm, "vm1")

    validate(qvm.json("snapshot", "rm", "vm1", "ready"), "snapshot-rm.json")
    assert qvm.json("snapshot", "list", "vm1") == []
    assert image_tags(qvm.run_dir("vm1") / "state.qcow2") == []


def test_three_vcpus_and_a_dimm_restored_into_one(qvm: Qvm) -> None:
    path = qvm.guest_machine("vm1", count=1, max=4)
    # memory hotplug headroom for the DIMM
    text = path.read_text().replace('size = "256M"', 'size = "256M"\nslots = 2\nmax = "1G"')
    path.write_text(text)
    qvm("up", "vm1")
    qvm("wait", "vm1", "--for", "agent", "--timeout", "90")
    qvm("cpu", "add", "vm1", "--count", "2", "--wait-guest")
    qvm("mem", "add", "vm1", "256M")
    qvm("snapshot", "save", "vm1", "wide")
    qvm("restart", "vm1", "--force")  # the definition: 1 vCPU, no DIMM
    qvm("wait", "vm1", "--for", "agent", "--timeout", "90")
    assert present_cpus(qvm, "vm1") == 1

    restored = qvm.json("snapshot", "restore", "vm1", "wide")
    validate(restored, "snapshot-restore.json")
    assert restored["how"] == "restarted" and restored["replugged"] == 3, restored
    assert present_cpus(qvm, "vm1") == 3
    memory = qvm.json("mem", "list", "vm1")
    assert [d["id"] for d in memory["devices"]] == ["dimm0"], memory
    # the guest's own word
    assert guest_sh(qvm, "vm1", "grep -c ^processor /proc/cpuinfo").strip() == "3"
    mem_kb = int(guest_sh(qvm, "vm1", "awk '/MemTotal/ {print $2}' /proc/meminfo"))
    assert mem_kb > 400 * 1024, mem_kb
    # in place now: the device sets match
    again = qvm.json("snapshot", "restore", "vm1", "wide")
    assert again["how"] == "loaded in place", again


# --- refusals ---------------------------------------------------------------------------


def test_refusals(qvm: Qvm) -> None:
    raw = qvm.root / "plain.raw"
    raw.write_bytes(b"\0" * 1024**2)
    image, base = qvm.root / "mine.qcow2", qvm.root / "base.qcow2"
    for path in (image, base):
        subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", str(path), "8M"], check=True)
    cases = {
        "raw": (f'[[disk]]\nfile = "{raw}"\nformat = "raw"\n', "is raw"),
        "asis": (f'[[disk]]\nfile = "{image}"\n', "used as is"),
        "ro": (f'[[disk]]\nbase = "{base}"\nreadonly = true\n', "is read-only"),
    }
    for name, (extra, _) in cases.items():
        qvm.guest_machine(name, extra=extra)
    qvm("up", *cases)
    for name, (_, expected) in cases.items():
        line = one_line_error(qvm("snapshot", "save", name, "x", check=False))
        assert expected in line and "hint:" in line, line
        assert qvm.json("snapshot", "list", name) == []
    assert image_tags(image) == image_tags(base) == []  # the user's images were never written

    line = one_line_error(qvm("snapshot", "restore", "raw", "missing", check=False))
    assert line == "qvm: raw: no snapshot 'missing' (hint: qvm snapshot list raw)"
    bad = qvm("snapshot", "save", "raw", "no/slash", check=False)
    assert bad.returncode == 2 and "snapshot tag" in one_line_error(bad)


def test_definition_change_refused_before_the_vm_is_touched(qvm: Qvm) -> None:
    boot(qvm, "vm1", count=1, max=4)
    qvm("snapshot", "save", "vm1", "one")
    qvm("cpu", "add", "vm1")  # the device set differs: a restore must restart QEMU
    path = qvm.machines_dir / "vm1.toml"
    path.write_text(path.read_text().replace("max = 4", "max = 3"))
    pid = qvm.status("vm1")["pid"]
    line = one_line_error(qvm("snapshot", "restore", "vm1", "one", check=False))
    assert "the definition changed" in line and "maxcpus=4" in line, line
    status = qvm.status("vm1")
    assert status["state"] == "running" and status["pid"] == pid
    assert present_cpus(qvm, "vm1") == 2


def test_disk_only_on_a_stopped_vm(qvm: Qvm) -> None:
    base = qvm.root / "base.qcow2"
    subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", str(base), "16M"], check=True)
    qvm.guest_machine("vm1", extra=f'[[disk]]\nbase = "{base}"\n')
    qvm("up", "vm1")
    qvm("kill", "vm1")
    line = one_line_error(qvm("snapshot", "save", "vm1", "m", check=False))
    assert "needs a running VM" in line
    saved = qvm.json("snapshot", "save", "vm1", "disks", "--disk-only")
    assert saved["disk_only"] and saved["files"] == [str(qvm.run_dir("vm1") / "disk0.qcow2")]
    assert image_tags(qvm.run_dir("vm1") / "disk0.qcow2") == ["disks"]
    assert image_tags(base) == []
    qvm("up", "vm1")
    line = one_line_error(qvm("snapshot", "restore", "vm1", "disks", check=False))
    assert "restored on a stopped VM" in line
    qvm("kill", "vm1")
    assert qvm.json("snapshot", "restore", "vm1", "disks")["how"] == "disks reverted"


# --- faults -----------------------------------------------------------------------------


@pytest.fixture
def small_state(qvm: Qvm) -> Iterator[Path]:
    """The state dir on a 64 MiB tmpfs: the VM runs, its RAM state (~100 MiB) does not fit."""
    with qvm.state_on_tmpfs("64m", "qvm-snap") as state:
        yield state


def test_full_state_dir_during_save(qvm: Qvm, small_state: Path) -> None:
    boot(qvm, "vm1")
    line = one_line_error(qvm("snapshot", "save", "vm1", "big", check=False))
    # QEMU's own error, and where the space is missing
    assert "snapshot-save: Error while writing VM state" in line, line
    assert f"hint: {small_state / 'vm1'} has" in line and "free some space" in line, line
    assert qvm.json("snapshot", "list", "vm1") == []
    assert image_tags(small_state / "vm1" / "state.qcow2") == []
    assert qvm.json("qmp", "vm1", "query-status")["status"] == "running"
    assert guest_sh(qvm, "vm1", "echo alive").strip() == "alive"


def test_vm_killed_during_save(qvm: Qvm) -> None:
    boot(qvm, "vm1")
    save = subprocess.Popen(
        [str(QVM_BIN), "snapshot", "save", "vm1", "cut"],
        env=qvm.env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    time.sleep(0.15)
    qvm("kill", "vm1")
    out, err = save.communicate(timeout=60)
    assert "Traceback" not in err
    listed = qvm.json("snapshot", "list", "vm1")
    in_image = image_tags(qvm.run_dir("vm1") / "state.qcow2")
    if save.returncode == 0:  # the save won the race: it is whole, listed and in the image
        assert [s["tag"] for s in listed] == ["cut"] and in_image == ["cut"], (listed, in_image)
    else:
        assert len(err.strip().splitlines()) == 1 and "QEMU went away" in err, err
        assert listed == [], listed
    # the VM starts again either way
    qvm("up", "vm1")
    assert qvm.status("vm1")["state"] == "running"


# --- clones -------------------------------------------------------------------------------


def sha256_of(paths: list[Path]) -> dict[str, str]:
    import hashlib

    return {str(p): hashlib.sha256(p.read_bytes()).hexdigest() for p in paths}


WRITE_DISK = "dd of=/dev/vda conv=fsync 2>/dev/null"


def test_clone_and_template_side_by_side(qvm: Qvm) -> None:
    base = qvm.root / "base.qcow2"
    subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", str(base), "16M"], check=True)
    boot(qvm, "tpl", extra=f'[[disk]]\nbase = "{base}"\n')
    guest_sh(
        qvm, "tpl", f"echo TPL > {MARK}; echo TEMPLATE | dd of=/dev/vda conv=fsync 2>/dev/null"
    )
    qvm("snapshot", "save", "tpl", "ready")
    qvm("kill", "tpl")
    template_files = [base, *sorted(qvm.run_dir("tpl").glob("*.qcow2"))]
    before = sha256_of(template_files)

    made = qvm("new", "c1", "--from", "tpl@ready").stdout
    assert "a clone of tpl@ready" in made and "froze tpl@ready" in made, made
    qvm("up", "c1")
    assert qvm.json("qmp", "c1", "query-status")["status"] == "running"
    # the clone resumed the template's memory: the tmpfs file is there, no boot happened
    assert guest_sh(qvm, "c1", f"cat {MARK}").strip() == "TPL"
    assert guest_sh(qvm, "c1", "head -c 8 /dev/vda") == "TEMPLATE"
    guest_sh(
        qvm, "c1", f"echo CLONE > {MARK}; echo CLONE--- | dd of=/dev/vda conv=fsync 2>/dev/null"
    )

    # the template, side by side, from its own snapshot: its own state, not the clone's
    qvm("up", "tpl", "--restore", "ready")
    assert guest_sh(qvm, "tpl", f"cat {MARK}").strip() == "TPL"
    assert guest_sh(qvm, "tpl", "head -c 8 /dev/vda") == "TEMPLATE"
    assert guest_sh(qvm, "c1", f"cat {MARK}").strip() == "CLONE"
    assert guest_sh(qvm, "c1", "head -c 8 /dev/vda") == "CLONE---"
    assert qvm.status("c1")["state"] == qvm.status("tpl")["state"] == "running"
    qvm("kill", "tpl")
    assert sha256_of([base]) == {str(base): before[str(base)]}

    # a second clone reuses the frozen copy
    second = qvm("new", "c2", "--from", "tpl@ready").stdout
    assert "froze" not in second, second
    qvm("up", "c2")
    assert guest_sh(qvm, "c2", "head -c 8 /dev/vda") == "TEMPLATE"
    assert guest_sh(qvm, "c1", "head -c 8 /dev/vda") == "CLONE---"


# --- a clone's own MAC, frozen copies ------------------------------------------------------

NIC = '[[nic]]\nmode = "user"\n'


def defined_mac(qvm: Qvm, name: str) -> str:
    """The MAC the VM's definition gives net0, from the argv qvm would run."""
    device = next(a for a in qvm.json("cmdline", name)["argv"] if "netdev=net0" in a)
    return next(p for p in device.split(",") if p.startswith("mac=")).removeprefix("mac=")


def guest_mac(qvm: Qvm, name: str) -> str:
    """The guest's own word: the address of its one virtio-net interface."""
    return guest_sh(qvm, name, "ip link show eth0 | awk '/link.ether/ {print $2}'").strip()


def qemu_mac(qvm: Qvm, name: str) -> str:
    """QEMU's device: the MAC its receive filter takes."""
    return qvm.json("qmp", name, "query-rx-filter")[0]["main-mac"]


def test_clone_gets_its_own_mac_and_frozen_copy_goes_with_the_last_clone(qvm: Qvm) -> None:
    boot(qvm, "tpl", extra=NIC)
    template_mac = defined_mac(qvm, "tpl")
    assert guest_mac(qvm, "tpl") == template_mac
    qvm("snapshot", "save", "tpl", "ready")
    qvm("kill", "tpl")
    qvm("new", "c1", "--from", "tpl@ready")
    time.sleep(3)  # the template's clock, in the memory image, stands still meanwhile
    clone_mac = defined_mac(qvm, "c1")
    assert clone_mac != template_mac

    started = qvm.json("up", "c1")
    validate(started, "up.json")
    clone = started[0]["clone"]
    assert clone["template"] == "tpl" and clone["tag"] == "ready", clone
    assert clone["macs"].startswith("set in the guest by its agent: eth0 " + clone_mac), clone
    assert clone["clock"].startswith("set to the host's"), clone
    assert abs(int(guest_sh(qvm, "c1", "date +%s")) - time.time()) < 2  # not the save's time
    qvm("up", "tpl", "--restore", "ready")
    # side by side: each guest has its own definition's MAC, and so has QEMU's device
    assert guest_mac(qvm, "c1") == qemu_mac(qvm, "c1") == clone_mac
    assert guest_mac(qvm, "tpl") == qemu_mac(qvm, "tpl") == template_mac

    # the frozen copy stays while a clone uses it: refused, naming it, nothing removed
    frozen = qvm.state_dir / "tpl@ready"
    line = one_line_error(qvm("snapshot", "rm", "tpl", "ready", check=False))
    assert "has clones on its frozen copy" in line and "c1" in line and "qvm rm c1" in line, line
    assert [s["tag"] for s in qvm.json("snapshot", "list", "tpl")] == ["ready"]
    assert (frozen / "memory.bin").exists()
    # the template's rm says what it leaves
    qvm("kill", "tpl", "c1")
    removed = qvm.json("rm", "tpl")
    kept = {k["file"]: k["why"] for k in removed["kept"]}
    assert "used by c1" in kept[str(frozen)], kept
    assert frozen.is_dir()
    # the last clone gone: the frozen copy goes, qvm's files only
    qvm("rm", "c1")
    (frozen / "notes.txt").write_text("mine")
    gone = qvm.json("snapshot", "rm", "tpl", "ready")
    validate(gone, "snapshot-rm.json")
    assert gone["frozen"] == str(frozen) and gone["images"] == [], gone
    assert [k["file"] for k in gone["kept"]] == [str(frozen / "notes.txt")], gone
    assert sorted(p.name for p in frozen.iterdir()) == ["notes.txt"]


# --- the restart policy after a restore -------------------------------------------------------


def test_restored_vm_restarts_cold_after_a_crash(qvm: Qvm) -> None:
    boot(qvm, "vm1", extra='[supervisor]\nrestart = "on-failure"\nrestart_delay = 0.2\n')
    guest_sh(qvm, "vm1", f"echo saved > {MARK}")
    qvm("snapshot", "save", "vm1", "ready")
    qvm("kill", "vm1")
    time.sleep(3)  # the guest's clock stands still meanwhile
    restored = qvm.json("up", "vm1", "--restore", "ready")
    assert restored[0]["restore"]["guest_clock"].startswith("set to the host's"), restored
    assert guest_sh(qvm, "vm1", f"cat {MARK}").strip() == "saved"
    assert abs(int(guest_sh(qvm, "vm1", "date +%s")) - time.time()) < 2  # set, not 3 s behind
    pid = qvm.status("vm1")["pid"]
    os.kill(pid, 9)
    deadline = time.monotonic() + 60
    while True:
        status = qvm.status("vm1")
        if status["state"] == "running" and status["pid"] not in (None, pid):
            break
        assert time.monotonic() < deadline, status
        time.sleep(0.2)
    assert "restarted cold from the definition" in status["last_exit"]["reason"], status
    qvm("wait", "vm1", "--for", "agent", "--timeout", "90")
    # the guest booted: no file from the snapshot, a fresh uptime
    assert guest_sh(qvm, "vm1", f"cat {MARK} 2>/dev/null || echo gone").strip() == "gone"
    uptime = float(guest_sh(qvm, "vm1", "cut -d' ' -f1 /proc/uptime"))
    assert uptime < 60, uptime
    launch = json.loads((qvm.run_dir("vm1") / "launch.json").read_text())
    assert "-loadvm" not in launch["argv"] and launch["restart_argv"] is None


# --- hotplugged disks in a restart ------------------------------------------------------------


def test_hotplugged_disk_restored_into_a_vm_without_it(qvm: Qvm) -> None:
    boot(qvm, "vm1")
    attached = qvm.json("disk", "attach", "vm1", "--new", "16M")
    dev = attached["disk"]["id"]
    guest_sh(qvm, "vm1", "for i in 1 2 3 4 5 6 7 8 9; do [ -b /dev/vda ] && break; sleep 1; done")
    guest_sh(qvm, "vm1", "echo HOTPLUG- | dd of=/dev/vda conv=fsync 2>/dev/null")
    saved = qvm.json("snapshot", "save", "vm1", "withdisk")
    assert [p["id"] for p in saved["devices"]["plugged"]] == [dev], saved
    qvm("restart", "vm1", "--force")  # the definition: no such disk
    qvm("wait", "vm1", "--for", "agent", "--timeout", "90")
    assert dev not in [d["id"] for d in qvm.json("disk", "list", "vm1")["disks"]]

    restored = qvm.json("up", "vm1", "--restore", "withdisk")
    validate(restored, "up.json")
    assert restored[0]["restore"]["how"] == "restarted", restored
    assert restored[0]["restore"]["replugged"] == 1, restored
    assert dev in [d["id"] for d in qvm.json("disk", "list", "vm1")["disks"]]
    # the guest's own word: the disk is there with what it wrote before the save
    assert guest_sh(qvm, "vm1", "head -c 8 /dev/vda") == "HOTPLUG-"
    again = qvm.json("snapshot", "restore", "vm1", "withdisk")
    assert again["how"] == "loaded in place", again
