"""Faults injected for real, with the real QEMU and the test guest: what the user sees (one
line, the exit code), that QEMU ends when asked, and that no byte outside qvm's files
changes (a decoy tree of files around the state dir, hashed before and after).

Every test leaves nothing running, even when it fails: the ``qvm`` fixture kills every VM
and checks that no QEMU or supervisor of the state dir survived; the processes a test
starts or stops itself (a ``sleep``, a SIGSTOPped supervisor, a tmpfs mount) are undone in
finalizers registered before the fault is injected.
"""

from __future__ import annotations

import contextlib
import hashlib
import itertools
import json
import os
import signal
import socket
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from framework.harness import Qvm, one_line_error
from framework.wait import wait_until

pytestmark = pytest.mark.integration

MACHINE = {"memory": "128M", "max": 4}


# --- helpers -------------------------------------------------------------------------


def make_decoys(qvm: Qvm) -> Path:
    """Files of "the user's" around the state dir: beside it, and in a folder a link or a
    careless path could lead to."""
    decoy = qvm.root / "decoy"
    (decoy / "deep").mkdir(parents=True)
    (decoy / "notes.txt").write_text("the user's notes\n")
    (decoy / "state.json").write_text('{"not": "qvm\'s"}\n')
    (decoy / "deep" / "disk0.qcow2").write_bytes(os.urandom(4096))
    (qvm.root / "beside-the-state-dir.txt").write_text("keep me\n")
    return decoy


def tree_digest(qvm: Qvm) -> dict[str, str]:
    """sha256 of every file under the test root outside the state dir (and the machines
    qvm reads); links are hashed as their target's name."""
    digests = {}
    skip = {qvm.state_dir, qvm.machines_dir, qvm.root / "config"}
    for folder, dirs, files in os.walk(qvm.root):
        here = Path(folder)
        dirs[:] = [d for d in dirs if here / d not in skip]
        for name in files:
            path = here / name
            if path.is_symlink():
                digests[str(path)] = "link:" + os.readlink(path)
            else:
                digests[str(path)] = hashlib.sha256(path.read_bytes()).hexdigest()
    return digests


def start_time(pid: int) -> int:
    stat = Path(f"/proc/{pid}/stat").read_text()
    return int(stat[stat.rindex(")") + 2 :].split()[19])


def alive(pid: int) -> bool:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat[stat.rindex(")") + 2 :].split()[0] != "Z"


@pytest.fixture
def sleeper() -> Iterator[subprocess.Popen[bytes]]:
    """An unrelated process of the user's: no qvm command may signal it."""
    proc = subprocess.Popen(["sleep", "300"])
    yield proc
    proc.kill()
    proc.wait()


@pytest.fixture
def continue_stopped() -> Iterator[list[int]]:
    """Pids a test SIGSTOPs: woken again at the end whatever happens, so that the
    fixture's cleanup can end them."""
    stopped: list[int] = []
    yield stopped
    for pid in stopped:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGCONT)


def plant_state(qvm: Qvm, name: str, **fields: Any) -> Path:
    run = qvm.run_dir(name)
    qvm.state_dir.mkdir(mode=0o700, exist_ok=True)
    run.mkdir(mode=0o700, exist_ok=True)
    record = {
        "name": name,
        "machine_file": None,
        "accel": "tcg",
        "accel_reason": "planted",
        "supervisor_pid": 1,
        "supervisor_start_time": None,
        "state": "running",
        "restarts": 0,
        "exit": None,
        "crash_reason": None,
    }
    record.update(fields)
    (run / "state.json").write_text(json.dumps(record))
    return run


