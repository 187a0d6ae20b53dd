"""Talking to Slurm: `sbatch`, `scontrol`, and what `scontrol -o show job` says, parsed.

No accounting database is assumed (no `sacct`): Slurm knows a job's tasks while it runs
and for MinJobAge seconds after (300 by default); after that only the tasks' result files
say how they went (``qvm.ops.slurm``). The parsers are pure, so the unit tests feed them
Slurm 22.05's own lines.
"""

from __future__ import annotations

import re
import time

from qvm.base.record import Record
from qvm.errors import HostError
from qvm.host.tools import run_tool

PACKAGE = "slurm-client"
TIMEOUT = 30.0  # seconds for one call: slurmctld answers in milliseconds when it is up
# a key of `scontrol -o show job`: a word (some have a slash, e.g. Socks/Node) and "="
_KEY = re.compile(r"(?:^|(?<=\s))([A-Za-z][A-Za-z0-9_:/]*)=")
_ARRAY_RANGE = re.compile(r"(\d+)(?:-(\d+)(?::(\d+))?)?")
_EXIT = re.compile(r"(\d+):(\d+)")
_NO_SUCH_JOB = "Invalid job id specified"


class SlurmTask(Record):
    """One array task as Slurm sees it (a pending range is one record per task)."""

    job_id: int  # the array's (SLURM_ARRAY_JOB_ID)
    task: int  # SLURM_ARRAY_TASK_ID
    task_job_id: int | None  # the task's own job id (SLURM_JOB_ID); None while pending
    state: str  # Slurm's JobState: PENDING, RUNNING, COMPLETED, CANCELLED, TIMEOUT, ...
    reason: str | None  # why it waits or ended (Reason=), None for "None"
    exit_code: int | None  # the batch script's status (ExitCode=N:S), None while it runs
    signal: int | None  # the signal that ended the batch script, None if none
    started_at: float | None  # Unix time
    ended_at: float | None
    node: str | None
    stdout: str | None  # where Slurm writes the task's output


def job_fields(line: str) -> dict[str, str]:
    """One line of `scontrol -o show job` as its keys and values. A value runs to the next
    `KEY=` that follows a space, so a value with spaces (a command line, a comment) stays
    whole."""
    starts = list(_KEY.finditer(line))
    fields = {}
    for here, after in zip(starts, [*starts[1:], None], strict=True):
        end = after.start() if after is not None else len(line)
        fields[here.group(1)] = line[here.end() : end].strip()
    return fields


def array_indexes(text: str) -> list[int]:
    """``3``, ``0-7``, ``1,3,5-9:2``, ``0-15%4`` (a throttle): the task ids, in order."""
    text = text.split("%", 1)[0]
    indexes: list[int] = []
    for part in text.split(","):
        match = _ARRAY_RANGE.fullmatch(part.strip())
        if match is None:
            raise ValueError(f"not an array range: {text!r}")
        first = int(match.group(1))
        last = int(match.group(2)) if match.group(2) else first
        step = int(match.group(3)) if match.group(3) else 1
        indexes.extend(range(first, last + 1, step))
    return indexes


def slurm_time(text: str | None) -> float | None:
    """Slurm's local ``2026-12-04T22:56:47`` as Unix time; None for Unknown/None/empty."""
    if not text or not text[:1].isdigit():
        return None
    try:
        return time.mktime(time.strptime(text, "%Y-%m-%dT%H:%M:%S"))
    except ValueError:
        return None


def tasks_of(text: str) -> tuple[SlurmTask, ...]:
    """The tasks in `scontrol -o show job ARRAY_ID`'s lines, by task id. A job that is not
    an array counts as task 0."""
    tasks: dict[int, SlurmTask] = {}
    for line in text.splitlines():
        if "JobId=" not in line:
            continue
        fields = job_fields(line)
        state = fields.get("JobState", "UNKNOWN")
        job_id = _number(fields.get("ArrayJobId")) or _number(fields.get("JobId")) or 0
        array = fields.get("ArrayTaskId")
        indexes = array_indexes(array) if array else [0]
        # a range is tasks not started yet, which have no job id of their own
        own_id = _number(fields.get("JobId")) if len(indexes) == 1 else None
        exit_code, signal = _exit_status(fields.get("ExitCode"), state)
        for index in indexes:
            tasks[index] = SlurmTask(
                job_id=job_id,
                task=index,
                task_job_id=own_id,
                state=state.split()[0] if state else "UNKNOWN",
                reason=_none(fields.get("Reason")),
                exit_code=exit_code,
                signal=signal,
                started_at=slurm_time(fields.get("StartTime")) if state != "PENDING" else None,
                ended_at=slurm_time(fields.get("EndTime")) if state not in LIVE else None,
                node=_none(fields.get("BatchHost") or fields.get("NodeList")),
                stdout=_none(fields.get("StdOut")),
            )
    return tuple(tasks[index] for index in sorted(tasks))


# Slurm states in which the task has not ended yet
LIVE = frozenset(
    (
        "PENDING",
        "CONFIGURING",
        "RUNNING",
        "COMPLETING",
        "SUSPENDED",
        "STOPPED",
        "SIGNALING",
        "RESIZING",
        "REQUEUED",
        "REQUEUE_FED",
        "REQUEUE_HOLD",
        "RESV_DEL_HOLD",
        "SPECIAL_EXIT",
        "STAGE_OUT",
    )
)


def _exit_status(text: str | None, state: str) -> tuple[int | None, int | None]:
    if text is None or state in LIVE - {"COMPLETING"}:
        return None, None
    match = _EXIT.fullmatch(text)
    if match is None:
        return None, None
    code, signal = int(match.group(1)), int(match.group(2))
    return code, signal or None


def _number(text: str | None) -> int | None:
    return int(text) if text is not None and text.isdigit() else None


def _none(text: str | None) -> str | None:
    return None if text in (None, "", "None", "(null)") else text


def sbatch(script: str, hold: bool) -> int:
    """Submit ``script`` (on sbatch's stdin); the job id. ``hold``: it waits for
    ``release``, so that the caller can prepare what it needs to know the id for."""
    argv = ["sbatch", "--parsable", *(["--hold"] if hold else [])]
    out = _run(argv, "sbatch", stdin=script)
    job = out.strip().split(";", 1)[0]  # "ID" or "ID;CLUSTER"
    if not job.isdigit():
        raise HostError(f"sbatch: no job id in its answer: {out.strip()[:80]!r}")
    return int(job)


def release(job_id: int) -> None:
    _run(["scontrol", "release", str(job_id)], "scontrol release")


def show_job(job_id: int) -> tuple[SlurmTask, ...] | None:
    """The job's tasks as Slurm knows them; None when Slurm no longer knows the job
    (MinJobAge after its end) or never did."""
    try:
        text = _run(["scontrol", "-o", "show", "job", str(job_id)], "scontrol show job")
    except HostError as error:
        if _NO_SUCH_JOB in str(error):
            return None
        raise
    return tasks_of(text)


def cancel(job_id: int) -> None:
    """`scancel JOB`: every task of it; Slurm signals the ones running (SIGTERM first)."""
    _run(["scancel", str(job_id)], "scancel")


def _run(argv: list[str], what: str, stdin: str = "") -> str:
    return run_tool(argv, PACKAGE, TIMEOUT, what, stdin)
