"""`qvm run`: one command in a throwaway VM, made, used and destroyed on every path out.

The throwaway is a VM of its own (``NAME-run-XXXXXX``: its own run dir, its own
supervisor), so any number of runs of one definition go at once. Cold, it is the
definition with another name: its disks are copy-on-write overlays in its run dir
(a ``file =`` image is only read), its host ports are picked by QEMU (port 0) and it is
never restarted. With ``--from VM@TAG`` it is a clone of that snapshot
(``qvm.ops.clone``): QEMU resumes the snapshot's memory image instead of booting.

Then the command runs through the guest agent (``qvm.ops.guest.run_command``), and the VM
is killed and its run dir removed, unless ``keep``. A SIGTERM or SIGINT becomes a
``RunCancelled`` (the CLI's signal handlers call ``Cancellation.cancel``) that ends the
run in an orderly way; during the start and the teardown it is held back until they are
done, so that no half-started VM is left behind.
"""

from __future__ import annotations

import contextlib
import os
import secrets
import signal
import time
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path

from qvm.base.record import Record
from qvm.definition.load import load_machine
from qvm.definition.schema import DiskSpec, Machine
from qvm.errors import (
    EXIT_CANNOT_RUN,
    EXIT_EXEC_FAILED,
    EXIT_EXEC_TIMEOUT,
    EXIT_NOT_FOUND,
    NotRunningError,
    QvmError,
    WaitTimeout,
)
from qvm.layout.rundir import RunDir, job_state_dir
from qvm.ops.access import wait_ready
from qvm.ops.guest import ExecOutcome, run_command
from qvm.ops.stop import kill
from qvm.ops.up import plan_launch, start_vm
from qvm.store.run_result import RunResult

RUN_INFIX = "-run-"
TOKEN_BYTES = 3  # 6 hex digits: 16 million names per definition
# the definition's name is cut to this: the throwaway's name (35 at most) stays short for
# the sockets in its run dir, whose path a deep state dir (a Slurm job's) makes long
NAME_ROOM = 24
# how long the guest agent may take to answer without --timeout (a cold boot of a cloud
# image under TCG takes a minute)
AGENT_WAIT = 300.0


class RunCancelled(BaseException):
    """SIGTERM or SIGINT arrived: end the run (a BaseException, so that no ``except
    QvmError`` or ``except Exception`` on the way swallows it)."""

    def __init__(self, signum: int) -> None:
        super().__init__(signum)
        self.signum = signum


class Cancellation:
    """Where the CLI's SIGTERM/SIGINT handlers go. Outside a shield, a signal raises
    RunCancelled at once; inside one, it is noted and raised when the shield ends (never
    while tearing down: the teardown then goes on to its end)."""

    def __init__(self) -> None:
        self.signum: int | None = None
        self.shielded = False
        self.tearing_down = False

    def cancel(self, signum: int) -> None:
        first = self.signum is None
        self.signum = self.signum or signum
        if first and not self.shielded and not self.tearing_down:
            raise RunCancelled(signum)

    @contextlib.contextmanager
    def shield(self) -> Iterator[None]:
        self.shielded = True
        try:
            yield
        finally:
            self.shielded = False
        if self.signum is not None and not self.tearing_down:
            raise RunCancelled(self.signum)


class RunSpec(Record):
    """What to run: the definition, where from, the command, its limits."""

    definition: Machine
    command: tuple[str, ...]
    env: Mapping[str, str] | None = None
    timeout: float | None = None  # the whole run's, boot to the command's end
    keep: bool = False
    # --from VM@TAG: the template's run dir and definition, and the tag
    template_run: RunDir | None = None
    template: Machine | None = None
    tag: str | None = None

    @property
    def source(self) -> str | None:
        if self.template_run is None:
            return None
        return f"{self.template_run.name}@{self.tag}"


class RunOutcome(Record):
    """The record, and CMD's output as the exact bytes (the record holds it as text)."""

    result: RunResult
    stdout: bytes = b""
    stderr: bytes = b""


def throwaway_name(definition: str) -> str:
    return f"{definition[:NAME_ROOM]}{RUN_INFIX}{secrets.token_hex(TOKEN_BYTES)}"


