"""`qvm down` and `qvm kill`: ask the live supervisor to end QEMU (ACPI, then the guest
agent's guest-shutdown, then quit, then SIGKILL, or SIGKILL at once) and wait until it
has gone; with no supervisor, end an orphaned QEMU by its recorded pid and start time.

No process is signalled on a record's word alone: its pid, start time and command line
must show it is this VM's QEMU or supervisor (``qvm.supervisor.client``). A supervisor
that does not take the request within ``ACCEPT_TIMEOUT`` (+1) seconds (SIGSTOPped,
stuck) is ended by qvm itself, with its QEMU, both by SIGKILL; the request it did not read
carries a deadline and is never carried out later. What is printed is what the state
record says happened, so concurrent `down`s and `kill`s agree.
"""

from __future__ import annotations

import contextlib
import os
import signal
import time
from collections.abc import Callable

from qvm.base.jsonfile import RecordWriteError
from qvm.base.proc import same_process_alive
from qvm.base.record import Record
from qvm.errors import NotRunningError, VmStateError
from qvm.layout.rundir import RunDir
from qvm.ops.corrupt_state import corrupt_state, still_running
from qvm.store.state import ExitRecord, StateRecord, ending, read_state, write_state
from qvm.supervisor.client import (
    ACCEPT_TIMEOUT,
    SupervisorUnresponsive,
    ask_supervisor,
    clean_stale,
    gone,
    qemu_identity_problem,
    release_run_locks,
    supervisor_alive,
    supervisor_identity_problem,
    take_run_locks,
)
from qvm.supervisor.wire import EndReply, KillRequest, StopRequest

# how long a killed process may take to be gone, and its supervisor's lock with it
KILL_WAIT = 10.0
SUPERVISOR_EXIT_WAIT = 15.0
# the supervisor's own stop: the ACPI phase (the user's timeout), then the guest agent
# (lock 3 s + sync 3 s + 10 s), then quit and SIGKILL (QMP call 2 s + 5 s + 5 s, see
# qvm.supervisor.process), with room to spare
STOP_ESCALATION = 40.0
KILL_REPLY_WAIT = 10.0

# --- down / kill ---------------------------------------------------------------------


class StopResult(Record):
    name: str
    ended_by: str | None  # "acpi", "agent", "quit", "kill", or None: it was not running
    message: str


ENDED_BY_TEXT = {
    "acpi": "the guest powered off after the ACPI power button",
    "agent": "the guest ignored the ACPI power button and powered off after the guest "
    "agent's guest-shutdown",
    "quit": "QEMU quit over QMP",
    "kill": "QEMU was killed (SIGKILL)",
}


def stop(
    run: RunDir, timeout: float, force: bool, on_accepted: Callable[[], None] | None = None
) -> StopResult:
    """End the VM as `qvm down` does. ``on_accepted``: called once the supervisor has
    taken the request, which it then carries out even if this process is interrupted."""
    _check_state_record(run)
    if not _supervisor_present(run):
        return _stop_without_supervisor(run, kill=False)
    asked_at = time.time()
    request = StopRequest(timeout, force, deadline=asked_at + ACCEPT_TIMEOUT)
    try:
        reply = ask_supervisor(run, request, timeout + STOP_ESCALATION, ACCEPT_TIMEOUT, on_accepted)
        _wait_supervisor_gone(run, SUPERVISOR_EXIT_WAIT)
    except SupervisorUnresponsive as error:
        return _end_unresponsive(run, "down", error)
    return _result(run, reply, asked_at)


def kill(run: RunDir) -> StopResult:
    _check_state_record(run)
    if not _supervisor_present(run):
        return _stop_without_supervisor(run, kill=True)
    asked_at = time.time()
    request = KillRequest(deadline=asked_at + ACCEPT_TIMEOUT)
    try:
        reply = ask_supervisor(run, request, timeout=KILL_REPLY_WAIT, accept_timeout=ACCEPT_TIMEOUT)
        _wait_supervisor_gone(run, SUPERVISOR_EXIT_WAIT)
    except SupervisorUnresponsive as error:
        return _end_unresponsive(run, "kill", error)
    return _result(run, reply, asked_at)


