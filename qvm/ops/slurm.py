"""`qvm slurm`: many `qvm run`s as one Slurm job array, and what became of each task.

`submit` writes a batch script whose tasks each ``exec qvm run`` (so that Slurm's SIGTERM,
from `scancel` or the time limit, reaches `qvm run` itself, which then tears its VM down
and writes its result) and submits it held, writes ``job.json`` into the results folder
once the job id is known, and releases it. Each task writes ``task-N.json`` (the `qvm
run` record) and Slurm writes its output to ``task-N.out``.

`status` and `results` merge two sources: Slurm's word on each task (`scontrol`, while it
remembers the job) and the result files (after that, the only word). A result file that
is missing or does not parse is said so in the task's ``error``, never a traceback.

What a task asks Slurm for comes from the definition (docs/cluster.md): a CPU per vCPU
(TCG runs one thread per vCPU) and the guest's RAM plus ``QEMU_OVERHEAD_MIB``.
"""

from __future__ import annotations

import os
import re
import shlex
import time
from collections.abc import Sequence
from pathlib import Path

from qvm.base.record import Record
from qvm.definition.schema import Machine
from qvm.errors import QvmError, RecordError, UsageError
from qvm.host.slurm import LIVE, SlurmTask, cancel, release, sbatch, show_job
from qvm.layout.rundir import RunDir
from qvm.store.run_result import RunResult, read_run_result
from qvm.store.slurm_job import JOB_FILE, SlurmJobRecord, read_slurm_job, write_slurm_job
from qvm.store.snapshots import find_snapshot

MIB = 1024**2
# What a task needs beyond the guest's RAM (docs/cluster.md): QEMU's own memory besides
# the guest's pages (its TCG translation cache grows with the guest's code), the
# supervisor and `qvm run` (two Pythons, ~40 MiB together). Measured by
# scripts/bench_slurm.py: 233 MiB for all three with a 256 MiB test guest, which touches
# only part of its RAM; a guest that touches all of it needs RAM + QEMU's own + 40 MiB,
# and a task over its --mem is killed where Slurm enforces it.
QEMU_OVERHEAD_MIB = 256
DEFAULT_RESULTS = "qvm-results"  # in the current folder; a subfolder per job id
RESULT_NAME = "task-{}.json"
OUTPUT_NAME = "task-{}.out"
# the Slurm variables a task's command sees in the guest
JOB_VARIABLES = ("SLURM_JOB_ID", "SLURM_ARRAY_JOB_ID", "SLURM_ARRAY_TASK_ID")
# characters an #SBATCH value cannot hold: its quoting, a line's end, a file name pattern
_UNSAFE_PATH = re.compile(r'["%\n\r\\$`]')
_SBATCH_VALUE = re.compile(r"[A-Za-z0-9_.,:+=/@-]+")
# the states `status` and `results` report, beside Slurm's own
TASK_STATES = ("pending", "running", "exited", "timeout", "cancelled", "failed", "unknown")


class Resources(Record):
    cpus: int  # --cpus-per-task
    mem_mib: int  # --mem


class BatchSpec(Record):
    """Everything the batch script says."""

    qvm: tuple[str, ...]  # how the job runs qvm: absolute paths
    name: str
    source: str | None  # --from VM@TAG
    command: tuple[str, ...]
    tasks: int
    resources: Resources
    machines: tuple[str, ...]  # QVM_MACHINES in the job: where the definition is found
    results: str  # absolute; with per_job, the folder of the job's folders
    per_job: bool  # each job's results in RESULTS/JOBID (the default folder)
    partition: str | None = None
    time_limit: str | None = None


class Submitted(Record):
    job_id: int
    results: str  # the job's results folder
    script: str
    tasks: int
    resources: Resources


# what a task's report takes from its result file, when there is one
FROM_RESULT = (
    "state",
    "exit_code",
    "status",
    "started_at",
    "ended_at",
    "error",
    "stdout",
    "stderr",
)


class TaskReport(Record):
    """One task, as Slurm and its result file tell it."""

    task: int
    state: str  # one of TASK_STATES
    slurm_state: str | None  # Slurm's JobState while it knows the job, else None
    exit_code: int | None  # the command's in the guest, when it ran to its end
    status: int | None  # qvm run's exit status (docs/cluster.md), when it ended
    started_at: float | None
    ended_at: float | None
    node: str | None
    result: str  # the result file's path (it may not exist)
    output: str  # what the task printed (Slurm's output file)
    error: str | None  # why it did not exit, or what is wrong with its result file
    stdout: str | None = None  # the command's, from the result file
    stderr: str | None = None

    @property
    def seconds(self) -> float | None:
        if self.started_at is None or self.ended_at is None:
            return None
        return round(self.ended_at - self.started_at, 3)


