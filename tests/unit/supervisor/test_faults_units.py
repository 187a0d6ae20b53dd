"""The pieces the fault guarantees rest on, without QEMU: atomic writes that fail cleanly,
process identity, run-dir locks that survive a deleted lock file, request deadlines,
the vCPU unplug events the supervisor learns from, and the names `rm` may remove."""

from __future__ import annotations

import errno
import json
import os
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
from framework.fake_qmp import state_json

from qvm.base import jsonfile
from qvm.base.jsonfile import RecordWriteError, write_json_atomic
from qvm.base.proc import identity_problem, process_cmdline, process_start_time
from qvm.layout.locks import supervisor_lock_held, try_lock_dir
from qvm.layout.rundir import RunDir, made_by_qvm
from qvm.store.launch import LaunchRecord
from qvm.store.state import QemuRun, StateRecord
from qvm.store.unplugged import cpu_unplugged_this_run, record_cpu_unplug, unplugged_vcpu
from qvm.supervisor.client import qemu_identity_problem, supervisor_identity_problem
from qvm.supervisor.spawn import initial_state
from qvm.supervisor.wire import (
    Accepted,
    ErrorReply,
    KillRequest,
    StopRequest,
    decode_reply,
    decode_request,
    expired,
)


@pytest.mark.parametrize("code", [errno.ENOSPC, errno.EIO, errno.EROFS])
def test_a_failed_write_is_one_line_and_leaves_the_old_file_and_no_tmp(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, code: int
) -> None:
    target = tmp_path / "state.json"
    write_json_atomic(target, {"old": True})

    def failing_fsync(fd: int) -> None:
        raise OSError(code, os.strerror(code))

    monkeypatch.setattr(jsonfile.os, "fsync", failing_fsync)
    with pytest.raises(RecordWriteError) as caught:
        write_json_atomic(target, {"new": True})
    message = str(caught.value)
    assert "\n" not in message and message.startswith(f"{target}: cannot write: ")
    assert caught.value.errno == code
    assert json.loads(target.read_text()) == {"old": True}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["state.json"]


def test_a_planted_link_under_the_tmp_name_is_not_written_through(tmp_path: Path) -> None:
    victim = tmp_path / "victim"
    victim.write_text("the user's\n")
    (tmp_path / f".state.json.{os.getpid()}-{threading.get_ident()}.tmp").symlink_to(victim)
    write_json_atomic(tmp_path / "state.json", {"a": 1})
    assert victim.read_text() == "the user's\n"


def _record(**fields: object) -> StateRecord:
    """vm1's state record, as its supervisor (this process) writes it once its QEMU (this
    process too) runs; ``fields`` changed."""
    launch = {"name": "vm1", "argv": ["qemu"], "accel": "tcg", "accel_reason": "x"}
    running = initial_state(LaunchRecord.from_json(launch, "launch.json"))._replace(
        state="running", qemu_pid=os.getpid(), qemu_start_time=process_start_time(os.getpid())
    )
    return running._replace(**fields)


def test_identity_needs_pid_start_time_and_a_command_line_of_ours(tmp_path: Path) -> None:
    run = RunDir(tmp_path / "vm1")
    me, started = os.getpid(), process_start_time(os.getpid())
    # this test process is alive with the right start time, but it is not vm1's
    assert "is not vm1's QEMU" in (qemu_identity_problem(run, _record()) or "")
    assert "is not vm1's supervisor" in (supervisor_identity_problem(run, _record()) or "")
    assert "no start time" in (identity_problem(me, None, "x", lambda argv: True) or "")
    assert "no valid pid" in (identity_problem("123", started, "x", lambda argv: True) or "")
    assert "no longer running" in (identity_problem(me, started + 1, "x", lambda a: True) or "")
    assert identity_problem(me, started, "x", lambda argv: True) is None


def test_a_process_whose_command_line_names_the_run_dir_is_this_vms(tmp_path: Path) -> None:
    run = RunDir(tmp_path / "vm1")
    # stands in for QEMU: a live process whose argv names vm1's events socket
    mark = f"path={run.events_socket},server=on"
    proc = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(30)", mark])
    try:
        deadline = time.monotonic() + 10
        while mark not in (process_cmdline(proc.pid) or []) and time.monotonic() < deadline:
            time.sleep(0.01)  # until the child has exec'd
        # the start time is the identity: read it while the process surely lives
        record = _record(qemu_pid=proc.pid, qemu_start_time=process_start_time(proc.pid))
        assert qemu_identity_problem(run, record) is None
        other = RunDir(tmp_path / "vm10")  # a prefix of a name is not the name
        assert qemu_identity_problem(other, record) is not None
    finally:
        proc.kill()
        proc.wait()


def test_the_run_dir_lock_holds_when_the_lock_file_is_deleted(tmp_path: Path) -> None:
    run = RunDir(tmp_path / "vm1")
    run.path.mkdir()
    fd = try_lock_dir(run.path)  # as a live supervisor holds it
    assert fd is not None
    try:
        run.lock_file.unlink(missing_ok=True)
        assert supervisor_lock_held(run.path, run.lock_file)
        assert try_lock_dir(run.path) is None
    finally:
        os.close(fd)
    assert not supervisor_lock_held(run.path, run.lock_file)


def test_stop_and_kill_carry_a_deadline_the_supervisor_checks() -> None:
    stop = decode_request(json.dumps(StopRequest(5, True, deadline=100.0).to_json()).encode())
    assert stop == StopRequest(5, True, deadline=100.0)
    kill = decode_request(json.dumps(KillRequest(deadline=100.0).to_json()).encode())
    assert expired(kill, 100.5) and not expired(kill, 99.0)
    # without a deadline (an earlier qvm's client): never expired, and no "accepted" line
    assert not expired(decode_request(b'{"op": "kill"}\n'), 1e12)
    assert "ack" not in KillRequest().to_json()
    assert isinstance(decode_reply(KillRequest(1.0), b'{"accepted": true}\n', "r"), Accepted)
    late = decode_reply(KillRequest(1.0), b'{"error": "request expired: late"}\n', "r")
    assert isinstance(late, ErrorReply)


def test_a_vcpus_lapic_path_names_the_vcpu_whoever_unplugged_it(tmp_path: Path) -> None:
    assert unplugged_vcpu({"path": "/machine/peripheral/cpu1/lapic"}) == "cpu1"
    assert unplugged_vcpu({"path": "/machine/peripheral-anon/device[3]/lapic"}) == "device[3]"
    assert unplugged_vcpu({"device": "dimm1", "path": "/machine/peripheral/dimm1"}) is None
    assert unplugged_vcpu({"path": 7}) is None
    run = RunDir(tmp_path)
    (tmp_path / "state.json").write_text(json.dumps(state_json(100, 5)))
    record_cpu_unplug(run, ["cpu1"], QemuRun(100, 5))
    assert cpu_unplugged_this_run(run)
    (tmp_path / "state.json").write_text(json.dumps(state_json(101, 9)))
    assert not cpu_unplugged_this_run(run)  # a later QEMU run


@pytest.mark.parametrize(
    ("name", "ours"),
    [
        ("state.json", True),
        ("serial.log.1", True),
        ("disk0.qcow2", True),
        (".state.json.1234.tmp", True),
        (".state.json.1234-140234.tmp", True),
        ("space.reserve", True),
        ("hotplug-disk1.qcow2", False),
        ("notes.txt", False),
        ("disk.qcow2", False),
        ("..", False),
    ],
)
def test_rm_knows_qvms_files_by_name(name: str, ours: bool) -> None:
    assert made_by_qvm(name) is ours
