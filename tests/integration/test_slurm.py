"""`qvm slurm` and `qvm up --foreground` under a real Slurm: the one-node Slurm 22.05
cluster of scripts/slurm-cluster (slurmctld, slurmd, munge from Debian) on this machine.

The jobs run with no QVM_STATE_DIR, as on a cluster: each task picks its own state dir
under $XDG_STATE_HOME/qvm (job.ID.TASK), where the template's snapshot was saved before
the job. What is checked is what the guest said (its program's output and exit code,
its serial log), what Slurm said, and that no QEMU and no run dir is left after scancel.

Skipped, saying why, only where Slurm cannot be installed (scripts/slurm-cluster needs
root and apt). The time-limit job is submitted first and checked last: Slurm's time
limit is at least a minute, so it runs while the other tests do.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from framework.guest import Serial
from framework.harness import GUEST_DIR, QVM_BIN, REPO, Qvm, processes_with, short_tmpdir
from framework.wait import wait_until

pytestmark = pytest.mark.integration

CLUSTER = REPO / "scripts" / "slurm-cluster"
# what scripts/slurm-cluster says when it cannot install Slurm here (or, not root, cannot
# run it)
CANNOT_INSTALL = ("apt-get could not install", "missing Debian packages", "needs root")
ENDED = ("exited", "timeout", "cancelled", "failed")


@pytest.fixture(scope="module")
def slurm() -> Iterator[None]:
    """The cluster up for this module; taken down again unless it was up before (then
    another session owns it)."""
    if shutil.which("apt-get") is None and shutil.which("slurmctld") is None:
        pytest.skip("Slurm is not installed and there is no apt-get to install it")
    was_up = subprocess.run([str(CLUSTER), "status"], check=False).returncode == 0
    done = subprocess.run(
        [str(CLUSTER), "up"], capture_output=True, text=True, timeout=300, check=False
    )
    if done.returncode != 0:
        if any(reason in done.stderr for reason in CANNOT_INSTALL):
            pytest.skip(f"Slurm cannot be installed here: {done.stderr.strip()}")
        pytest.fail(f"scripts/slurm-cluster up failed:\n{done.stderr}")
    yield
    if not was_up:
        subprocess.run([str(CLUSTER), "down"], timeout=120, check=False)


class JobQvm(Qvm):
    """The harness with no QVM_STATE_DIR: the CLI here uses $XDG_STATE_HOME/qvm, the
    jobs' tasks a folder each on the node's disk, /tmp/qvm-UID/job.ID[.TASK], with ID the
    task's own job id (ids only grow: the jobs of this module have ids from ``first_job``
    on)."""

    first_job: int | None = None

    @property
    def state_dir(self) -> Path:
        return self.root / "xdg" / "qvm"

    def env(self) -> dict[str, str]:
        env = super().env()
        del env["QVM_STATE_DIR"]
        env["XDG_STATE_HOME"] = str(self.root / "xdg")
        return env

    def submitted(self, job: int) -> int:
        if self.first_job is None:
            self.first_job = job
        return job

    def job_dirs(self) -> list[Path]:
        return [d for d in JOB_DIRS.glob("job.*") if self._ours(d.name.split(".")[1])]

    def left_in_job_dirs(self, *jobs: int) -> list[str]:
        """What the `qvm run` tasks of the jobs (``jobs``, or all) left on the node: nothing,
        not even their folders, whichever way they ended."""
        return [str(d) for d in self.job_dirs() if not jobs or int(d.name.split(".")[1]) in jobs]

    def job_processes(self, *jobs: int) -> list[tuple[int, str]]:
        """Live processes (QEMU, supervisors) of the jobs' VMs: of ``jobs``, or of all."""
        found = []
        for pid, cmd in processes_with(f"{JOB_DIRS}/job."):
            job = cmd.split(f"{JOB_DIRS}/job.", 1)[1].split(".")[0].split("/")[0]
            if self._ours(job) and (not jobs or int(job) in jobs):
                found.append((pid, cmd))
        return found

    def _ours(self, job: str) -> bool:
        return job.isdigit() and self.first_job is not None and int(job) >= self.first_job


JOB_DIRS = Path(f"/tmp/qvm-{os.getuid()}")


