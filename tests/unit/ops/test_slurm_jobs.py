"""qvm.ops.slurm: the batch script (run by the real bash, with a fake qvm that reports the
words it got), what a task asks Slurm for, the submission against fake sbatch/scontrol,
and how Slurm's word and the result files merge into each task's report."""

from __future__ import annotations

import json
import os
import stat
import subprocess
from pathlib import Path

import pytest
from framework.fake_tools import calls, fake_tool
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from qvm.definition.schema import CpuSpec, Machine, MemorySpec
from qvm.errors import HostError, QvmError, UsageError
from qvm.host.slurm import SlurmTask
from qvm.layout.rundir import RunDir
from qvm.ops import slurm as ops
from qvm.ops.slurm import (
    BatchSpec,
    Resources,
    batch_script,
    job_report,
    plan_submit,
    resources_of,
    submit,
    task_report,
)
from qvm.store.fields import Fields
from qvm.store.run_result import RunResult, write_run_result
from qvm.store.slurm_job import read_slurm_job

MIB = 1024**2


def machine(tmp_path: Path, cpus: int = 1, ram: int = 256 * MIB) -> Machine:
    return Machine(
        name="vm1",
        path=tmp_path / "machines" / "vm1.toml",
        cpu=CpuSpec(count=cpus, max=4),
        memory=MemorySpec(size=ram),
    )


def spec(tmp_path: Path, command: tuple[str, ...] = ("echo", "hi"), **changes: object) -> BatchSpec:
    base = BatchSpec(
        qvm=(str(tmp_path / "bin" / "qvm"),),
        name="vm1",
        source=None,
        command=command,
        tasks=4,
        resources=Resources(1, 512),
        machines=(str(tmp_path / "machines"),),
        results=str(tmp_path / "results"),
        per_job=True,
    )
    return base._replace(**changes)


# --- what a task asks for ----------------------------------------------------------------


def test_a_cpu_per_vcpu_and_ram_plus_qemu_s_overhead(tmp_path: Path) -> None:
    assert resources_of(machine(tmp_path), None, None) == Resources(1, 256 + 256)
    assert resources_of(machine(tmp_path, 2, 1024 * MIB), None, None) == Resources(2, 1280)
    # a snapshot's vCPUs and RAM (hotplugged ones were saved with it) win
    assert resources_of(machine(tmp_path), 3, 512 * MIB) == Resources(3, 768)
    # a part of a MiB is a whole one
    assert resources_of(machine(tmp_path, 1, 100 * MIB + 1), None, None).mem_mib == 357


# --- the script, run by bash ---------------------------------------------------------------