def _check_state_record(run: RunDir) -> None:
    """A corrupt state.json names no process to end: with proof that nothing of the VM
    runs, it is not running (NotRunningError, as for any stopped VM); else the error names
    the file. A live supervisor is asked as ever: it needs no record to end its QEMU."""
    if supervisor_alive(run):
        return
    error = corrupt_state(run)
    if error is None:
        return
    running = still_running(run)
    if running is None:
        hint = (
            f"{run.state_file} does not parse ({error.problem}): qvm up {run.name} moves "
            "it aside and starts the VM"
        )
        raise NotRunningError(run.name, hint=hint)
    raise VmStateError(
        f"{error.problem}; not signalled: {running}",
        file=str(run.state_file),
        key=error.key,
        hint="end that process yourself, then qvm up " + run.name,
    )


def _supervisor_present(run: RunDir) -> bool:
    """Its lock is held, or (one started by an earlier qvm, whose lock file someone
    deleted) the record's supervisor is verifiably alive: its QEMU is then no orphan."""
    if supervisor_alive(run):
        return True
    state = read_state(run.state_file)
    return state is not None and state.live and supervisor_identity_problem(run, state) is None


# --- what happened, from the record ------------------------------------------------------


def how_it_ended(ended: ExitRecord) -> str | None:
    """acpi, quit or kill, as the supervisor's exit record tells it (None: otherwise), in
    the words `status` uses for the same record (``qvm.store.state.ending``)."""
    return ending(ended.ended_by or "stop", ended.signal, ended.reason)


def _result(run: RunDir, reply: EndReply, asked_at: float) -> StopResult:
    """What the record says ended QEMU: a `down` and a `kill` run at once both print the
    one end that happened, whichever of them caused it."""
    try:
        state = read_state(run.state_file)
    except Exception:  # noqa: BLE001 - the reply alone still says something true
        state = None
    ended = state.exit if state is not None else None
    if ended is None or ended.at < asked_at - 1.0 or state is None or state.live:
        return _from_reply(run.name, reply.ended_by)
    how = how_it_ended(ended)
    text = ENDED_BY_TEXT[how] if how else f"QEMU ended: {ended.reason}"
    if reply.ended_by is None:
        text = f"{text} (as another command asked, just before)"
    return StopResult(run.name, how, text)


def _from_reply(name: str, ended_by: str | None) -> StopResult:
    return StopResult(name, ended_by, ENDED_BY_TEXT.get(ended_by or "", "it was not running"))


# --- no supervisor -----------------------------------------------------------------------


def _stop_without_supervisor(run: RunDir, kill: bool) -> StopResult:
    """No supervisor: an orphaned QEMU (its supervisor was killed) is ended by pid, once
    its identity is verified."""
    name = run.name
    state = read_state(run.state_file)
    if state is None or not state.live or state.qemu_pid is None:
        clean_stale(run)
        raise NotRunningError(name)
    problem = qemu_identity_problem(run, state)
    if problem is not None:
        clean_stale(run)
        if gone(problem):
            raise NotRunningError(name)
        raise VmStateError(
            f"not signalled: {problem}",
            vm=name,
            hint=f"{run.state_file} is stale or not qvm's; no process of this VM runs",
        )
    pid = state.qemu_pid
    _sigkill(pid)
    _wait_gone(pid, state.qemu_start_time, KILL_WAIT)
    clean_stale(run)
    return StopResult(name, "kill", f"killed QEMU (pid {pid}), whose supervisor had died")


# --- a supervisor that does not answer -------------------------------------------------


