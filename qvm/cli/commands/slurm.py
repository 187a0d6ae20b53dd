"""qvm slurm submit/status/results: `qvm run` as a Slurm job array (qvm.ops.slurm)."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import TYPE_CHECKING, Any

from qvm.cli import resolve
from qvm.cli.output import emit_json, say, table, warn
from qvm.cli.parsing.declare import AS_JSON, MACHINE, PROGRAM, Argument, Commands, Option
from qvm.errors import EXIT_FAILURE, UsageError

if TYPE_CHECKING:
    from qvm.ops.slurm import JobReport, Resources, TaskReport

commands = Commands(help="Run a command in many throwaway VMs as a Slurm job array.")

JOB = Argument(..., help="The job id `qvm slurm submit` printed.")
RESULTS = Option(
    None,
    "--results",
    metavar="DIR",
    help="The job's results folder (default: where Slurm writes the tasks' output, else "
    "./qvm-results/JOB).",
)


@commands.command("submit")
def submit(
    name: str = MACHINE,
    command: list[str] | None = PROGRAM,
    source: str | None = Option(
        None, "--from", metavar="VM@TAG", help="Each task resumes a clone of this snapshot."
    ),
    array: int = Option(1, "--array", metavar="N", help="How many tasks (0 .. N-1)."),
    partition: str | None = Option(None, "--partition", help="Slurm's partition."),
    time_limit: str | None = Option(
        None, "--time", metavar="T", help="Slurm's time limit of each task (as sbatch --time)."
    ),
    results: Path | None = Option(
        None,
        "--results",
        metavar="DIR",
        help="Where each task writes task-N.json and task-N.out (default: ./qvm-results/JOB).",
    ),
    dry_run: bool = Option(False, "--dry-run", help="Print the batch script; submit nothing."),
    as_json: bool = AS_JSON,
) -> None:
    """Submit a Slurm job array whose tasks each run the program in a throwaway VM.

    qvm slurm submit NAME [--from VM@TAG] [--array N] [--partition P] [--time T]
    [--results DIR] [--dry-run] [--json] [--] PROGRAM [ARG...]

    Each task `exec`s `qvm run NAME` with SLURM_JOB_ID, SLURM_ARRAY_JOB_ID and
    SLURM_ARRAY_TASK_ID in the program's environment in the guest, and writes its result
    to task-N.json in the results folder. Each asks Slurm for a CPU per vCPU and the
    guest's RAM plus QEMU's overhead (docs/cluster.md). The last word printed is the job
    id (as sbatch's); --dry-run prints the script instead.

    JSON: schemas/slurm-submit.json
    """
    from qvm.ops.slurm import plan_submit
    from qvm.ops.slurm import submit as submit_job

    if not command:
        raise UsageError(f"qvm slurm submit {name} -- PROGRAM [ARG...]: no program given")
    machine = resolve.load(name)
    template_run = None
    if source is not None:
        template_run = _template(machine.name, source)
    spec = plan_submit(
        machine,
        source,
        template_run,
        command,
        array,
        _qvm_command(),
        results,
        Path.cwd(),
        partition,
        time_limit,
    )
    if dry_run:
        from qvm.ops.slurm import batch_script

        script = batch_script(spec)
        if as_json:
            emit_json(_submitted_json(None, spec.results, spec.tasks, spec.resources, script))
        else:
            sys.stdout.write(script)
        return
    done = submit_job(spec)
    if as_json:
        emit_json(
            _submitted_json(done.job_id, done.results, done.tasks, done.resources, done.script)
        )
        return
    res = done.resources
    say(f"{done.tasks} task(s) of {name}, each {res.cpus} CPU(s) and {res.mem_mib}M")
    say(f"results in {done.results}")
    say(f"Submitted batch job {done.job_id}")


def _submitted_json(
    job_id: int | None, results: str, tasks: int, resources: Resources, script: str
) -> dict[str, Any]:
    return {
        "job_id": job_id,
        "results": results,
        "tasks": tasks,
        "cpus_per_task": resources.cpus,
        "mem_per_task_bytes": resources.mem_mib * 1024**2,
        "script": script,
    }


def _template(name: str, source: str) -> Any:
    """--from VM@TAG: VM must be NAME (a clone runs its template's definition)."""
    from qvm.ops.clone import parse_source

    vm, _ = parse_source(source)
    if vm != name:
        raise UsageError(
            f"--from {source}: a snapshot of {vm}, but the tasks run {name} "
            f"(hint: qvm slurm submit {vm} --from {source} ...)"
        )
    return resolve.run_dir(vm)


def _qvm_command() -> list[str]:
    """How the job runs qvm: this qvm's console script, by its absolute path (a batch job
    has its own PATH), else this Python with qvm's module."""
    script = Path(sys.executable).parent / "qvm"
    if script.is_file():
        return [str(script)]
    return [sys.executable, "-m", "qvm.cli"]


@commands.command("status")
def status(job: int = JOB, results: Path | None = RESULTS, as_json: bool = AS_JSON) -> None:
    """Each task of the job: pending, running, or how it ended, with its exit code.

    Slurm's word while it remembers the job (no accounting needed), then the tasks'
    result files. A task Slurm timed out says timeout; one cancelled says cancelled.

    JSON: schemas/slurm-status.json
    """
    report = _report(job, results, outputs=False)
    if as_json:
        emit_json(_report_json(report, outputs=False))
        return
    counts = ", ".join(f"{n} {state}" for state, n in report.counts().items())
    say(f"job {report.job_id}: {len(report.tasks)} task(s): {counts}")
    say(
        table(
            ["TASK", "STATE", "EXIT", "SECONDS", "NODE", "ERROR"],
            [
                (t.task, t.state, t.exit_code, t.seconds, t.node, _short(t.error))
                for t in report.tasks
            ],
        )
    )
    for problem in report.problems:
        warn(f"qvm: {problem}")


@commands.command("results")
def results(job: int = JOB, results: Path | None = RESULTS, as_json: bool = AS_JSON) -> None:
    """Each task's result: how it ended, its exit code, its output; exit 0 only when
    every task's program exited 0.

    JSON: schemas/slurm-results.json
    """
    report = _report(job, results, outputs=True)
    if as_json:
        emit_json(_report_json(report, outputs=True))
    else:
        for task in report.tasks:
            say(_task_line(task))
            for stream in (task.stdout, task.stderr):
                for line in (stream or "").splitlines():
                    say(f"  | {line}")
        for problem in report.problems:
            warn(f"qvm: {problem}")
    if not report.all_succeeded:
        raise SystemExit(EXIT_FAILURE)


def _report(job: int, results: Path | None, outputs: bool) -> JobReport:
    from qvm.ops.slurm import job_report

    if job < 1:
        raise UsageError(f"JOB: a Slurm job id, got {job}")
    return job_report(job, results, Path.cwd(), outputs)


def _task_line(task: TaskReport) -> str:
    code = "" if task.exit_code is None else f" {task.exit_code}"
    seconds = "" if task.seconds is None else f" in {task.seconds:.1f} s"
    error = "" if task.error is None else f": {task.error}"
    return f"task {task.task}: {task.state}{code}{seconds}{error} ({task.output})"


def _short(text: str | None, width: int = 60) -> str | None:
    if text is None or len(text) <= width:
        return text
    return text[: width - 3] + "..."


def _report_json(report: JobReport, outputs: bool) -> dict[str, Any]:
    tasks = []
    for task in report.tasks:
        data = task._asdict()
        data["seconds"] = task.seconds
        if not outputs:
            del data["stdout"], data["stderr"]
        tasks.append(data)
    return {
        "job_id": report.job_id,
        "results": report.results,
        "slurm_knows": report.slurm_knows,
        "counts": report.counts(),
        "tasks": tasks,
        "problems": list(report.problems),
    }
