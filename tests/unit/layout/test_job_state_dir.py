"""In a Slurm job, qvm's state dir is the job's (or the array task's): two tasks never
share a VM, and the run dirs below it stay short enough for unix sockets."""
# ruff: noqa: S108 -- /tmp/qvm-UID is the folder these tests are about

from __future__ import annotations

import os
from pathlib import Path

import pytest

from qvm.layout.names import is_vm_name
from qvm.layout.rundir import MAX_SOCKET_PATH, default_state_dir, job_state_dir, run_dir_for
from qvm.ops.run import throwaway_name

ROOT = Path(f"/tmp/qvm-{os.getuid()}")


def test_a_job_and_each_array_task_get_a_folder_of_their_own() -> None:
    assert job_state_dir({}) is None
    assert job_state_dir({"SLURM_JOB_ID": "4711"}) == ROOT / "job.4711"
    task = {"SLURM_JOB_ID": "4712", "SLURM_ARRAY_TASK_ID": "3"}
    assert job_state_dir(task) == ROOT / "job.4712.3"
    other = {"SLURM_JOB_ID": "4712", "SLURM_ARRAY_TASK_ID": "4"}
    assert job_state_dir(other) != job_state_dir(task)
    assert not is_vm_name("job.4711")  # never listed as a VM


@pytest.mark.parametrize("job", ["", "../x", "1/2", "١٢", "12 3"])
def test_a_job_id_that_is_not_a_number_never_becomes_a_path(job: str) -> None:
    assert job_state_dir({"SLURM_JOB_ID": job}) is None
    assert job_state_dir({"SLURM_JOB_ID": "7", "SLURM_ARRAY_TASK_ID": job}) in (
        ROOT / "job.7",
        None,
    )


@pytest.mark.parametrize("name", ["a" * 40, throwaway_name("a" * 63)])
def test_the_sockets_of_a_vm_in_a_job_fit(monkeypatch: pytest.MonkeyPatch, name: str) -> None:
    """The largest uid, a job id past Slurm's MaxJobId (8 digits), a 5-digit array task:
    every socket path stays within sun_path, whatever the home folder."""
    monkeypatch.setattr(os, "getuid", lambda: 4294967294)
    root = job_state_dir({"SLURM_JOB_ID": "123456789", "SLURM_ARRAY_TASK_ID": "99999"})
    assert root is not None
    run = run_dir_for(root, name)
    longest = max(len(os.fsencode(str(s))) for s in run.sockets())
    assert longest <= MAX_SOCKET_PATH, longest


def test_qvm_state_dir_wins_over_the_job(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("SLURM_JOB_ID", "99")
    monkeypatch.setenv("XDG_STATE_HOME", "/s")
    monkeypatch.delenv("SLURM_ARRAY_TASK_ID", raising=False)
    monkeypatch.delenv("QVM_STATE_DIR", raising=False)
    assert default_state_dir() == ROOT / "job.99"
    monkeypatch.delenv("SLURM_JOB_ID")
    assert default_state_dir() == Path("/s/qvm")
    monkeypatch.setenv("QVM_STATE_DIR", "/mine")
    assert default_state_dir() == Path("/mine")