def run_script(tmp_path: Path, script: str, env: dict[str, str]) -> dict[str, object]:
    """Run the batch script as Slurm would (bash, the job's variables); the fake qvm
    writes the argv and QVM_MACHINES it got."""
    fake = tmp_path / "bin" / "qvm"
    fake.parent.mkdir(exist_ok=True)
    out = tmp_path / "argv.json"
    fake.write_text(
        "#!/usr/bin/env python3\nimport json, os, sys\n"
        f"json.dump({{'argv': sys.argv[1:], 'machines': os.environ.get('QVM_MACHINES'),"
        f" 'pid': os.getpid()}}, open({str(out)!r}, 'w'))\n"
    )
    fake.chmod(fake.stat().st_mode | stat.S_IXUSR)
    path = tmp_path / "job.sh"
    path.write_text(script)
    done = subprocess.run(
        ["bash", str(path)],
        env={"PATH": os.environ["PATH"], **env},
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    result: dict[str, object] = json.loads(out.read_text())
    return result


JOB_ENV = {"SLURM_JOB_ID": "13", "SLURM_ARRAY_JOB_ID": "12", "SLURM_ARRAY_TASK_ID": "1"}


def test_the_script_execs_qvm_run_with_the_job_s_variables(tmp_path: Path) -> None:
    script = batch_script(spec(tmp_path, source="vm1@booted", partition="debug", time_limit="5"))
    lines = script.splitlines()
    assert lines[0] == "#!/bin/bash"
    sbatch = [line.removeprefix("#SBATCH ") for line in lines if line.startswith("#SBATCH")]
    assert sbatch == [
        "--job-name=qvm-vm1",
        "--array=0-3",
        "--cpus-per-task=1",
        "--mem=512M",
        f'--output="{tmp_path}/results/%A/task-%a.out"',
        "--partition=debug",
        "--time=5",
    ]
    got = run_script(tmp_path, script, JOB_ENV)
    assert got["argv"] == [
        "run",
        "vm1",
        "--from",
        "vm1@booted",
        "--result",
        f"{tmp_path}/results/12/task-1.json",
        "--env",
        "SLURM_JOB_ID=13",
        "--env",
        "SLURM_ARRAY_JOB_ID=12",
        "--env",
        "SLURM_ARRAY_TASK_ID=1",
        "--",
        "echo",
        "hi",
    ]
    assert got["machines"] == f"{tmp_path}/machines"
    assert "exec " in script  # Slurm's SIGTERM must reach qvm run, not a shell above it


def test_a_given_results_folder_is_used_as_it_is(tmp_path: Path) -> None:
    folder = tmp_path / "my results"
    script = batch_script(spec(tmp_path, results=str(folder), per_job=False))
    assert f'#SBATCH --output="{folder}/task-%a.out"' in script
    got = run_script(tmp_path, script, JOB_ENV)
    argv = got["argv"]
    assert isinstance(argv, list) and argv[argv.index("--result") + 1] == f"{folder}/task-1.json"


@settings(
    max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(
    st.lists(
        st.text(
            st.characters(blacklist_categories=("Cs",), blacklist_characters="\x00"), max_size=12
        ),
        min_size=1,
        max_size=5,
    )
)
def test_every_word_of_the_command_reaches_qvm_run_as_it_was(
    tmp_path: Path, command: list[str]
) -> None:
    got = run_script(tmp_path, batch_script(spec(tmp_path, tuple(command))), JOB_ENV)
    argv = got["argv"]
    assert isinstance(argv, list) and argv[argv.index("--") + 1 :] == command


# --- checks before anything is submitted ----------------------------------------------------


def plan(tmp_path: Path, **changes: object) -> BatchSpec:
    values: dict[str, object] = {
        "machine": machine(tmp_path),
        "source": None,
        "template_run": None,
        "command": ["true"],
        "tasks": 2,
        "qvm": ["/usr/bin/qvm"],
        "results": None,
        "cwd": tmp_path,
    }
    values.update(changes)
    return plan_submit(**values)  # type: ignore[arg-type]


def test_the_plan_defaults(tmp_path: Path) -> None:
    planned = plan(tmp_path)
    assert planned.results == str(tmp_path / "qvm-results") and planned.per_job
    assert planned.machines == (str(tmp_path / "machines"),)
    relative = plan(tmp_path, results=Path("out"))
    assert relative.results == str(tmp_path / "out") and not relative.per_job


@pytest.mark.parametrize(
    "changes,message",
    [
        ({"tasks": 0}, "--array: at least 1 task, got 0"),
        ({"command": []}, "no program given"),
        ({"partition": "a b"}, "--partition: must be one word"),
        ({"time_limit": "5\n#SBATCH --mem=1"}, "--time: must be one word"),
        ({"results": Path("100%")}, "Slurm reads % as a file name pattern"),
        ({"results": Path('a"b')}, "cannot hold"),
    ],
)
def test_bad_values_are_usage_errors(
    tmp_path: Path, changes: dict[str, object], message: str
) -> None:
    with pytest.raises(UsageError, match=message):
        plan(tmp_path, **changes)


def test_an_unknown_snapshot_is_refused_before_submitting(tmp_path: Path) -> None:
    template = RunDir(tmp_path / "state" / "vm1")
    with pytest.raises(QvmError, match="--from vm1@booted: no snapshot .booted.") as caught:
        plan(tmp_path, source="vm1@booted", template_run=template)
    assert caught.value.hint is not None and "qvm snapshot save vm1 booted" in caught.value.hint


# --- submitting, against fake Slurm tools ---------------------------------------------------


def test_submit_holds_writes_job_json_then_releases(tmp_path: Path, fake_tools: Path) -> None:
    fake_tool(fake_tools, "sbatch", "cat > /dev/null; echo 77")
    fake_tool(fake_tools, "scontrol", "")
    done = submit(spec(tmp_path))
    assert done.job_id == 77 and done.results == str(tmp_path / "results" / "77")
    assert calls(fake_tools) == ["sbatch --parsable --hold", "scontrol release 77"]
    record = read_slurm_job(done.results)
    assert record is not None and record.job_id == 77 and record.tasks == 4
    assert record.command == ("echo", "hi") and record.mem_mib == 512


def test_a_failed_release_cancels_the_held_job(tmp_path: Path, fake_tools: Path) -> None:
    fake_tool(fake_tools, "sbatch", "cat > /dev/null; echo 78")
    fake_tool(
        fake_tools, "scontrol", "echo 'slurm_release error: Access/permission denied' >&2; exit 1"
    )
    fake_tool(fake_tools, "scancel", "")
    with pytest.raises(HostError, match="scontrol release: slurm_release error"):
        submit(spec(tmp_path))
    assert calls(fake_tools)[-1] == "scancel 78"  # no held job left that nobody knows of


def test_another_job_s_results_are_never_overwritten(tmp_path: Path, fake_tools: Path) -> None:
    folder = tmp_path / "mine"
    folder.mkdir()
    (folder / "task-0.json").write_text("{}")
    with pytest.raises(UsageError, match="holds another job's results"):
        submit(spec(tmp_path, results=str(folder), per_job=False))
    assert calls(fake_tools) == []  # nothing submitted
    assert (folder / "task-0.json").read_text() == "{}"


# --- merging Slurm's word and the result files ---------------------------------------------


def slurm_task(state: str, node: str | None = "n1", exit_code: int | None = 0) -> SlurmTask:
    return SlurmTask(
        job_id=5,
        task=0,
        task_job_id=6,
        state=state,
        reason=None,
        exit_code=exit_code,
        signal=None,
        started_at=100.0,
        ended_at=103.0,
        node=node,
        stdout="/r/task-0.out",
    )


def result(
    state: str, status: int, exit_code: int | None = None, error: str | None = None
) -> RunResult:
    """A run's record as `qvm run --result` writes it, read back as `results` reads it."""
    data = {
        "name": "vm1-run-abcdef",
        "definition": "vm1",
        "from": None,
        "state": state,
        "exit_code": exit_code,
        "signal": None,
        "status": status,
        "stdout": "out\n",
        "stderr": "",
        "phases": {"boot": 1.0},
        "started_at": 100.5,
        "ended_at": 102.5,
        "error": error,
    }
    return RunResult.read(Fields(data, "task-0.json"))


FOLDER = Path("/r")


def test_a_result_file_says_how_the_run_went() -> None:
    report = task_report(
        0, slurm_task("FAILED", exit_code=3), result("exited", 3, 3), None, FOLDER, True
    )
    assert (report.state, report.exit_code, report.status) == ("exited", 3, 3)
    assert report.seconds == 2.0 and report.node == "n1" and report.stdout == "out\n"
    assert report.result == "/r/task-0.json" and report.output == "/r/task-0.out"


def test_slurm_s_time_limit_turns_a_cancelled_run_into_a_timeout() -> None:
    ran = result("cancelled", 143, error="cancelled by SIGTERM")
    report = task_report(0, slurm_task("TIMEOUT"), ran, None, FOLDER, True)
    assert report.state == "timeout"
    assert report.error == "Slurm's time limit (--time) ended it: cancelled by SIGTERM"
    # scancel: the run's own word stands
    report = task_report(0, slurm_task("CANCELLED"), ran, None, FOLDER, True)
    assert report.state == "cancelled" and report.error == "cancelled by SIGTERM"


def test_without_a_result_file_slurm_says() -> None:
    running = task_report(0, slurm_task("RUNNING", exit_code=None), None, None, FOLDER, True)
    assert running.state == "running" and running.error is None
    pending = task_report(0, slurm_task("PENDING", node=None), None, None, FOLDER, True)
    assert pending.state == "pending"
    never = task_report(0, slurm_task("CANCELLED", node=None), None, None, FOLDER, True)
    assert never.state == "cancelled" and never.error == "cancelled before it started"
    killed = task_report(0, slurm_task("CANCELLED"), None, None, FOLDER, True)
    assert killed.error == "cancelled before its run could write a result"
    oom = task_report(0, slurm_task("OUT_OF_MEMORY"), None, None, FOLDER, True)
    assert oom.state == "failed" and "OUT_OF_MEMORY" in (oom.error or "")
    forgotten = task_report(0, None, None, None, FOLDER, False)
    assert forgotten.state == "unknown"
    assert forgotten.error == "no result file, and Slurm no longer knows the job"


def test_job_report_from_files_after_slurm_forgot(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(ops, "show_job", lambda job_id: None)
    folder = tmp_path / "qvm-results" / "5"
    folder.mkdir(parents=True)
    (folder / "job.json").write_text(
        json.dumps(
            {
                "job_id": 5,
                "name": "vm1",
                "from": None,
                "tasks": 3,
                "command": ["true"],
                "cpus": 1,
                "mem_mib": 512,
                "submitted_at": 1.0,
            }
        )
    )
    write_run_result(folder / "task-0.json", result("exited", 0, 0))
    (folder / "task-1.json").write_text('{"name": "vm1-run-x", "state": "exited"')  # cut short
    report = job_report(5, None, tmp_path, outputs=False)
    assert not report.slurm_knows and report.results == str(folder)
    states = [(t.task, t.state) for t in report.tasks]
    assert states == [(0, "exited"), (1, "unknown"), (2, "unknown")]
    assert report.tasks[0].stdout is None  # outputs=False
    assert str(folder / "task-1.json") in (report.tasks[1].error or "")
    assert report.counts() == {"exited": 1, "unknown": 2} and not report.all_succeeded


def test_a_job_nobody_knows_is_one_error(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(ops, "show_job", lambda job_id: None)
    with pytest.raises(QvmError, match="job 9: Slurm does not know it") as caught:
        job_report(9, None, tmp_path, outputs=True)
    assert caught.value.hint == "pass the folder with --results DIR"


def test_no_slurm_here_the_files_still_tell(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    def down(job_id: int) -> None:
        raise HostError("scontrol show job: Unable to contact slurm controller")

    monkeypatch.setattr(ops, "show_job", down)
    folder = tmp_path / "r"
    folder.mkdir()
    write_run_result(folder / "task-0.json", result("exited", 0, 0))
    report = job_report(9, Path("r"), tmp_path, outputs=True)
    assert [t.state for t in report.tasks] == ["exited"] and report.all_succeeded
    assert report.problems == ("scontrol show job: Unable to contact slurm controller",)