@pytest.fixture(scope="module")
def cluster_qvm(slurm: None) -> Iterator[JobQvm]:
    if not (GUEST_DIR / "vmlinuz").exists():
        pytest.fail(f"no test guest in {GUEST_DIR} (run scripts/build-test-guest)")
    root = short_tmpdir()
    root.chmod(0o755)
    qvm = JobQvm(root)
    qvm.guest_machine("g1", count=1, max=1, memory="256M")
    yield qvm
    with contextlib.suppress(subprocess.SubprocessError):
        subprocess.run(["scancel", "--name=qvm-g1"], timeout=30, check=False)
    survivors = qvm.cleanup()
    with contextlib.suppress(AssertionError):
        wait_until(lambda: not qvm.job_processes(), 40, "the jobs' VMs to end")  # KillWait
    survivors += qvm.job_processes()
    for pid, _ in survivors:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
    for folder in qvm.job_dirs():
        shutil.rmtree(folder, ignore_errors=True)
    shutil.rmtree(root, ignore_errors=True)
    assert not survivors, f"processes survived the tests' cleanup: {survivors}"


@pytest.fixture(scope="module")
def template(cluster_qvm: JobQvm) -> str:
    """g1 booted once, saved with its memory as g1@ready, and stopped: the tasks' source."""
    qvm = cluster_qvm
    qvm("up", "g1")
    qvm("wait", "g1", "--for", "agent", "--timeout", "120")
    qvm("snapshot", "save", "g1", "ready")
    qvm("down", "g1")
    return "g1@ready"


def submit(qvm: JobQvm, *args: str) -> int:
    done = qvm("slurm", "submit", *args)
    return qvm.submitted(int(done.stdout.split()[-1]))


def job_status(qvm: JobQvm, job: int, command: str = "status") -> dict[str, Any]:
    done = qvm("slurm", command, str(job), "--json", check=False)
    assert "Traceback" not in done.stderr
    data: dict[str, Any] = json.loads(done.stdout)
    return data


def wait_ended(qvm: JobQvm, job: int, timeout: float) -> dict[str, Any]:
    """`qvm slurm results JOB --json` once every task has ended and Slurm agrees."""

    def ended() -> dict[str, Any] | None:
        report = job_status(qvm, job, "results")
        done = all(
            t["state"] in ENDED and t["slurm_state"] not in ("RUNNING", "COMPLETING")
            for t in report["tasks"]
        )
        return report if done else None

    report: dict[str, Any] = wait_until(ended, timeout, f"job {job}'s tasks to end", 0.5)
    return report


@pytest.fixture(scope="module")
def time_limited(cluster_qvm: JobQvm, template: str) -> tuple[int, float]:
    """A task that outlives its time limit (one minute, Slurm's least), submitted
    first so that it runs while the other tests do."""
    job = submit(cluster_qvm, "g1", "--from", template, "--time", "1", "--", "sleep", "600")
    return job, time.monotonic()


def test_an_array_of_runs_from_one_snapshot(
    cluster_qvm: JobQvm, template: str, time_limited: tuple[int, float]
) -> None:  # time_limited: submitted first, so that it runs meanwhile
    qvm = cluster_qvm
    # in the guest: the task's variables as the guest sees them; task 2 fails on purpose
    script = (
        'echo "task=$SLURM_ARRAY_TASK_ID job=$SLURM_ARRAY_JOB_ID";'
        ' [ "$SLURM_ARRAY_TASK_ID" != 2 ] || exit 3'
    )
    job = submit(qvm, "g1", "--from", template, "--array", "4", "--", "sh", "-c", script)
    report = wait_ended(qvm, job, 150)
    tasks = {t["task"]: t for t in report["tasks"]}
    assert sorted(tasks) == [0, 1, 2, 3]
    for index, task in tasks.items():
        # the guest's own word: the program ran in the VM with Slurm's variables
        assert task["stdout"] == f"task={index} job={job}\n", task
        assert task["state"] == "exited" and task["node"]
    assert {i: t["exit_code"] for i, t in tasks.items()} == {0: 0, 1: 0, 2: 3, 3: 0}
    assert [tasks[i]["slurm_state"] for i in range(4)] == [
        "COMPLETED",
        "COMPLETED",
        "FAILED",
        "COMPLETED",
    ]
    assert report["counts"] == {"exited": 4}
    assert qvm("slurm", "results", str(job), check=False).returncode == 1  # task 2 failed
    results = Path(report["results"])
    assert results == qvm.root / "qvm-results" / str(job)
    assert sorted(p.name for p in results.glob("task-*.json")) == [
        f"task-{i}.json" for i in range(4)
    ]
    # the tasks' own job ids: the array's and the next ones (the tests submit one by one)
    assert qvm.left_in_job_dirs(*range(job, job + 4)) == []