def throwaway_machine(machine: Machine, name: str) -> Machine:
    """The definition as a throwaway runs it: its own name; its disks overlays in its run
    dir (so runs at once share no writable image, and the user's images are only read);
    every host port picked by QEMU; on a network, its own MAC and address (the source
    may run beside it); no restarts (a crash ends the run)."""
    return machine._replace(
        name=name,
        disks=tuple(_overlay_of(disk) for disk in machine.disks),
        nics=tuple(
            nic._replace(
                forwards=tuple(fwd._replace(host_port=0) for fwd in nic.forwards),
                **({"mac": None, "address": None} if nic.network is not None else {}),
            )
            for nic in machine.nics
        ),
        supervisor=machine.supervisor._replace(restart="no"),
    )


def _overlay_of(disk: DiskSpec) -> DiskSpec:
    if disk.file is None or disk.readonly:
        return disk
    return disk._replace(base=disk.file, file=None)


class _Clock:
    """The seconds of each phase, as they end."""

    def __init__(self, first: str) -> None:
        self.phases: dict[str, float | None] = dict.fromkeys(
            (first, "agent_ready", "command", "teardown")
        )

    @contextlib.contextmanager
    def phase(self, name: str) -> Iterator[None]:
        started = time.monotonic()
        try:
            yield
        finally:
            self.phases[name] = round(time.monotonic() - started, 3)


def run_throwaway(
    state_root: Path, spec: RunSpec, cancellation: Cancellation | None = None
) -> RunOutcome:
    """Make the throwaway, run the command, destroy it; the record of all that. Never
    raises a QvmError: a failure is a record with state "failed" and status 125 (126/127
    when the command could not be started, as `qvm exec` says)."""
    cancellation = cancellation or Cancellation()
    started_at = time.time()
    deadline = None if not spec.timeout else time.monotonic() + spec.timeout
    run = RunDir(state_root / throwaway_name(spec.definition.name))
    first = "restore" if spec.template_run is not None else "boot"
    clock = _Clock(first)
    outcome: ExecOutcome | None = None
    state, error, status = "failed", None, EXIT_EXEC_FAILED
    try:
        with clock.phase(first), cancellation.shield():
            _start(run, spec)
        with clock.phase("agent_ready"):
            wait_ready(run, "agent", None, _remaining(deadline, AGENT_WAIT))
            if run.networks_file.exists():
                _wait_networks(run, _remaining(deadline, AGENT_WAIT))
        with clock.phase("command"):
            outcome = run_command(
                run, spec.command, spec.env, None, _remaining(deadline, None) or None
            )
        if outcome.timed_out:
            state, status = "timeout", EXIT_EXEC_TIMEOUT
            error = f"{spec.command[0]} still ran after --timeout {spec.timeout:g} s"
        elif outcome.status is not None:
            state, status = "exited", outcome.status.status
    except RunCancelled as cancelled:
        state, status, error = _cancelled(cancelled)
    except WaitTimeout as timed_out:
        if deadline is not None and time.monotonic() >= deadline:
            state, status = "timeout", EXIT_EXEC_TIMEOUT
        error = str(timed_out)
    except QvmError as failed:
        error = str(failed)
        if failed.exit_code in (EXIT_CANNOT_RUN, EXIT_NOT_FOUND):
            status = failed.exit_code
    finally:
        if not spec.keep:
            cancellation.tearing_down = True
            with clock.phase("teardown"):
                problem = _destroy(run)
                drop_empty_job_dir(state_root, os.environ)
            if problem and error is None:
                error = problem
    ran = outcome.status if outcome is not None else None
    result = RunResult(
        name=run.name,
        definition=spec.definition.name,
        source=spec.source,
        state=state,
        exit_code=ran.exit_code if ran is not None else None,
        signal=ran.signal if ran is not None else None,
        status=status,
        stdout=ran.stdout.decode(errors="replace") if ran is not None else "",
        stderr=ran.stderr.decode(errors="replace") if ran is not None else "",
        phases=clock.phases,
        started_at=started_at,
        ended_at=time.time(),
        error=error,
        command=spec.command,
        kept=spec.keep,
    )
    if ran is None:
        return RunOutcome(result)
    return RunOutcome(result, ran.stdout, ran.stderr)


