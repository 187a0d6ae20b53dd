"""The supervisor's last record (how QEMU ended) outlives a state dir that refuses it
(EIO, EROFS, ENOSPC): tried again, then kept elsewhere, and taken from there by the next
command that finds the supervisor gone, which says where it came from (``kept_in``).

The faults are injected where the file system would raise them: the rename that puts a
new state.json in place fails with the errno, for files of the run dir only."""

from __future__ import annotations

import errno
import os
from collections.abc import Iterator
from pathlib import Path

import pytest
from framework.fake_qmp import launch_record

from qvm.layout.rundir import RunDir
from qvm.layout.runfiles import RunFiles
from qvm.store import state as state_module
from qvm.store.state import read_state
from qvm.supervisor.client import clean_stale
from qvm.supervisor.process import Supervisor


class Faults:
    """``os.replace`` into ``folder`` fails with ``error`` while ``error`` is set."""

    def __init__(self, folder: Path) -> None:
        self.folder = str(folder)
        self.error: int | None = None
        self.refused = 0


@pytest.fixture
def faults(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Faults]:
    monkeypatch.setenv("XDG_RUNTIME_DIR", str(tmp_path / "runtime"))
    (tmp_path / "runtime").mkdir(mode=0o700)
    injected = Faults(tmp_path / "vm1")
    real_replace = os.replace

    def replace(src: str, dst: str) -> None:
        if injected.error is not None and os.path.dirname(os.fspath(dst)) == injected.folder:
            injected.refused += 1
            raise OSError(injected.error, os.strerror(injected.error), dst)
        real_replace(src, dst)

    monkeypatch.setattr(os, "replace", replace)
    yield injected


def running_supervisor(tmp_path: Path) -> Supervisor:
    run = RunDir(tmp_path / "vm1")
    run.path.mkdir()
    sup = Supervisor(RunFiles(str(run.path)), launch_record(), ready_fd=None)
    sup.run_started = 1.0
    sup.save_state(state="running")
    return sup


@pytest.mark.parametrize("error", [errno.EIO, errno.EROFS, errno.ENOSPC], ids=errno.errorcode.get)
def test_the_last_record_is_kept_elsewhere_and_status_takes_it_from_there(
    tmp_path: Path, faults: Faults, error: int
) -> None:
    sup = running_supervisor(tmp_path)
    run = RunDir(tmp_path / "vm1")
    faults.error = error
    sup.shutdown_event = {"reason": "guest-shutdown"}
    sup._record_exit(0, reached_qmp=True, first=False)
    assert faults.refused == 2  # tried again before keeping it elsewhere
    kept = tmp_path / "runtime" / "qvm" / state_module._fallback_name(run.path)
    assert sup.kept_in == str(kept)
    assert read_state(run.state_file).state == "running"  # what the disk still says

    # the supervisor is gone; the state dir still refuses: the kept record is the answer
    state = clean_stale(run)
    assert state is not None
    assert (state.state, state.ended_reason, state.kept_in) == (
        "stopped",
        "the guest powered off",
        str(kept),
    )

    # the state dir takes it again: the record goes back into state.json, saying where
    # it had been kept, and the kept copy goes
    faults.error = None
    assert clean_stale(run) == state
    on_disk = read_state(run.state_file)
    assert on_disk is not None
    assert (on_disk.state, on_disk.kept_in) == ("stopped", str(kept))
    assert not kept.exists()


def test_a_write_that_works_again_drops_the_kept_copy(tmp_path: Path, faults: Faults) -> None:
    sup = running_supervisor(tmp_path)
    faults.error = errno.EIO
    sup.save_state(state="paused")
    assert sup.kept_in is not None and os.path.exists(sup.kept_in)
    kept = sup.kept_in
    faults.error = None
    sup.save_state(state="running")
    assert sup.kept_in is None and not os.path.exists(kept)
    state = read_state(RunDir(tmp_path / "vm1").state_file)
    assert state is not None and (state.state, state.kept_in) == ("running", None)


def test_a_kept_record_of_another_supervisor_is_not_taken(tmp_path: Path, faults: Faults) -> None:
    sup = running_supervisor(tmp_path)
    run = RunDir(tmp_path / "vm1")
    faults.error = errno.EIO
    sup._record_exit(0, reached_qmp=True, first=False)
    faults.error = None
    # a later supervisor of the same run dir (another start time) that died silently
    newer = sup.state._replace(state="running", supervisor_start_time=12345, kept_in=None)
    state_module.write_state(run.state_file, newer)
    state = clean_stale(run)
    assert state is not None
    assert state.state == "crashed" and state.kept_in is None
    assert "ended without its last record" in (state.crash_reason or "")


def test_a_fallback_folder_someone_else_can_write_is_not_used(
    tmp_path: Path, faults: Faults
) -> None:
    os.chmod(tmp_path / "runtime", 0o777)
    (tmp_path / "runtime" / "qvm").mkdir(mode=0o777)
    os.chmod(tmp_path / "runtime" / "qvm", 0o777)
    assert not state_module._ours(str(tmp_path / "runtime" / "qvm"))
    assert state_module._ours(str(tmp_path))
