"""`qvm status`/`list`/`kill`/`down`/`up` with records that cannot be read: a corrupt
``state.json`` of a VM in which provably nothing runs (qvm.ops.corrupt_state), and
machine files that cannot be read (qvm.definition.discovery, qvm.ops.status).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
from framework.harness import Qvm, short_tmpdir
from framework.jsonschema_lite import validate
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from qvm.definition.schema import Machine
from qvm.errors import (
    DefinitionError,
    NotRunningError,
    Problem,
    RecordError,
    UnsafeStateError,
    VmStateError,
)
from qvm.layout.rundir import RunDir
from qvm.ops import stop
from qvm.ops.corrupt_state import qemu_naming, set_aside_corrupt_state
from qvm.ops.status import VmStatus, vm_status
from qvm.store.state import ExitRecord, StateRecord, read_state, write_state
from qvm.supervisor.client import release_run_locks, take_run_locks

# each kind of corrupt record named in issue 19, and one whose fields are wrong
CORRUPT = {
    "empty": b"",
    "truncated": b'{"name": "vm1", "state": "stop',
    "garbage": b"\x00\xffnot json at all",
    "array": b'[{"name": "vm1"}]',
    "wrong field": b'{"name": "vm1", "state": "stopped", "qemu_pid": "123"}',
}


def corrupt_run(tmp_path: Path, content: bytes) -> RunDir:
    run = RunDir(tmp_path / "vm1")
    run.create()
    run.state_file.write_bytes(content)
    with pytest.raises(RecordError):  # it is corrupt indeed
        read_state(run.state_file)
    return run


@pytest.fixture(params=CORRUPT.values(), ids=list(CORRUPT))
def corrupt(tmp_path: Path, request: pytest.FixtureRequest) -> tuple[RunDir, bytes]:
    """A run dir of a VM running nothing, whose state.json is one of CORRUPT."""
    return corrupt_run(tmp_path, request.param), request.param


def kept(run: RunDir) -> list[Path]:
    return sorted(run.path.glob("state.json.corrupt-*"))


# --- status -------------------------------------------------------------------------------


def test_status_of_a_corrupt_record_of_a_vm_running_nothing_is_stopped(
    corrupt: tuple[RunDir, bytes],
) -> None:
    run, content = corrupt
    status = vm_status(run)
    assert isinstance(status, VmStatus)
    assert status.state == "stopped"
    (problem,) = status.problems
    assert problem.startswith(f"{run.state_file}: ")
    assert "nothing of vm1 runs (hint: qvm up vm1 moves it aside" in problem
    assert run.state_file.read_bytes() == content  # status only looks


def test_status_of_a_corrupt_record_while_the_lock_is_held_is_unknown(tmp_path: Path) -> None:
    run = corrupt_run(tmp_path, CORRUPT["garbage"])
    locks = take_run_locks(run)
    assert locks is not None
    try:
        status = vm_status(run)
    finally:
        release_run_locks(locks)
    assert status.state == "unknown"
    assert status.error is not None and status.error.startswith(f"{run.state_file}: ")


# --- up: moved aside, kept -------------------------------------------------------------------


def test_a_corrupt_record_of_a_vm_running_nothing_is_moved_aside(
    corrupt: tuple[RunDir, bytes],
) -> None:
    run, content = corrupt
    moved = set_aside_corrupt_state(run)
    assert moved is not None and kept(run) == [moved]
    assert moved.name.startswith("state.json.corrupt-2") and moved.name.endswith("Z")
    assert moved.read_bytes() == content
    assert not run.state_file.exists()
    assert vm_status(run).state == "stopped" and vm_status(run).problems == ()
    # a second corrupt record is kept beside the first, never over it
    run.state_file.write_bytes(b"[]")
    again = set_aside_corrupt_state(run)
    assert again is not None and len(kept(run)) == 2 and again.read_bytes() == b"[]"


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(content=st.binary(max_size=200) | st.text(max_size=200).map(str.encode))
def test_any_record_that_does_not_parse_is_moved_aside_and_kept(content: bytes) -> None:
    root = short_tmpdir()
    try:
        run = RunDir(root / "vm1")
        run.create()
        run.state_file.write_bytes(content)
        try:
            read_state(run.state_file)
        except RecordError:
            assert vm_status(run).state == "stopped"  # nothing of it runs
            moved = set_aside_corrupt_state(run)
            assert moved is not None and moved.read_bytes() == content
        else:  # a record after all (hypothesis rarely writes one): left alone
            assert set_aside_corrupt_state(run) is None
            assert run.state_file.read_bytes() == content
    finally:
        subprocess.run(["rm", "-rf", str(root)], check=True)


def test_a_sound_or_absent_record_is_left_alone(tmp_path: Path) -> None:
    run = RunDir(tmp_path / "vm1")
    run.create()
    assert set_aside_corrupt_state(run) is None
    assert kept(run) == []


def test_nothing_is_moved_while_the_lock_is_held(tmp_path: Path) -> None:
    run = corrupt_run(tmp_path, CORRUPT["truncated"])
    locks = take_run_locks(run)
    assert locks is not None
    try:
        with pytest.raises(VmStateError) as refused:
            set_aside_corrupt_state(run)
    finally:
        release_run_locks(locks)
    assert refused.value.file == str(run.state_file)
    assert str(refused.value).startswith(f"{run.state_file}: ")
    assert "not moved aside: a supervisor of vm1 holds its lock" in str(refused.value)
    assert run.state_file.read_bytes() == CORRUPT["truncated"] and kept(run) == []


def test_a_run_dir_that_is_a_link_is_refused_and_nothing_moved(tmp_path: Path) -> None:
    decoy = tmp_path / "decoy"
    decoy.mkdir()
    (decoy / "state.json").write_text('{"not": "qvm\'s"}')
    (tmp_path / "state").mkdir(mode=0o700)
    run = RunDir(tmp_path / "state" / "vm1")
    run.path.symlink_to(decoy)
    with pytest.raises(UnsafeStateError, match="is a symbolic link"):
        set_aside_corrupt_state(run)
    assert sorted(p.name for p in decoy.iterdir()) == ["state.json"]


@pytest.fixture
def qemu_of(tmp_path: Path) -> Iterator[RunDir]:
    """A process whose command line names vm1's QMP socket, as its QEMU's does."""
    run = RunDir(tmp_path / "vm1")
    run.create()
    code = "import sys, time; sys.stdout.write('up\\n'); sys.stdout.flush(); time.sleep(60)"
    process = subprocess.Popen(
        [sys.executable, "-c", code, f"unix:{run.qmp_socket},server=on"],
        stdout=subprocess.PIPE,
    )
    assert process.stdout is not None and process.stdout.readline() == b"up\n"
    try:
        yield run
    finally:
        process.kill()
        process.wait()


def test_nothing_is_moved_while_a_qemu_of_the_vm_runs(qemu_of: RunDir) -> None:
    run = qemu_of
    run.state_file.write_bytes(b"")
    assert qemu_naming(run) is not None
    with pytest.raises(VmStateError, match="not moved aside: a QEMU of vm1 runs"):
        set_aside_corrupt_state(run)
    assert run.state_file.exists() and kept(run) == []
    assert vm_status(run).state == "unknown"
    with pytest.raises(VmStateError, match="not signalled: a QEMU of vm1 runs"):
        stop.kill(run)


# --- kill and down ---------------------------------------------------------------------------


@pytest.mark.parametrize("content", CORRUPT.values(), ids=CORRUPT)
def test_kill_and_down_of_a_corrupt_record_say_it_is_not_running(
    tmp_path: Path, content: bytes
) -> None:
    run = corrupt_run(tmp_path, content)
    for action in (lambda: stop.kill(run), lambda: stop.stop(run, 1.0, False)):
        with pytest.raises(NotRunningError) as caught:
            action()
        assert caught.value.vm == "vm1"
        assert str(caught.value).startswith("vm1: not running (hint: ")
        assert f"{run.state_file} does not parse" in str(caught.value)
        assert "qvm up vm1 moves it aside" in str(caught.value)
    assert run.state_file.read_bytes() == content


# --- list: entries that cannot be read ------------------------------------------------------


@pytest.fixture
def machines() -> Iterator[Qvm]:
    root = short_tmpdir()
    qvm = Qvm(root)
    qvm.machine("good", "[cpu]\ncount = 1\n")
    folder = qvm.machines_dir
    (folder / "folder.toml").mkdir()
    (folder / "dangling.toml").symlink_to(folder / "nowhere.toml")
    (folder / "loop.toml").symlink_to(folder / "loop.toml")
    (folder / "latin1.toml").write_bytes(b"[cpu]\ncount = 1 # \xe9t\xe9\n")
    yield qvm
    subprocess.run(["rm", "-rf", str(root)], check=True)


def test_list_shows_entries_that_cannot_be_read_as_invalid_with_the_reason(
    machines: Qvm,
) -> None:
    done = machines("list", "--json", check=False)
    assert done.returncode == 0 and "Traceback" not in done.stderr, done.stderr
    listed = json.loads(done.stdout)
    validate(listed, "list.json")
    by_name = {entry["name"]: entry for entry in listed}
    assert by_name["good"]["state"] == "stopped" and by_name["good"]["error"] is None
    folder = machines.machines_dir
    for name, why in (
        ("folder", "a folder, not a machine file"),
        ("dangling", "a symbolic link to nothing"),
        ("loop", "cannot read: Too many levels of symbolic links"),
        ("latin1", "invalid TOML: not UTF-8 text"),
    ):
        assert by_name[name]["state"] == "invalid", by_name[name]
        assert by_name[name]["error"].startswith(f"{folder / name}.toml: {why}")
    text = machines("list")
    assert text.returncode == 0 and "Traceback" not in text.stderr
    assert "a folder, not a machine file" in text.stdout


def test_list_shows_a_file_it_may_not_read_as_invalid(
    machines: Qvm, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """Tests run as root, whom chmod 000 does not stop: the refusal is injected where the
    file is looked at (stat, as a folder without search permission refuses it)."""
    from qvm.cli import resolve
    from qvm.cli.commands import vm as vm_commands

    secret = machines.machine("secret", "[cpu]\ncount = 1\n")
    real_stat = Path.stat

    def refusing_stat(self: Path, *, follow_symlinks: bool = True) -> os.stat_result:
        if self == secret:
            raise PermissionError(13, "Permission denied", str(self))
        return real_stat(self, follow_symlinks=follow_symlinks)

    monkeypatch.setattr(Path, "stat", refusing_stat)
    monkeypatch.setenv("QVM_MACHINES", str(machines.machines_dir))
    resolve.configure(machines.machines_dir, machines.state_dir)
    try:
        vm_commands.list_vms(as_json=True)
    finally:
        resolve.configure(None, None)
    listed = json.loads(capsys.readouterr().out)
    by_name = {entry["name"]: entry for entry in listed}
    assert by_name["secret"]["state"] == "invalid"
    assert "cannot read: Permission denied" in by_name["secret"]["error"]
    assert by_name["good"]["state"] == "stopped"


# --- the definition ---------------------------------------------------------------------------


def broken_definition() -> Machine:
    raise DefinitionError([Problem("/m/vm1.toml", "cpu.count", "must be an integer")])


def test_a_vm_that_never_ran_with_a_broken_definition_is_invalid(tmp_path: Path) -> None:
    status = vm_status(RunDir(tmp_path / "vm1"), broken_definition)
    assert status.state == "invalid"
    assert status.problems == ("/m/vm1.toml: cpu.count: must be an integer",)


def test_status_says_where_a_last_record_kept_elsewhere_came_from(tmp_path: Path) -> None:
    from qvm.cli.commands.vm import _status_json, _status_text

    run = RunDir(tmp_path / "vm1")
    run.create()
    kept = "/dev/shm/qvm-0/vm1-0123abcd.state.json"
    write_state(run.state_file, stopped_record()._replace(kept_in=kept))
    status = vm_status(run)
    assert status.record_kept_in == kept
    data = _status_json(status)
    assert data["record_kept_in"] == kept
    validate(data, "status.json")
    assert f"  last record kept in {kept} (state.json refused it)" in _status_text(status)
    write_state(run.state_file, stopped_record())
    assert vm_status(run).record_kept_in is None
    assert "last record" not in _status_text(vm_status(run))


POWERED_OFF = ExitRecord(code=0, signal=None, reason="the guest powered off", failed=False, at=1.0)


def stopped_record() -> StateRecord:
    """The record of vm1, stopped after the guest powered off."""
    record: StateRecord = StateRecord(
        name="vm1",
        machine_file="/m/vm1.toml",
        accel="tcg",
        accel_reason="no KVM",
        supervisor_pid=os.getpid(),
        supervisor_start_time=None,
        state="stopped",
        restarts=0,
        exit=POWERED_OFF,
        crash_reason=None,
    )
    return record


def test_a_vm_that_ran_keeps_its_state_and_says_its_definition_is_broken(
    tmp_path: Path,
) -> None:
    run = RunDir(tmp_path / "vm1")
    run.create()
    write_state(run.state_file, stopped_record())
    status = vm_status(run, broken_definition)
    assert (status.state, status.reason) == ("stopped", "the guest powered off")
    assert status.problems == ("/m/vm1.toml: cpu.count: must be an integer",)