def qmp_raw(path: Path, command: str, arguments: dict[str, Any] | None = None) -> Iterator[dict]:
    """A user's own QMP client on qmp.sock, in raw JSON lines: the command's reply and
    then every message after it (events), as they come."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        sock.settimeout(10)
        sock.connect(str(path))
        stream = sock.makefile("rwb")
        json.loads(stream.readline())  # the greeting
        stream.write(b'{"execute": "qmp_capabilities"}\n')
        stream.flush()
        assert "return" in json.loads(stream.readline())
        message: dict[str, Any] = {"execute": command}
        if arguments:
            message["arguments"] = arguments
        stream.write(json.dumps(message).encode() + b"\n")
        stream.flush()
        while line := stream.readline():
            yield json.loads(line)


def supervisor_request(qvm: Qvm, name: str, request: dict[str, Any]) -> dict[str, Any]:
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        sock.settimeout(10)
        sock.connect(str(qvm.run_dir(name) / "supervisor.sock"))
        sock.sendall(json.dumps(request).encode() + b"\n")
        return json.loads(sock.makefile("rb").readline())


# --- records that are not qvm's ----------------------------------------------------------


def test_planted_records_never_signal_another_process(
    qvm: Qvm, sleeper: subprocess.Popen[bytes]
) -> None:
    make_decoys(qvm)
    before = tree_digest(qvm)
    qvm.guest_machine("vm1", **MACHINE)
    pid = sleeper.pid
    # the pid and start time of a live process: a perfect record, of someone else's process
    for command in (("kill", "vm1"), ("down", "vm1", "--timeout", "2")):
        plant_state(
            qvm,
            "vm1",
            supervisor_pid=pid,
            supervisor_start_time=start_time(pid),
            qemu_pid=pid,
            qemu_start_time=start_time(pid),
        )
        line = one_line_error(qvm(*command, check=False))
        assert f"pid {pid} is not vm1's QEMU" in line, line
        assert alive(pid)
        # the record is qvm's to correct: the run it names has ended
        assert qvm.status("vm1")["state"] == "crashed"
    # a pid without a start time: its identity cannot be known
    plant_state(qvm, "vm1", supervisor_pid=pid, qemu_pid=pid, qemu_start_time=None)
    line = one_line_error(qvm("kill", "vm1", check=False))
    assert "no start time" in line, line
    assert alive(pid)
    # a string pid, and a record that is not JSON: one line naming the file
    plant_state(qvm, "vm1", supervisor_pid=str(pid), qemu_pid=str(pid))
    for command in (("kill", "vm1"), ("down", "vm1")):
        line = one_line_error(qvm(*command, check=False))
        assert "state.json" in line, line
    (qvm.run_dir("vm1") / "state.json").write_text('{"name": "vm1", "state": ')
    line = one_line_error(qvm("kill", "vm1", check=False))
    assert "state.json" in line and "not valid JSON" in line, line
    status = qvm.status("vm1")  # status never fails: the problem rides along
    # nothing of vm1 runs (the sleeper is not its QEMU): stopped, and why
    assert status["state"] == "stopped" and "state.json" in status["error"]
    assert alive(pid)
    # rm clears a broken run dir (it is how one is cleared), and only qvm's files in it
    (qvm.run_dir("vm1") / "mine.txt").write_text("the user's\n")
    qvm("rm", "vm1")
    assert sorted(p.name for p in qvm.run_dir("vm1").iterdir()) == ["mine.txt"]
    assert alive(pid)
    assert tree_digest(qvm) == before


def test_symlinked_or_foreign_run_dir_is_refused(qvm: Qvm) -> None:
    decoy = make_decoys(qvm)
    before = tree_digest(qvm)
    qvm.guest_machine("vm1", **MACHINE)
    qvm.state_dir.mkdir(mode=0o700)
    qvm.run_dir("vm1").symlink_to(decoy)
    for command in (("rm", "vm1"), ("reset", "vm1"), ("up", "vm1")):
        line = one_line_error(qvm(*command, check=False))
        assert "is a symbolic link" in line, (command, line)
    assert tree_digest(qvm) == before
    qvm.run_dir("vm1").unlink()
    # someone else's folder (as root: chown it away)
    qvm.run_dir("vm1").mkdir(mode=0o700)
    (qvm.run_dir("vm1") / "state.json").write_text("{}")
    os.chown(qvm.run_dir("vm1"), 12345, 12345)
    try:
        for command in (("rm", "vm1"), ("reset", "vm1"), ("up", "vm1")):
            line = one_line_error(qvm(*command, check=False))
            assert "belongs to uid 12345" in line, (command, line)
        assert (qvm.run_dir("vm1") / "state.json").read_text() == "{}"
    finally:
        os.chown(qvm.run_dir("vm1"), os.getuid(), os.getgid())
    assert not qvm.processes()
    assert tree_digest(qvm) == before


# --- a supervisor or QEMU that is killed or stopped ---------------------------------------


def test_sigstopped_supervisor_down_and_kill_end_qemu_themselves(
    qvm: Qvm, continue_stopped: list[int]
) -> None:
    make_decoys(qvm)
    before = tree_digest(qvm)
    qvm.guest_machine("vm1", **MACHINE)
    for verb in ("kill", "down"):
        qvm("up", "vm1")
        status = qvm.status("vm1")
        supervisor, qemu = status["supervisor_pid"], status["pid"]
        continue_stopped.append(supervisor)
        os.kill(supervisor, signal.SIGSTOP)
        started = time.monotonic()
        done = qvm(verb, "vm1", *(["--timeout", "5"] if verb == "down" else []))
        took = time.monotonic() - started
        assert done.stdout.strip() == (
            f"vm1: {'killed' if verb == 'kill' else 'stopped'}: the supervisor did not answer "
            f"within 6 s: qvm killed the supervisor (pid {supervisor}) and QEMU (pid {qemu}) "
            "itself (SIGKILL)"
        ), done.stdout
        assert took < 20, took
        wait_until(lambda: not alive(qemu) and not alive(supervisor), 10, "both to end")  # noqa: B023
        after = qvm.status("vm1")
        assert after["state"] == "stopped", after
        assert "the supervisor did not answer" in after["reason"]
        assert not qvm.processes()
    assert tree_digest(qvm) == before


def test_a_sigstopped_supervisor_costs_list_only_its_own_row(
    qvm: Qvm, continue_stopped: list[int]
) -> None:
    """Issue 21: queries read the supervisors' records, so a stopped one is shown as
    stuck, with the age of what it last recorded, and waited for by nobody."""
    for name in ("vm1", "vm2"):
        qvm.guest_machine(name, **MACHINE)
        qvm("up", name)
    supervisor = qvm.status("vm1")["supervisor_pid"]
    continue_stopped.append(supervisor)
    os.kill(supervisor, signal.SIGSTOP)
    wait_until(lambda: Path(f"/proc/{supervisor}/stat").read_text().split()[2] == "T", 5, "T")
    for args in (("list", "--json"), ("status", "vm1", "--json"), ("cpu", "list", "vm1")):
        started = time.monotonic()
        done = qvm(*args)
        assert time.monotonic() - started < 1.0, (args, time.monotonic() - started)
    rows = {row["name"]: row for row in json.loads(qvm("list", "--json").stdout)}
    assert rows["vm1"]["supervisor_state"] == "stuck", rows["vm1"]
    assert f"kill -CONT {supervisor}" in rows["vm1"]["error"]
    assert rows["vm1"]["state"] == "running" and rows["vm1"]["vcpus"]["present"] == 1
    assert (rows["vm2"]["supervisor_state"], rows["vm2"]["error"]) == ("ok", None), rows["vm2"]
    assert "supervisor stuck" in qvm("list").stdout
    assert "its supervisor is stopped" in done.stderr  # cpu list's, the table still printed
    assert "1 of 4 vCPUs present" in done.stdout
    os.kill(supervisor, signal.SIGCONT)
    # woken, it rewrites its record at once (its heartbeat is overdue)
    wait_until(lambda: qvm.status("vm1")["supervisor_state"] == "ok", 3, "a fresh record")
    status = qvm.status("vm1")
    assert status["error"] is None and status["facts_age"] < 3.0, status


def test_a_request_read_after_its_deadline_is_not_carried_out(qvm: Qvm) -> None:
    qvm.guest_machine("vm1", **MACHINE)
    qvm("up", "vm1")
    qemu = qvm.status("vm1")["pid"]
    # what a supervisor woken from SIGSTOP reads: a kill its user was told had failed
    late = {"op": "kill", "deadline": time.time() - 1, "ack": True}
    reply = supervisor_request(qvm, "vm1", late)
    assert reply["error"].startswith("request expired"), reply
    assert alive(qemu) and qvm.status("vm1")["state"] == "running"
    # in time: accepted at once, then carried out
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        sock.settimeout(15)
        sock.connect(str(qvm.run_dir("vm1") / "supervisor.sock"))
        sock.sendall(json.dumps({**late, "deadline": time.time() + 5}).encode() + b"\n")
        lines = sock.makefile("rb")
        assert json.loads(lines.readline()) == {"accepted": True}
        assert json.loads(lines.readline())["ended_by"] == "kill"
    wait_until(lambda: not alive(qemu), 10, "QEMU to end")


def test_sigstopped_qemu_and_killed_qemu(qvm: Qvm, continue_stopped: list[int]) -> None:
    qvm.guest_machine("vm1", **MACHINE)
    qvm("up", "vm1")
    qemu = qvm.status("vm1")["pid"]
    continue_stopped.append(qemu)
    os.kill(qemu, signal.SIGSTOP)
    down = qvm("down", "vm1", "--timeout", "2")
    assert down.stdout.strip() == "vm1: stopped: QEMU was killed (SIGKILL)", down.stdout
    assert not alive(qemu)
    qvm("up", "vm1")
    qemu = qvm.status("vm1")["pid"]
    os.kill(qemu, signal.SIGKILL)
    status = qvm.wait_state("vm1", "crashed", 15)
    assert status["reason"] == "killed by SIGKILL"
    line = one_line_error(qvm("kill", "vm1", check=False))
    assert line.startswith("qvm: vm1: not running"), line


def test_a_deleted_lock_file_does_not_make_a_live_supervisor_look_dead(qvm: Qvm) -> None:
    qvm.guest_machine("vm1", **MACHINE)
    qvm("up", "vm1")
    status = qvm.status("vm1")
    (qvm.run_dir("vm1") / "supervisor.lock").unlink()
    assert qvm.status("vm1")["state"] == "running"
    # a second `up` starts no second QEMU
    again = qvm("up", "vm1")
    assert f"already running (pid {status['pid']})" in again.stdout
    down = qvm("down", "vm1", "--force")
    assert down.stdout.strip() == "vm1: stopped: QEMU quit over QMP", down.stdout
    wait_until(lambda: not alive(status["supervisor_pid"]), 10, "the supervisor to exit")
    after = qvm.status("vm1")
    assert after["state"] == "stopped" and after["reason"] == "quit over QMP", after


@pytest.mark.parametrize("command", ["down", "kill"])
def test_down_or_kill_in_the_first_milliseconds_ends_the_vm(qvm: Qvm, command: str) -> None:
    """`up --no-wait` returns once QEMU is spawned, while its supervisor may not have
    exec'd yet (its command line is still `qvm up`'s): the next command still ends it.
    A down waits for the guest to boot and take the power button: once is enough."""
    qvm.guest_machine("vm1", **MACHINE)
    for _ in range(3 if command == "kill" else 1):
        qvm("up", "vm1", "--no-wait")
        done = qvm(command, "vm1", "--timeout", "20") if command == "down" else qvm("kill", "vm1")
        assert done.stdout.startswith(("vm1: stopped", "vm1: killed")), done.stdout
        assert qvm.status("vm1")["state"] == "stopped"
        wait_until(lambda: not qvm.processes(), 10, "no qemu or supervisor left")


def test_concurrent_down_and_kill_print_what_happened(qvm: Qvm) -> None:
    qvm.guest_machine("vm1", **MACHINE)
    qvm("up", "vm1")
    qvm.serial("vm1").wait_ready()
    env = qvm.env()
    from framework.harness import QVM_BIN

    procs = [
        subprocess.Popen(
            [str(QVM_BIN), *args], env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE
        )
        for args in (("down", "vm1", "--timeout", "20"), ("kill", "vm1"))
    ]
    outputs = []
    for proc in procs:
        out, err = proc.communicate(timeout=60)
        outputs.append((proc.returncode, out.decode().strip(), err.decode().strip()))
    status = qvm.status("vm1")
    assert status["state"] == "stopped"
    # both print the one end the record holds, whichever caused it
    said = {line.split(": ", 2)[2].split(" (as another")[0] for rc, line, _ in outputs if rc == 0}
    assert len(said) == 1, outputs
    for rc, _, err in outputs:
        assert rc == 0 or len(err.splitlines()) == 1, outputs


# --- a full state dir ---------------------------------------------------------------------


@pytest.fixture
def tmpfs_state(qvm: Qvm) -> Iterator[Path]:
    """The state dir on a 2 MiB tmpfs, unmounted at the end (after the VMs are killed:
    this fixture's teardown runs before the ``qvm`` fixture's)."""
    with qvm.state_on_tmpfs("2m", "qvm-test") as state:
        yield state


def fill(folder: Path) -> None:
    """Fill the file system of ``folder`` to the last byte (unbuffered: closing the file
    has nothing left to flush, and cannot fail)."""
    with open(folder / f"filler-{time.monotonic_ns()}", "wb", buffering=0) as handle:
        for size in (65536, 4096, 512, 1):
            with contextlib.suppress(OSError):
                while True:
                    handle.write(b"\0" * size)


def test_full_state_dir(qvm: Qvm, tmpfs_state: Path) -> None:
    make_decoys(qvm)
    before = tree_digest(qvm)
    qvm.guest_machine("vm1", **MACHINE)
    qvm("up", "vm1")
    qemu = qvm.status("vm1")["pid"]
    fill(tmpfs_state)
    # status answers (from the live supervisor), in one piece
    status = qvm("status", "vm1", check=False)
    assert "Traceback" not in status.stderr
    assert status.returncode == 0, status.stderr
    # down still ends QEMU, and the record says how, not that the supervisor died
    down = qvm("down", "vm1", "--force")
    assert down.stdout.strip() == "vm1: stopped: QEMU quit over QMP", down.stdout
    assert not alive(qemu)
    after = qvm.status("vm1")
    assert after["state"] == "stopped" and after["reason"] == "quit over QMP", after
    assert not list(tmpfs_state.rglob("*.tmp")), list(tmpfs_state.rglob("*"))
    # up on a full disk: one line naming the file it could not write
    fill(tmpfs_state)
    line = one_line_error(qvm("up", "vm1", check=False))
    assert "cannot write" in line or "No space left" in line, line
    assert not qvm.processes()
    assert not list(tmpfs_state.rglob("*.tmp"))
    assert tree_digest(qvm) == before


# --- an unplug nobody told qvm about ----------------------------------------------------


def test_outside_vcpu_unplug_is_known_to_the_tcg_guard(qvm: Qvm) -> None:
    qvm.guest_machine("vm1", count=1, max=4, memory="256M")
    qvm("up", "vm1")
    if qvm.status("vm1")["accel"] != "tcg":
        pytest.skip("the guard is about TCG")
    qvm.serial("vm1").wait_ready()  # the guest's ACPI code lets vCPUs go
    qvm("cpu", "add", "vm1", "--wait-guest")
    qemu = qvm.status("vm1")["pid"]
    # a user's own client on qmp.sock unplugs it; qvm is not asked
    messages = qmp_raw(qvm.run_dir("vm1") / "qmp.sock", "device_del", {"id": "cpu1"})
    seen = []
    for message in messages:  # the guest's ACPI events may come before the reply
        seen.append(message)
        if "event" not in message:
            assert "return" in message, message
            break
    for message in itertools.chain(seen, messages):
        if message.get("event") == "DEVICE_DELETED" and "lapic" in message["data"].get("path", ""):
            break
    messages.close()
    # the supervisor saw the event too (events reach every monitor) and recorded it
    record = qvm.run_dir("vm1") / "cpu-unplugged.json"
    wait_until(
        lambda: record.exists() and "cpu1" in json.loads(record.read_text())["ids"],
        5,
        "the supervisor to record the unplug",
    )
    # the next add is refused, QEMU untouched
    refused = qvm("cpu", "add", "vm1", check=False)
    one_line_error(
        refused,
        "qvm: vm1: cpu add refused: a vCPU was unplugged earlier in this QEMU run, and "
        "under TCG QEMU 7.2 crashes (double free) on the next vCPU device_add "
        "(hint: qvm restart vm1 first, or pass --force to try anyway)",
    )
    assert alive(qemu) and qvm.status("vm1")["state"] == "running"


def test_a_corrupt_state_record_of_a_stopped_vm_is_moved_aside_by_up(qvm: Qvm) -> None:
    """Issue 19: a stopped VM whose state.json is corrupt could be neither started nor
    killed. With nothing running, status says stopped and why, kill says not running, and
    up keeps the file as state.json.corrupt-TIME and starts."""
    qvm.guest_machine("vm1", **MACHINE)
    run = qvm.run_dir("vm1")
    run.mkdir(mode=0o700, parents=True)
    qvm.state_dir.chmod(0o700)
    planted = b'{"name": "vm1", "state": "runn'
    (run / "state.json").write_bytes(planted)
    status = qvm.status("vm1")
    assert status["state"] == "stopped", status
    assert status["problems"][0].startswith(f"{run / 'state.json'}: not valid JSON")
    line = one_line_error(qvm("kill", "vm1", check=False))
    assert line.startswith("qvm: vm1: not running (hint: "), line
    assert (run / "state.json").read_bytes() == planted
    up = qvm("up", "vm1")
    (kept,) = run.glob("state.json.corrupt-*")
    assert kept.read_bytes() == planted
    assert f"moved aside to {kept}" in up.stderr, up.stderr
    assert qvm.status("vm1")["state"] == "running"
    qvm("kill", "vm1")
    assert kept.read_bytes() == planted  # kept, never deleted