def not_run(
    definition: str,
    source: str | None,
    command: Sequence[str],
    error: QvmError | RunCancelled,
    started_at: float,
) -> RunResult:
    """The record of a run that ended before its VM was made: a bad name or definition,
    or a signal while they were read."""
    if isinstance(error, RunCancelled):
        state, status, message = _cancelled(error)
    else:
        state, status, message = "failed", error.exit_code, str(error)
    return RunResult(
        name="",
        definition=definition,
        source=source,
        state=state,
        exit_code=None,
        signal=None,
        status=status,
        stdout="",
        stderr="",
        phases={},
        started_at=started_at,
        ended_at=time.time(),
        error=message,
        command=tuple(command),
    )


def _cancelled(cancelled: RunCancelled) -> tuple[str, int, str]:
    """State, exit status (128 + N, as a shell reports it) and reason of a cancelled run."""
    name = signal.Signals(cancelled.signum).name
    return "cancelled", 128 + cancelled.signum, f"cancelled by {name}"


def _remaining(deadline: float | None, otherwise: float | None) -> float:
    if deadline is None:
        return otherwise or 0.0
    left = deadline - time.monotonic()
    if left <= 0:
        raise WaitTimeout("--timeout: no time left")
    return left


def _start(run: RunDir, spec: RunSpec) -> None:
    """The throwaway's first start: a cold boot, or a clone's resume of a snapshot."""
    if spec.template_run is None:
        machine = throwaway_machine(spec.definition, run.name)
    else:
        from qvm.ops.clone import clone  # noqa: PLC0415 -- only with --from

        assert spec.template is not None and spec.tag is not None
        path = _clone_machine_file(run)
        clone(spec.template_run, spec.template, spec.tag, run.name, path, run)
        machine = load_machine(path)
    start_vm(plan_launch(machine, run), wait=True)


def _wait_networks(run: RunDir, timeout: float) -> None:
    """On a network, the command runs once the guest has its address and the members'
    names (a clone's has its source's until then)."""
    from qvm.ops.netguest import SETUP_WAIT, wait_guest_set_up  # noqa: PLC0415 -- networks only

    problem = wait_guest_set_up(run, min(timeout, SETUP_WAIT))
    if problem is not None:
        raise WaitTimeout(f"{run.name}: its network setup: {problem}")


def _leave_networks(run: RunDir) -> list[str]:
    """Each run is a new VM: its addresses go back, or the subnet fills up run by run."""
    from qvm.ops.net import give_back_addresses  # noqa: PLC0415 -- only on networks

    try:
        give_back_addresses(run)
    except (QvmError, OSError) as error:
        return [f"giving back its network addresses: {error}"]
    return []


def _clone_machine_file(run: RunDir) -> Path:
    """With --from, the clone's machine file lies in its own run dir: it goes with it."""
    return run.path / f"{run.name}.toml"


def drop_empty_job_dir(state_root: Path, environ: Mapping[str, str]) -> None:
    """A Slurm task's state root is its own folder on the node (``job_state_dir``): once
    its throwaway is gone, nothing of the task is left behind, not even that folder."""
    if "QVM_STATE_DIR" in environ or state_root != job_state_dir(environ):
        return
    with contextlib.suppress(OSError):  # not empty: another VM of the job's, kept there
        state_root.rmdir()


def _destroy(run: RunDir) -> str | None:
    """Kill the throwaway and remove its run dir (its machine file too, with --from);
    what could not be done, in a line, or None."""
    from qvm.ops.files import remove  # noqa: PLC0415 -- only at the end of a run

    problems = []
    if run.path.exists():
        try:
            kill(run)
        except NotRunningError:
            pass  # it never started, or its QEMU ended by itself
        except QvmError as error:
            problems.append(f"kill: {error}")
        if run.networks_file.exists():
            problems.extend(_leave_networks(run))
        try:
            # not `rm --purge`, which also deletes downloaded base images no VM uses
            _clone_machine_file(run).unlink(missing_ok=True)
            removed = remove(run, purge=False)
        except (QvmError, OSError) as error:
            problems.append(f"rm: {error}")
        else:
            problems.extend(f"kept {path}: {why}" for path, why in removed.kept)
    return "; ".join(problems) or None
