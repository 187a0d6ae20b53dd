"""qvm.host.slurm: Slurm 22.05's own `scontrol -o show job` lines (captured from the
one-node cluster of scripts/slurm-cluster, in tests/data/slurm/) parsed into tasks, and
the calls to sbatch/scontrol against fake tools that answer as Slurm does."""

from __future__ import annotations

from pathlib import Path

import pytest
from framework.fake_tools import calls, fake_tool
from hypothesis import given
from hypothesis import strategies as st

from qvm.errors import HostError
from qvm.host.slurm import (
    array_indexes,
    job_fields,
    release,
    sbatch,
    show_job,
    slurm_time,
    tasks_of,
)

DATA = Path(__file__).resolve().parents[2] / "data" / "slurm"


def captured(name: str) -> str:
    return (DATA / name).read_text()


def test_a_line_s_fields_keep_values_with_spaces() -> None:
    (line,) = [ln for ln in captured("ended.txt").splitlines() if ln.startswith("JobId=4 ")]
    fields = job_fields(line)
    assert fields["JobId"] == "4" and fields["ArrayJobId"] == "2"
    assert fields["StdOut"] == "/tmp/sl-try/x y/task-1.out"  # a folder with a space
    assert fields["Socks/Node"] == "*" and fields["AllocNode:Sid"] == "localhost:827"
    assert fields["Power"] == ""


def test_ended_tasks_with_their_exit_codes_and_times() -> None:
    tasks = tasks_of(captured("ended.txt"))
    assert [t.task for t in tasks] == [0, 1, 2, 3]
    assert [t.state for t in tasks] == ["COMPLETED", "FAILED", "FAILED", "FAILED"]
    assert [t.exit_code for t in tasks] == [0, 1, 2, 3]
    assert {t.job_id for t in tasks} == {2}
    assert [t.task_job_id for t in tasks] == [3, 4, 5, 2]  # the last task has the array's id
    first = tasks[0]
    assert first.node == "vm" and first.signal is None
    assert first.started_at is not None and first.ended_at == first.started_at + 3
    assert first.stdout == "/tmp/sl-try/x y/task-0.out"


def test_a_held_array_is_one_line_for_every_task() -> None:
    tasks = tasks_of(captured("held.txt"))
    assert [t.task for t in tasks] == [0, 1, 2, 3]
    assert {t.state for t in tasks} == {"PENDING"}
    assert {t.reason for t in tasks} == {"JobHeldUser"}
    assert all(t.task_job_id is None and t.node is None for t in tasks)
    assert all(t.started_at is None and t.ended_at is None and t.exit_code is None for t in tasks)


def test_cancelled_tasks_pending_and_running() -> None:
    tasks = tasks_of(captured("cancelled.txt"))
    assert [(t.task, t.state) for t in tasks] == [
        (0, "CANCELLED"),
        (1, "CANCELLED"),
        (2, "CANCELLED"),
    ]
    ran, never = tasks[0], tasks[1]
    assert ran.node == "vm" and ran.exit_code == 143
    assert never.node is None  # cancelled while pending: it never ran anywhere


def test_a_task_past_its_time_limit() -> None:
    (task,) = tasks_of(captured("timeout.txt"))
    assert task.state == "TIMEOUT" and task.task == 0
    assert task.ended_at is not None and task.started_at is not None
    assert 60 <= task.ended_at - task.started_at <= 120


@pytest.mark.parametrize(
    "text,indexes",
    [
        ("3", [3]),
        ("0-3", [0, 1, 2, 3]),
        ("1,3,5-9:2", [1, 3, 5, 7, 9]),
        ("0-15%4", list(range(16))),
    ],
)
def test_array_ranges(text: str, indexes: list[int]) -> None:
    assert array_indexes(text) == indexes


@given(st.sets(st.integers(0, 2000), min_size=1, max_size=40))
def test_array_ranges_round_trip(indexes: set[int]) -> None:
    ordered = sorted(indexes)
    runs: list[list[int]] = []
    for index in ordered:
        if runs and runs[-1][-1] == index - 1:
            runs[-1].append(index)
        else:
            runs.append([index])
    text = ",".join(str(r[0]) if len(r) == 1 else f"{r[0]}-{r[-1]}" for r in runs)
    assert array_indexes(text) == ordered


@pytest.mark.parametrize("text", ["x", "1-", "-1", "1,,2", ""])
def test_a_bad_array_range_is_a_value_error(text: str) -> None:
    with pytest.raises(ValueError, match="not an array range"):
        array_indexes(text)


_WORD = st.text("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ", min_size=1, max_size=8)
# a value: words without "=", spaces between them (a path or a command with spaces)
_VALUE = st.lists(st.text("abc/._-:0123456789", min_size=1, max_size=6), max_size=3).map(" ".join)


@given(st.dictionaries(_WORD, _VALUE, min_size=1, max_size=8))
def test_fields_round_trip(fields: dict[str, str]) -> None:
    line = " ".join(f"{k}={v}" for k, v in fields.items())
    assert job_fields(line) == fields


def test_times() -> None:
    assert slurm_time("Unknown") is None and slurm_time("None") is None
    assert slurm_time(None) is None and slurm_time("2026-13-45T99:00:00") is None
    start = slurm_time("2026-12-04T22:59:51")
    end = slurm_time("2026-12-04T22:59:54")
    assert start is not None and end == start + 3


# --- the tools, faked on PATH ------------------------------------------------------------


def test_sbatch_submits_the_script_on_stdin_held(fake_tools: Path) -> None:
    fake_tool(fake_tools, "sbatch", 'echo "42;cluster"', log_stdin=True)
    assert sbatch("#!/bin/bash\necho hi\n", hold=True) == 42
    assert calls(fake_tools) == ["sbatch --parsable --hold", "#!/bin/bash", "echo hi"]


def test_sbatch_s_refusal_is_one_line(fake_tools: Path) -> None:
    fake_tool(
        fake_tools,
        "sbatch",
        "echo 'sbatch: error: invalid partition specified: nope' >&2\n"
        "echo 'sbatch: error: Batch job submission failed: Invalid partition name specified' >&2"
        "\nexit 1",
    )
    with pytest.raises(HostError) as caught:
        sbatch("#!/bin/bash\n", hold=False)
    assert "\n" not in str(caught.value)
    assert str(caught.value).startswith("sbatch: sbatch: error: invalid partition")


def test_sbatch_without_a_job_id(fake_tools: Path) -> None:
    fake_tool(fake_tools, "sbatch", "echo 'Submitted batch job'")
    with pytest.raises(HostError, match="no job id"):
        sbatch("#!/bin/bash\n", hold=False)


def test_a_job_slurm_forgot_is_none(fake_tools: Path) -> None:
    fake_tool(
        fake_tools, "scontrol", "echo 'slurm_load_jobs error: Invalid job id specified' >&2; exit 1"
    )
    assert show_job(7) is None


def test_scontrol_down_is_a_host_error(fake_tools: Path) -> None:
    fake_tool(
        fake_tools,
        "scontrol",
        "echo 'slurm_load_jobs error: Unable to contact slurm controller (connect failure)' >&2"
        "; exit 1",
    )
    with pytest.raises(HostError, match="Unable to contact slurm controller"):
        show_job(7)
    with pytest.raises(HostError, match="scontrol release: slurm_load_jobs"):
        release(7)


def test_no_slurm_installed_names_the_package(
    fake_tools: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("PATH", str(fake_tools))
    with pytest.raises(HostError, match="apt-get install slurm-client"):
        show_job(7)
