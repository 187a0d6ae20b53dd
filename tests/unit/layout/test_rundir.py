"""State-file handling: atomic writes, unreadable files, locks, stale runs."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from qvm.base.jsonfile import read_json, write_json_atomic
from qvm.base.proc import process_start_time, same_process_alive
from qvm.errors import HostError
from qvm.layout.locks import is_locked, try_lock
from qvm.layout.rundir import RunDir
from qvm.supervisor.client import clean_stale


def test_atomic_write_replaces_whole_file_and_leaves_no_temp(tmp_path: Path) -> None:
    target = tmp_path / "state.json"
    write_json_atomic(target, {"state": "running"})
    write_json_atomic(target, {"state": "stopped", "restarts": 2})
    assert json.loads(target.read_text()) == {"restarts": 2, "state": "stopped"}
    assert [p.name for p in tmp_path.iterdir()] == ["state.json"]


def test_read_json_tolerates_missing_corrupt_and_non_object(tmp_path: Path) -> None:
    assert read_json(tmp_path / "missing.json") is None
    (tmp_path / "bad.json").write_text('{"state": "runn')
    assert read_json(tmp_path / "bad.json") is None
    (tmp_path / "list.json").write_text("[1, 2]")
    assert read_json(tmp_path / "list.json") is None


def test_lock_is_held_by_one_process_at_a_time(tmp_path: Path) -> None:
    lock = tmp_path / "supervisor.lock"
    assert not is_locked(lock)
    fd = try_lock(lock)
    assert fd is not None
    # another process cannot take it while we hold it...
    probe = [
        sys.executable,
        "-c",
        "import sys, pathlib, qvm.layout.locks as r; print(r.is_locked(pathlib.Path(sys.argv[1])))",
        str(lock),
    ]
    assert subprocess.run(probe, capture_output=True, text=True).stdout.strip() == "True"
    os.close(fd)
    # ...and it is free again the moment the holder's fd is gone, whatever its pid
    assert not is_locked(lock)


def test_run_dir_is_private_and_refuses_socket_paths_too_long(tmp_path: Path) -> None:
    run = RunDir(tmp_path / "vm1")
    run.create()
    assert (run.path.stat().st_mode & 0o777) == 0o700
    deep = RunDir(tmp_path / ("d" * 90) / "vm1")
    with pytest.raises(HostError, match=r"too long for unix sockets .* set QVM_STATE_DIR"):
        deep.create()


def test_process_identity_includes_start_time() -> None:
    me = os.getpid()
    start = process_start_time(me)
    assert start is not None
    assert same_process_alive(me, start)
    assert not same_process_alive(me, start + 1)  # same pid, another process: pid reuse
    assert not same_process_alive(None, None)


def test_stale_state_of_a_dead_supervisor_is_recorded_and_cleaned(tmp_path: Path) -> None:
    run = RunDir(tmp_path / "vm1")
    run.create()
    dead = subprocess.Popen(["true"])
    dead.wait()
    write_json_atomic(
        run.state_file,
        {"name": "vm1", "state": "running", "supervisor_pid": 999999, "restarts": 0,
         "qemu_pid": dead.pid, "qemu_start_time": 1},
    )  # fmt: skip
    run.qmp_socket.write_text("")  # a socket file left behind by a killed QEMU
    state = clean_stale(run)
    assert state is not None
    assert state.state == "crashed"
    assert state.exit is not None
    assert state.exit.reason == (
        "supervisor (pid 999999) ended without its last record "
        "(killed, or the state dir refused the write; see supervisor.log)"
    )
    assert read_json(run.state_file)["state"] == "crashed"
    assert not run.qmp_socket.exists()


def test_live_supervisor_state_is_not_touched(tmp_path: Path) -> None:
    run = RunDir(tmp_path / "vm1")
    run.create()
    write_json_atomic(
        run.state_file, {"name": "vm1", "state": "running", "supervisor_pid": 1, "restarts": 0}
    )
    fd = try_lock(run.lock_file)  # we play the live supervisor
    try:
        state = clean_stale(run)
        assert state is not None and state.state == "running"
    finally:
        os.close(fd)  # type: ignore[arg-type]
