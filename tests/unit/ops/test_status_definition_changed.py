"""`status` shows whether a running VM's machine file changed since it started, by the
file's contents (``definition_changed``), in JSON and in the human text."""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import pytest
from framework.fake_qmp import launch_record

from qvm.base.digest import file_sha256
from qvm.layout.rundir import RunDir
from qvm.store.launch import write_launch
from qvm.store.state import StateRecord
from qvm.store.view import ViewRecord, write_view
from qvm.supervisor import wire


def running_vm(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> tuple[RunDir, Path]:
    """A run dir of vm1, started from ``vm1.toml``, whose supervisor answers "running"
    (and has recorded so in view.json)."""
    from qvm.ops import status

    path = tmp_path / "vm1.toml"
    path.write_text("[cpu]\ncount = 1\n")
    run = RunDir(tmp_path / "vm1")
    run.create()
    write_launch(
        run.launch_file,
        launch_record(
            machine_file=str(path), created=time.time(), definition_sha256=file_sha256(path)
        ),
    )
    record = StateRecord(
        name="vm1", machine_file=str(path), accel="tcg", accel_reason="test",
        supervisor_pid=4321, supervisor_start_time=99, state="running", restarts=0,
        exit=None, crash_reason=None, qemu_pid=4242, qemu_start_time=7,
        started_at=time.time(),
    )  # fmt: skip
    run.state_file.write_text(json.dumps(record.to_json()))
    cpu = {"qom-path": "/machine/unattached/device[0]", "cpu-index": 0, "thread-id": 1}
    write_view(run.view_file, ViewRecord("vm1", 4242, 7, time.time(), cpus_fast=(cpu,)))

    def answer(*args: Any, **kwargs: Any) -> wire.StatusReply:
        return wire.StatusReply(record, vcpus_present=1)

    monkeypatch.setattr(status, "supervisor_alive", lambda run: True)
    monkeypatch.setattr(status, "ask_supervisor", answer)
    return run, path


def test_status_says_definition_changed_by_contents(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from qvm.ops.status import vm_status

    run, path = running_vm(tmp_path, monkeypatch)
    assert vm_status(run).definition_changed is False
    path.write_text(path.read_text())  # saved unchanged: a newer time, the same contents
    assert vm_status(run).definition_changed is False
    path.write_text("[cpu]\ncount = 2\n")
    assert vm_status(run).definition_changed is True
    path.write_text("[cpu]\ncount = 1\n")  # reverted
    assert vm_status(run).definition_changed is False


def test_the_human_status_marks_a_changed_definition(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    from qvm.cli import resolve
    from qvm.cli.commands import vm

    run, path = running_vm(tmp_path, monkeypatch)
    monkeypatch.setattr(resolve, "run_dir_of", lambda name: run)
    monkeypatch.setattr(resolve, "run_dir", lambda name: run)
    monkeypatch.setattr("qvm.ops.status.with_guest_facts", lambda facts: facts)
    vm.status(["vm1"], as_json=False, live=False, every=False, jobs=None)
    assert f"  definition  {path}\n" in capsys.readouterr().out
    path.write_text("[cpu]\ncount = 2\n")
    vm.status(["vm1"], as_json=False, live=False, every=False, jobs=None)
    said = capsys.readouterr()
    assert f"  definition  {path} (changed since it started)\n" in said.out
    assert "changed since vm1 was started (hint: qvm restart vm1" in said.err
