"""qvm slurm submit/status/results through the real CLI, against fake sbatch/scontrol on
PATH that answer with Slurm 22.05's own lines: the JSON each prints is its schema's, the
job id is the last word, bad input is one line, a broken result file is no traceback.
tests/integration/test_slurm.py runs the real Slurm."""

from __future__ import annotations

import json
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from framework.fake_tools import fake_tool
from framework.harness import Qvm, one_line_error, short_tmpdir
from framework.jsonschema_lite import validate

DATA = Path(__file__).resolve().parents[2] / "data" / "slurm"


@pytest.fixture
def cli(fake_tools: Path) -> Iterator[Qvm]:
    """The CLI, with the fake tools first on its PATH (it runs with this process's)."""
    root = short_tmpdir()
    qvm = Qvm(root)
    qvm.guest_machine("vm1", count=2, memory="256M")
    yield qvm
    shutil.rmtree(root, ignore_errors=True)


def run_json(qvm: Qvm, *args: str, code: int = 0, json_last: bool = True) -> Any:
    """``--json`` goes last unless ``json_last`` is False (the words after ``--`` are the
    guest's: the test puts it before them)."""
    done = qvm(*args, *(["--json"] if json_last else []), check=False)
    assert done.returncode == code, done.stderr
    assert "Traceback" not in done.stderr
    return json.loads(done.stdout)


def test_dry_run_prints_the_script_with_the_definition_s_resources(cli: Qvm) -> None:
    done = cli("slurm", "submit", "vm1", "--array", "3", "--dry-run", "--", "echo", "a b")
    assert done.stdout.startswith("#!/bin/bash\n")
    assert "#SBATCH --cpus-per-task=2\n" in done.stdout  # the definition's 2 vCPUs
    assert "#SBATCH --mem=512M\n" in done.stdout  # 256M + QEMU's overhead
    assert "#SBATCH --array=0-2\n" in done.stdout
    assert f"export QVM_MACHINES={cli.machines_dir}\n" in done.stdout
    assert "-- echo 'a b'\n" in done.stdout
    planned = run_json(
        cli, "slurm", "submit", "vm1", "--dry-run", "--json", "--", "true", json_last=False
    )
    validate(planned, "slurm-submit.json")
    assert planned["job_id"] is None and planned["mem_per_task_bytes"] == 512 * 1024**2


def test_submit_prints_the_job_id_last(cli: Qvm, fake_tools: Path) -> None:
    fake_tool(fake_tools, "sbatch", "cat > /dev/null; echo 31")
    fake_tool(fake_tools, "scontrol", "exit 0")
    done = cli("slurm", "submit", "vm1", "--array", "2", "--", "true")
    assert done.stdout.split()[-1] == "31"
    assert (cli.root / "qvm-results" / "31" / "job.json").is_file()
    fake_tool(fake_tools, "sbatch", "cat > /dev/null; echo 32")
    submitted = run_json(cli, "slurm", "submit", "vm1", "--json", "--", "true", json_last=False)
    validate(submitted, "slurm-submit.json")
    assert submitted["job_id"] == 32 and submitted["results"] == str(cli.root / "qvm-results/32")


def test_status_and_results_merge_slurm_and_the_files(cli: Qvm, fake_tools: Path) -> None:
    folder = cli.root / "r"
    folder.mkdir()
    fake_tool(fake_tools, "scontrol", f"cat {DATA / 'ended.txt'}")
    result = {
        "name": "vm1-run-abc123",
        "definition": "vm1",
        "from": None,
        "state": "exited",
        "exit_code": 1,
        "signal": None,
        "status": 1,
        "stdout": "task 1\n",
        "stderr": "",
        "phases": {"boot": 1.0, "agent_ready": 2.0, "command": 0.1, "teardown": 0.1},
        "started_at": 100.0,
        "ended_at": 103.5,
        "error": None,
    }
    (folder / "task-1.json").write_text(json.dumps(result))
    (folder / "task-2.json").write_text("{not json")
    status = run_json(cli, "slurm", "status", "2", "--results", "r")
    validate(status, "slurm-status.json")
    tasks = {t["task"]: t for t in status["tasks"]}
    assert tasks[1]["state"] == "exited" and tasks[1]["exit_code"] == 1
    assert tasks[1]["slurm_state"] == "FAILED" and tasks[1]["seconds"] == 3.5
    assert tasks[2]["state"] == "failed" and "task-2.json" in tasks[2]["error"]
    assert "stdout" not in tasks[1]
    results = run_json(cli, "slurm", "results", "2", "--results", "r", code=1)
    validate(results, "slurm-results.json")
    assert [t["stdout"] for t in results["tasks"] if t["task"] == 1] == ["task 1\n"]
    text = cli("slurm", "status", "2", "--results", "r")
    assert text.stdout.splitlines()[0] == "job 2: 4 task(s): 1 exited, 3 failed"
    shown = cli("slurm", "results", "2", "--results", "r", check=False)
    assert shown.returncode == 1 and "  | task 1\n" in shown.stdout


def test_bad_input_is_one_line(cli: Qvm, fake_tools: Path) -> None:
    one_line_error(
        cli("slurm", "submit", "vm1", check=False),
        "qvm: qvm slurm submit vm1 -- PROGRAM [ARG...]: no program given",
    )
    line = one_line_error(
        cli("slurm", "submit", "vm1", "--from", "vm2@x", "--", "true", check=False)
    )
    assert "a snapshot of vm2, but the tasks run vm1" in line
    line = one_line_error(
        cli("slurm", "submit", "vm1", "--from", "vm1@x", "--", "true", check=False)
    )
    assert line == (
        "qvm: vm1: --from vm1@x: no snapshot 'x' (hint: qvm snapshot save vm1 x, or see qvm"
        " snapshot list vm1)"
    )
    fake_tool(
        fake_tools, "scontrol", "echo 'slurm_load_jobs error: Invalid job id specified' >&2; exit 1"
    )
    line = one_line_error(cli("slurm", "status", "5", check=False))
    assert line.startswith("qvm: job 5: Slurm does not know it and ")
    assert cli("slurm", "status", "x", check=False).returncode == 2