def _end_unresponsive(run: RunDir, verb: str, error: SupervisorUnresponsive) -> StopResult:
    """The supervisor did not take (or finish) the request in time: end it and its QEMU
    by SIGKILL, each only once its identity is verified, and record what happened."""
    name = run.name
    state = read_state(run.state_file)
    if state is None:
        raise error
    supervisor_problem = supervisor_identity_problem(run, state)
    qemu_problem = qemu_identity_problem(run, state) if state.qemu_pid else "no QEMU recorded"
    ended = []
    if supervisor_problem is None:
        # first: a supervisor woken later must not find its QEMU gone and restart it
        _sigkill(state.supervisor_pid)
        ended.append(f"the supervisor (pid {state.supervisor_pid})")
    if qemu_problem is None and state.qemu_pid is not None:
        _sigkill(state.qemu_pid)
        ended.append(f"QEMU (pid {state.qemu_pid})")
    if not ended:
        if gone(supervisor_problem) and gone(qemu_problem):
            clean_stale(run)
            raise NotRunningError(name)
        raise VmStateError(
            f"the supervisor {error.what}; qvm did not end it itself: {supervisor_problem}",
            vm=name,
            hint=f"see {run.supervisor_log}",
        )
    if supervisor_problem is None:
        _wait_gone(state.supervisor_pid, state.supervisor_start_time, KILL_WAIT)
    if qemu_problem is None and state.qemu_pid is not None:
        _wait_gone(state.qemu_pid, state.qemu_start_time, KILL_WAIT)
    what = " and ".join(ended)
    message = f"the supervisor {error.what}: qvm killed {what} itself (SIGKILL)"
    _record_forced_end(run, state, verb, message)
    return StopResult(name, "kill", message)


def _record_forced_end(run: RunDir, state: StateRecord, verb: str, message: str) -> None:
    """The exit record the dead supervisor could not write (unless it did, or another
    supervisor runs by now: then its record stands)."""
    deadline = time.monotonic() + KILL_WAIT
    while (locks := _try_locks(run)) is None:
        if time.monotonic() > deadline:
            return
        time.sleep(0.02)
    try:
        now = read_state(run.state_file)
        if now is None or not now.live or now.supervisor_pid != state.supervisor_pid:
            return
        at = time.time()
        ran = round(at - now.started_at, 3) if now.started_at else None
        reason = f"killed by SIGKILL (qvm {verb}: {message})"
        record = now._replace(
            state="stopped",
            qemu_pid=None,
            crash_reason=None,
            next_restart_at=None,
            exit=ExitRecord(
                code=None,
                signal="SIGKILL",
                reason=reason,
                failed=False,
                at=at,
                ran_seconds=ran,
                ended_by="kill",
            ),
        )
        # QEMU is ended, which is what was asked; if the disk refuses the record, the
        # next status says the supervisor died
        with contextlib.suppress(RecordWriteError):
            write_state(run.state_file, record)
        run.remove_qemu_sockets()
        run.supervisor_socket.unlink(missing_ok=True)
    finally:
        release_run_locks(locks)


def _try_locks(run: RunDir) -> tuple[int, int] | None:
    try:
        return take_run_locks(run)
    except OSError:
        return None


def _sigkill(pid: int) -> None:
    # it may have ended between the identity check and now: so much the better
    with contextlib.suppress(ProcessLookupError):
        os.kill(pid, signal.SIGKILL)


def _wait_gone(pid: int, start_time: int | None, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while same_process_alive(pid, start_time) and time.monotonic() < deadline:
        time.sleep(0.02)


def _wait_supervisor_gone(run: RunDir, timeout: float) -> None:
    """After its reply, the supervisor exits: one that does not is treated as stuck."""
    deadline = time.monotonic() + timeout
    while supervisor_alive(run):
        if time.monotonic() > deadline:
            raise SupervisorUnresponsive(run, f"did not exit within {timeout:g} s")
        time.sleep(0.01)