def test_scancel_cancels_every_task_and_leaves_nothing(cluster_qvm: JobQvm, template: str) -> None:
    qvm = cluster_qvm
    job = submit(qvm, "g1", "--from", template, "--array", "3", "--", "sleep", "600")

    def running() -> bool:
        tasks = job_status(qvm, job)["tasks"]
        return any(t["state"] == "running" for t in tasks)

    wait_until(running, 60, f"a task of job {job} to run", 0.5)
    time.sleep(3)  # into its run: the VM up, the program started
    subprocess.run(["scancel", str(job)], check=True, timeout=30)
    report = wait_ended(qvm, job, 60)
    states = {t["task"]: (t["state"], t["slurm_state"]) for t in report["tasks"]}
    assert set(states.values()) == {("cancelled", "CANCELLED")}, states
    ran = [t for t in report["tasks"] if Path(t["result"]).exists()]
    assert ran, "no task ran before scancel"
    for task in ran:
        # the run itself recorded the SIGTERM that scancel sent, and tore its VM down
        assert json.loads(Path(task["result"]).read_text())["state"] == "cancelled"
        assert task["error"] == "cancelled by SIGTERM"
    never = [t for t in report["tasks"] if not Path(t["result"]).exists()]
    assert all(t["error"] == "cancelled before it started" for t in never)
    task_ids = range(job, job + 3)  # the tasks' own job ids: the array's and the next ones
    wait_until(lambda: not qvm.job_processes(*task_ids), 10, "no QEMU of the job")
    assert qvm.left_in_job_dirs(*task_ids) == []


def test_a_foreground_vm_cancelled_powers_off(cluster_qvm: JobQvm) -> None:
    qvm = cluster_qvm
    script = qvm.root / "fg.sh"
    script.write_text(
        "#!/bin/bash\n"
        "#SBATCH --job-name=qvm-g1\n"
        "#SBATCH --cpus-per-task=1\n"
        "#SBATCH --mem=512M\n"
        f"#SBATCH --output={qvm.root}/fg-%j.out\n"
        f"exec {QVM_BIN} up --foreground g1\n"
    )
    done = subprocess.run(
        ["sbatch", "--parsable", str(script)],
        env=qvm.env(),
        cwd=qvm.root,
        capture_output=True,
        text=True,
        timeout=30,
        check=True,
    )
    job = qvm.submitted(int(done.stdout.strip().split(";")[0]))
    state = JOB_DIRS / f"job.{job}"  # not an array: no task id in its name
    serial = Serial(state / "g1" / "serial.log")
    serial.wait_ready(90)
    subprocess.run(["scancel", str(job)], check=True, timeout=30)
    # the guest's own word: it got the power button and went down in order
    wait_until(lambda: serial.guest().powered_off, 30, "the guest's power-off")
    wait_until(lambda: not qvm.job_processes(job), 15, "no QEMU of the job")
    status = json.loads(
        subprocess.run(
            [str(QVM_BIN), "status", "g1", "--json"],
            env={**qvm.env(), "QVM_STATE_DIR": str(state)},
            capture_output=True,
            text=True,
            timeout=30,
            check=False,
        ).stdout
    )
    assert status["state"] == "stopped", status
    assert status["last_exit"]["ended_by"] == "acpi", status


def test_a_task_past_its_time_limit(cluster_qvm: JobQvm, time_limited: tuple[int, float]) -> None:
    qvm = cluster_qvm
    job, submitted = time_limited
    report = wait_ended(qvm, job, max(10.0, 150 - (time.monotonic() - submitted)))
    (task,) = report["tasks"]
    assert task["state"] == "timeout" and task["slurm_state"] == "TIMEOUT", task
    assert task["error"] == "Slurm's time limit (--time) ended it: cancelled by SIGTERM"
    # the run got Slurm's SIGTERM, powered its VM off and said so in its result
    assert json.loads(Path(task["result"]).read_text())["state"] == "cancelled"
    wait_until(lambda: not qvm.job_processes(job), 10, "no QEMU of the job")
    assert qvm.left_in_job_dirs(job) == []
