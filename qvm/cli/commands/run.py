"""qvm run: one command in a throwaway VM (qvm.ops.run)."""

from __future__ import annotations

import signal
import sys
import time
from pathlib import Path

from qvm.base.checking import TYPE_CHECKING
from qvm.cli import resolve
from qvm.cli.output import emit_json, warn
from qvm.cli.parsing.declare import MACHINE, PROGRAM, Commands, Option
from qvm.errors import EXIT_EXEC_FAILED, EXIT_USAGE, QvmError, UsageError

if TYPE_CHECKING:
    from qvm.definition.schema import Machine
    from qvm.layout.rundir import RunDir
    from qvm.ops.run import RunOutcome, RunSpec
    from qvm.store.run_result import RunResult

commands = Commands()


@commands.command("run")
def run(
    name: str = MACHINE,
    command: list[str] | None = PROGRAM,
    source: str | None = Option(
        None,
        "--from",
        metavar="VM@TAG",
        help="Resume a clone of this snapshot of NAME instead of booting.",
    ),
    timeout: float = Option(
        0.0,
        "--timeout",
        help="Seconds for the whole run, start to end (exit 124); 0, the default: no limit.",
    ),
    keep: bool = Option(False, "--keep", help="Leave the VM running afterwards."),
    env: list[str] | None = Option(
        None, "--env", help="NAME=VALUE added to the command's environment (repeatable)."
    ),
    result_file: Path | None = Option(
        None, "--result", metavar="FILE", help="Write the JSON record to FILE, however it ends."
    ),
    as_json: bool = Option(
        False, "--json", help="Print the JSON record: exit code, output, phases' seconds."
    ),
) -> None:
    """Run a program in a throwaway VM made from NAME's definition, then destroy the VM.

    qvm run NAME [--from VM@TAG] [--timeout S] [--keep] [--env K=V]... [--result FILE]
    [--json] [--] PROGRAM [ARG...]

    Each run is a VM of its own (NAME-run-XXXXXX), so runs of one definition can go at
    once. It is destroyed on every way out (the program's end, a failure, --timeout,
    SIGTERM, SIGINT) unless --keep. The program runs through the guest agent; its
    stdout and stderr are printed once it has ended.

    The exit status is the program's (128 + N when signal N ended it); qvm's own are
    124 (--timeout), 125 (qvm failed), 126 (cannot run it), 127 (no such program),
    143 and 130 (SIGTERM, SIGINT: the run was cancelled), and 2 for a mistake on the
    command line.

    JSON: schemas/run.json
    """
    from qvm.ops.run import Cancellation, RunCancelled, not_run, run_throwaway

    cancellation = Cancellation()  # from here on, SIGTERM and SIGINT end the run in order
    for signum in (signal.SIGTERM, signal.SIGINT):
        signal.signal(signum, lambda received, _frame: cancellation.cancel(received))
    started_at = time.time()
    try:
        spec = _spec(name, command, source, timeout, keep, env)
        outcome = run_throwaway(resolve.state_root(), spec, cancellation)
    except (QvmError, RunCancelled) as error:
        # before the VM was made: no VM to destroy, but --result says so all the same
        if isinstance(error, QvmError) and error.exit_code != EXIT_USAGE:
            error.exit_code = EXIT_EXEC_FAILED  # out of the way of the program's own codes
        if result_file is not None:
            _write_result(result_file, not_run(name, source, command or (), error, started_at))
        if isinstance(error, RunCancelled):
            raise SystemExit(128 + error.signum) from None
        raise
    _report(outcome, result_file, as_json)


def _spec(
    name: str,
    command: list[str] | None,
    source: str | None,
    timeout: float,
    keep: bool,
    env: list[str] | None,
) -> RunSpec:
    from qvm.ops.guest import parse_env
    from qvm.ops.run import RunSpec

    timeout = resolve.timeout_seconds(timeout)
    if not command:
        raise UsageError(f"qvm run {name} -- PROGRAM [ARG...]: no program given")
    try:
        extra = None if env is None else parse_env(env)
    except ValueError as error:
        raise UsageError(str(error)) from None
    machine = resolve.load(name)
    spec = RunSpec(
        definition=machine, command=tuple(command), env=extra, timeout=timeout or None, keep=keep
    )
    if source is None:
        return spec
    template_run, tag = _template(machine, source)
    return spec._replace(template_run=template_run, template=machine, tag=tag)


def _template(machine: Machine, source: str) -> tuple[RunDir, str]:
    """--from VM@TAG: VM must be NAME (a clone runs its template's definition). Its run
    dir is looked for in the state dir, then, in a Slurm job, in the user's own (where
    the template was saved before the job)."""
    from qvm.layout.rundir import run_dir_for, user_state_dir
    from qvm.ops.clone import parse_source

    vm, tag = parse_source(source)
    if vm != machine.name:
        raise UsageError(
            f"--from {source}: a snapshot of {vm}, but the run is of {machine.name} "
            f"(hint: qvm run {vm} --from {source} ...)"
        )
    template_run = resolve.run_dir(vm)
    if not template_run.path.exists() and resolve.settings.state_root is None:
        outside = run_dir_for(user_state_dir(), vm)
        if outside.path.exists():
            return outside, tag
    return template_run, tag


def _report(outcome: RunOutcome, result_file: Path | None, as_json: bool) -> None:
    """Print the output (or the record), write --result, exit with the run's status."""
    result = outcome.result
    if result_file is not None:
        _write_result(result_file, result)
    if as_json:
        emit_json(result.to_json())
    else:
        sys.stdout.buffer.write(outcome.stdout)
        sys.stdout.flush()
        sys.stderr.buffer.write(outcome.stderr)
        sys.stderr.flush()
        if result.error is not None:
            warn(f"qvm: {result.name}: {_unprefixed(result.error, result.name)}")
        if result.kept:
            warn(f"qvm: {result.name} left running (--keep): qvm rm {result.name} when done")
    raise SystemExit(result.status)


def _write_result(path: Path, result: RunResult) -> None:
    from qvm.store.run_result import write_run_result

    write_run_result(path, result)  # RecordWriteError: one line, exit 1


def _unprefixed(message: str, name: str) -> str:
    return message.removeprefix(f"{name}: ")