class JobReport(Record):
    job_id: int
    results: str
    slurm_knows: bool  # scontrol still has the job (no accounting: MinJobAge after its end)
    job: SlurmJobRecord | None  # job.json, when it was there and parsed
    tasks: tuple[TaskReport, ...]
    problems: tuple[str, ...] = ()  # job.json broken, scontrol failed, ...

    def counts(self) -> dict[str, int]:
        counts = dict.fromkeys(TASK_STATES, 0)
        for task in self.tasks:
            counts[task.state] += 1
        return {state: n for state, n in counts.items() if n}

    @property
    def all_succeeded(self) -> bool:
        return bool(self.tasks) and all(t.state == "exited" and t.status == 0 for t in self.tasks)


# --- the batch script (pure) -------------------------------------------------------------


def resources_of(
    machine: Machine, snapshot_vcpus: int | None, snapshot_ram: int | None
) -> Resources:
    """A CPU per vCPU present at the start (the definition's boot vCPUs, or the snapshot's
    when resuming one: hotplugged vCPUs were saved with it) and the guest's RAM (boot RAM,
    or the snapshot's with its DIMMs) plus QEMU_OVERHEAD_MIB. Not cpu.max or memory.max:
    Slurm reserves a job's CPUs and memory for its whole life, and a one-shot run that
    hotplugs is rare (docs/cluster.md)."""
    cpus = snapshot_vcpus or machine.cpu.count
    ram = snapshot_ram or machine.memory.size
    return Resources(cpus=max(1, cpus), mem_mib=-(-ram // MIB) + QEMU_OVERHEAD_MIB)


def batch_script(spec: BatchSpec) -> str:
    """The sbatch script: #SBATCH lines, then each task ``exec``s `qvm run`, the result
    into the results folder and Slurm's job variables into the guest's environment."""
    q = shlex.quote
    folder = f"{spec.results}/%A" if spec.per_job else spec.results
    sbatch = [
        f"--job-name=qvm-{spec.name}",
        f"--array=0-{spec.tasks - 1}",
        f"--cpus-per-task={spec.resources.cpus}",
        f"--mem={spec.resources.mem_mib}M",
        f'--output="{folder}/{OUTPUT_NAME.format("%a")}"',
    ]
    if spec.partition is not None:
        sbatch.append(f"--partition={spec.partition}")
    if spec.time_limit is not None:
        sbatch.append(f"--time={spec.time_limit}")
    results = q(spec.results) + ('/"$SLURM_ARRAY_JOB_ID"' if spec.per_job else "")
    run = [
        *(q(word) for word in spec.qvm),
        "run",
        q(spec.name),
        *(["--from", q(spec.source)] if spec.source is not None else []),
        "--result",
        f'"$results/{RESULT_NAME.format("$SLURM_ARRAY_TASK_ID")}"',
        *(f'--env "{name}=${name}"' for name in JOB_VARIABLES),
        "--",
        *(q(word) for word in spec.command),
    ]
    lines = [
        "#!/bin/bash",
        f"# qvm slurm submit: {spec.tasks} task(s), each a `qvm run` of {spec.name}",
        *(f"#SBATCH {option}" for option in sbatch),
        "",
        f"export QVM_MACHINES={q(os.pathsep.join(spec.machines))}",
        f"results={results}",
        "# exec: Slurm's SIGTERM (scancel, the time limit) reaches qvm run itself, which",
        "# powers the VM off and writes the result",
        "exec " + " \\\n  ".join(_grouped(run)),
        "",
    ]
    return "\n".join(lines)


def _grouped(words: list[str]) -> list[str]:
    """The command's words on lines: one before each option (with its value) and before
    the command's ``--``."""
    lines: list[str] = []
    current: list[str] = []
    for word in words:
        if word.startswith("--") and current:
            lines.append(" ".join(current))
            current = []
        current.append(word)
    lines.append(" ".join(current))
    return lines


def check_sbatch_value(option: str, value: str | None) -> None:
    """A --partition or --time value goes into an #SBATCH line as it is: one word."""
    if value is not None and not _SBATCH_VALUE.fullmatch(value):
        raise UsageError(
            f"{option}: must be one word of letters, digits and ,.:+=/@-, got {value!r}"
        )


def check_results_path(path: Path) -> None:
    if _UNSAFE_PATH.search(str(path)):
        raise UsageError(
            f'--results {path}: a results folder cannot hold " % $ ` \\ or a line break '
            "(Slurm reads % as a file name pattern)"
        )


# --- submitting ----------------------------------------------------------------------------


def plan_submit(
    machine: Machine,
    source: str | None,
    template_run: RunDir | None,
    command: Sequence[str],
    tasks: int,
    qvm: Sequence[str],
    results: Path | None,
    cwd: Path,
    partition: str | None = None,
    time_limit: str | None = None,
) -> BatchSpec:
    """The batch script's content, checked: no script is submitted that fails in each of
    its tasks (an unknown snapshot, a folder Slurm cannot write to)."""
    if tasks < 1:
        raise UsageError(f"--array: at least 1 task, got {tasks}")
    if not command:
        raise UsageError(f"qvm slurm submit {machine.name} -- PROGRAM [ARG...]: no program given")
    check_sbatch_value("--partition", partition)
    check_sbatch_value("--time", time_limit)
    vcpus = ram = None
    if source is not None:
        assert template_run is not None
        tag = source.partition("@")[2]
        snapshot = find_snapshot(template_run, tag)
        if snapshot is None:
            raise QvmError(
                f"--from {source}: no snapshot {tag!r}",
                vm=template_run.name,
                hint=f"qvm snapshot save {template_run.name} {tag}, or see qvm snapshot list "
                f"{template_run.name}",
            )
        if snapshot.disk_only:
            raise QvmError(
                f"--from {source}: a disk-only snapshot has no memory to resume from",
                vm=template_run.name,
                hint=f"qvm snapshot save {template_run.name} TAG on the running VM",
            )
        vcpus = len(snapshot.devices.cpu_slots) or None
        ram = snapshot.ram_bytes
    folder = (cwd / DEFAULT_RESULTS) if results is None else (cwd / results)
    folder = Path(os.path.abspath(folder))
    check_results_path(folder)
    return BatchSpec(
        qvm=tuple(qvm),
        name=machine.name,
        source=source,
        command=tuple(command),
        tasks=tasks,
        resources=resources_of(machine, vcpus, ram),
        machines=(str(machine.path.parent),),
        results=str(folder),
        per_job=results is None,
        partition=partition,
        time_limit=time_limit,
    )


def submit(spec: BatchSpec) -> Submitted:
    """Submit the job held, make its results folder and ``job.json``, release it. A
    failure after the submission cancels the job: no job waits that nobody knows of."""
    script = batch_script(spec)
    root = Path(spec.results)
    if not spec.per_job:
        _refuse_old_results(root)
    try:
        root.mkdir(parents=True, exist_ok=True)
    except OSError as error:
        raise QvmError(f"--results {root}: cannot make it: {error.strerror or error}") from error
    job_id = sbatch(script, hold=True)
    try:
        folder = root / str(job_id) if spec.per_job else root
        folder.mkdir(exist_ok=True)
        record = SlurmJobRecord(
            job_id=job_id,
            name=spec.name,
            source=spec.source,
            tasks=spec.tasks,
            command=spec.command,
            cpus=spec.resources.cpus,
            mem_mib=spec.resources.mem_mib,
            submitted_at=time.time(),
        )
        write_slurm_job(folder, record)
        release(job_id)
    except BaseException:
        cancel(job_id)
        raise
    return Submitted(job_id, str(folder), script, spec.tasks, spec.resources)


def _refuse_old_results(folder: Path) -> None:
    """Another job's results are the user's: never overwritten."""
    if (folder / JOB_FILE).exists() or any(folder.glob(RESULT_NAME.format("*"))):
        raise UsageError(
            f"--results {folder}: holds another job's results",
            hint="give an empty or new folder, or leave --results out (a folder per job)",
        )


# --- what became of the tasks ------------------------------------------------------------


def job_report(job_id: int, results: Path | None, cwd: Path, outputs: bool) -> JobReport:
    """Every task of the job: Slurm's word while it has one, and the result files.
    ``outputs``: the commands' stdout and stderr too."""
    problems: list[str] = []
    try:
        slurm = show_job(job_id)
    except QvmError as error:  # no Slurm here: the files may still tell
        slurm, problems = None, [str(error)]
    folder = _results_folder(job_id, results, cwd, slurm)
    job = None
    try:
        job = read_slurm_job(folder)
    except RecordError as error:
        problems.append(str(error))
    indexes = set(range(job.tasks)) if job is not None else set()
    indexes |= {t.task for t in slurm or ()}
    indexes |= _result_indexes(folder)
    if not indexes:
        raise QvmError(
            f"job {job_id}: Slurm does not know it and {folder} holds no results of it",
            hint="pass the folder with --results DIR",
        )
    by_task = {t.task: t for t in slurm or ()}
    tasks = []
    for index in sorted(indexes):
        result, problem = _read_result(folder / RESULT_NAME.format(index))
        report = task_report(index, by_task.get(index), result, problem, folder, slurm is not None)
        if not outputs:
            report = report._replace(stdout=None, stderr=None)
        tasks.append(report)
    return JobReport(job_id, str(folder), slurm is not None, job, tuple(tasks), tuple(problems))


def _results_folder(
    job_id: int, results: Path | None, cwd: Path, slurm: tuple[SlurmTask, ...] | None
) -> Path:
    """--results, else where Slurm writes the tasks' output, else ./qvm-results/JOB."""
    if results is not None:
        return cwd / results
    for task in slurm or ():
        if task.stdout:
            return Path(task.stdout).parent
    return cwd / DEFAULT_RESULTS / str(job_id)


def _result_indexes(folder: Path) -> set[int]:
    found = set()
    for path in folder.glob(RESULT_NAME.format("*")):
        index = path.name.removeprefix("task-").removesuffix(".json")
        if index.isdigit():
            found.add(int(index))
    return found


def _read_result(path: Path) -> tuple[RunResult | None, str | None]:
    try:
        return read_run_result(path), None
    except RecordError as error:
        return None, str(error)


def task_report(
    index: int,
    slurm: SlurmTask | None,
    result: RunResult | None,
    problem: str | None,
    folder: Path,
    slurm_knows: bool,
) -> TaskReport:
    """One task's report: the result file's word on how the run went, Slurm's on whether
    it still runs and on its time limit (a task Slurm timed out got a SIGTERM, which its
    run records as cancelled)."""
    slurm_state = slurm.state if slurm is not None else None
    report = TaskReport(
        task=index,
        state="unknown",
        slurm_state=slurm_state,
        exit_code=None,
        status=slurm.exit_code if slurm is not None else None,
        started_at=slurm.started_at if slurm is not None else None,
        ended_at=slurm.ended_at if slurm is not None else None,
        node=slurm.node if slurm is not None else None,
        result=str(folder / RESULT_NAME.format(index)),
        output=str(folder / OUTPUT_NAME.format(index)),
        error=problem,
    )
    if result is not None:
        ran = {field: getattr(result, field) for field in FROM_RESULT}
        if slurm_state == "TIMEOUT":
            ran["state"] = "timeout"
            ran["error"] = f"Slurm's time limit (--time) ended it: {result.error}"
        return report._replace(**ran)
    if slurm_state is None:
        why = "Slurm no longer knows the job" if not slurm_knows else "Slurm does not list it"
        return report._replace(error=problem or f"no result file, and {why}")
    if slurm_state in LIVE - {"COMPLETING"}:
        pending = slurm_state in ("PENDING", "CONFIGURING", "REQUEUED")
        return report._replace(state="pending" if pending else "running", error=problem)
    if slurm_state == "COMPLETING":
        return report._replace(state="running", error=problem)
    # Slurm says it ended, and it left no result: killed before it could write one
    state = {"CANCELLED": "cancelled", "TIMEOUT": "timeout"}.get(slurm_state, "failed")
    why = {
        "CANCELLED": "cancelled before its run could write a result",
        "TIMEOUT": "Slurm's time limit (--time) ended it before its run wrote a result",
    }.get(slurm_state, f"Slurm says {slurm_state}, and its run wrote no result")
    if slurm is not None and slurm.node is None:  # Slurm gives it start and end times all the same
        why = f"{slurm_state.lower()} before it started"
    return report._replace(state=state, error=problem or why)
