"""The client side of a supervisor: is it alive, one request and one reply over
``supervisor.sock``, which processes are this VM's (before any is signalled), and what a
run whose supervisor died leaves behind.

"Alive" is the flock on the run dir (``qvm.layout.locks``), never a pid the kernel may
have reused, and never a lock file that someone can delete. A pid from a record is
signalled only once its identity is verified: pid, start time, and a command line that
names this run dir (``qemu_identity_problem``, ``supervisor_identity_problem``).
"""

from __future__ import annotations

import os
import time

from qvm.base.checking import TYPE_CHECKING
from qvm.base.jsonfile import RecordWriteError
from qvm.base.proc import identity_problem
from qvm.errors import VmStateError
from qvm.layout.locks import supervisor_lock_held, try_lock, try_lock_dir
from qvm.layout.rundir import RunDir
from qvm.layout.runfiles import SUPERVISOR_LOCK
from qvm.store.state import (
    ExitRecord,
    StateRecord,
    forget_kept,
    kept_record,
    read_state,
    write_state,
)

if TYPE_CHECKING:
    import socket
    from collections.abc import Callable
    from typing import TypeVar

    from qvm.supervisor.wire import Accepted, ErrorReply, Request

    _Reply = TypeVar("_Reply")

SUPERVISOR_ANSWER_TIMEOUT = 3.0
# A stop or kill carries a deadline this far ahead: a supervisor that has not read it by
# then (SIGSTOPped, stuck) never carries it out, and the client ends QEMU itself.
ACCEPT_TIMEOUT = 5.0
# The client waits this much longer than the deadline it sent, so that an "accepted"
# written just before the deadline still arrives.
ACCEPT_MARGIN = 1.0


class SupervisorUnresponsive(VmStateError):
    """The supervisor did not answer in time: SIGSTOPped, or stuck. ``what`` says what it
    did not do, e.g. "did not answer within 6 s"."""

    def __init__(self, run: RunDir, what: str) -> None:
        self.what = what
        super().__init__(f"{run.name}: the supervisor {what} (hint: see {run.supervisor_log})")


# --- talking to a supervisor ---------------------------------------------------------


def supervisor_alive(run: RunDir) -> bool:
    return supervisor_lock_held(run.location, run.file(SUPERVISOR_LOCK))


def take_run_locks(run: RunDir) -> tuple[int, int] | None:
    """Both of a supervisor's locks (the run dir's and ``supervisor.lock``), or None if a
    live process holds either. The caller closes both fds (or hands them on)."""
    dir_fd = try_lock_dir(run.path)
    if dir_fd is None:
        return None
    try:
        file_fd = try_lock(run.lock_file)
    except BaseException:
        os.close(dir_fd)
        raise
    if file_fd is None:
        os.close(dir_fd)
        return None
    return dir_fd, file_fd


def release_run_locks(fds: tuple[int, int]) -> None:
    for fd in fds:
        os.close(fd)


def ask_supervisor(
    run: RunDir,
    request: Request[_Reply],
    timeout: float,
    accept_timeout: float | None = None,
    on_accepted: Callable[[], None] | None = None,
) -> _Reply:
    """One request, its reply; raises QvmError naming the VM on any failure (a reply that
    does not parse: RecordError; no answer in time: SupervisorUnresponsive).

    With ``accept_timeout`` (a request that carries a deadline and ``ack``), the
    supervisor must say "accepted" within it, and then reply within ``timeout``; from
    then on it carries the request out whether or not its asker waits (``on_accepted``
    is called then)."""
    # not at the top: `qvm up` and `qvm list` of stopped VMs never ask (0.5 ms of records)
    from qvm.supervisor.wire import (  # noqa: PLC0415
        EXPIRED,
        Accepted,
        ErrorReply,
        LineReader,
        encode,
    )

    name = run.name
    first_wait = accept_timeout + ACCEPT_MARGIN if accept_timeout is not None else timeout
    waited = first_wait
    try:
        sock = connect_supervisor(run, time.monotonic() + first_wait)
        with sock:
            sock.settimeout(first_wait)
            sock.sendall(encode(request.to_json()))
            lines = LineReader(sock)
            reply = _decode(run, request, lines.line())
            if isinstance(reply, Accepted):
                if on_accepted is not None:
                    on_accepted()
                waited = timeout
                sock.settimeout(timeout)
                reply = _decode(run, request, lines.line())
    except TimeoutError as exc:
        raise SupervisorUnresponsive(run, f"did not answer within {waited:g} s") from exc
    except OSError as exc:
        raise VmStateError(f"{name}: cannot reach the supervisor: {exc.strerror or exc}") from exc
    if isinstance(reply, Accepted):
        raise VmStateError(f"{name}: the supervisor accepted the request twice")
    if isinstance(reply, ErrorReply):
        if reply.error.startswith(EXPIRED):
            raise SupervisorUnresponsive(run, f"did not answer within {waited:g} s")
        raise VmStateError(f"{name}: supervisor: {reply.error}")
    return reply


def _decode(run: RunDir, request: Request[_Reply], data: bytes) -> _Reply | ErrorReply | Accepted:
    from qvm.supervisor.wire import decode_reply  # noqa: PLC0415 -- as in ask_supervisor

    if not data.strip():
        raise VmStateError(f"{run.name}: the supervisor gave no answer")
    return decode_reply(request, data, f"{run.name}: supervisor reply")


def connect_supervisor(run: RunDir, deadline: float) -> socket.socket:
    """Connect, waiting while a live supervisor is still starting its request socket."""
    import socket  # noqa: PLC0415 -- `qvm up` has no use for it (2-3 ms)

    while True:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            sock.connect(str(run.supervisor_socket))
            return sock
        except (FileNotFoundError, ConnectionRefusedError):
            sock.close()
            if time.monotonic() > deadline:
                raise TimeoutError from None
            if not supervisor_alive(run):
                raise
            time.sleep(0.005)
        except OSError:
            sock.close()
            raise


# --- whose process is it -------------------------------------------------------------


def qemu_identity_problem(run: RunDir, state: StateRecord) -> str | None:
    """Why the QEMU ``state`` names may not be signalled as this VM's, or None.

    QEMU's command line names this run dir's sockets (``qvm.cmdline``); an unrelated
    process a planted or stale record names does not."""
    marks = {str(path) for path in (run.events_socket, run.qmp_socket)}
    marks |= {mark.replace(",", ",,") for mark in marks}  # escaped as QEMU options

    def belongs(argv: list[str]) -> bool:
        return any(mark in arg for arg in argv for mark in marks)

    return identity_problem(state.qemu_pid, state.qemu_start_time, f"{run.name}'s QEMU", belongs)


def supervisor_identity_problem(run: RunDir, state: StateRecord) -> str | None:
    """Why the supervisor ``state`` names may not be signalled as this VM's, or None.

    A supervisor runs ``python -m qvm.supervisor RUNDIR ...`` (``qvm.supervisor.spawn``).
    Until that exec (while QEMU's monitor first answers) it is still the forked ``qvm up``,
    and is not recognised: it is then left alone."""
    here = os.path.abspath(run.path)

    def belongs(argv: list[str]) -> bool:
        if "qvm.supervisor" not in argv:
            return False
        after = argv[argv.index("qvm.supervisor") + 1 :]
        return bool(after) and os.path.abspath(after[0]) == here

    return identity_problem(
        state.supervisor_pid, state.supervisor_start_time, f"{run.name}'s supervisor", belongs
    )


def gone(problem: str | None) -> bool:
    """The identity problem is only that the process has ended."""
    return problem is not None and problem.endswith("is no longer running")


# --- stale state ---------------------------------------------------------------------


def clean_stale(run: RunDir) -> StateRecord | None:
    """Recognise a run whose supervisor died, record it, and tidy the run dir.

    Returns the (possibly updated) state. Must be called without the lock held by us.
    A corrupt state.json is a RecordError; a record that cannot be written (full disk) is
    not an error here: the returned state says what the file would.

    A supervisor whose state.json refused its last record kept it elsewhere
    (``qvm.store.state.keep_elsewhere``): that record is the truth then, put back into
    state.json when it takes it, and ``kept_in`` says where it came from.
    """
    state = read_state(run.state_file)
    if state is None or not state.live:
        return state
    try:
        locks = take_run_locks(run)
    except OSError:
        return state  # the run dir cannot even be opened: nothing to tidy
    if locks is None:
        return state  # a supervisor is alive: nothing is stale
    try:
        kept = kept_record(run.path, state)
        if kept is not None and not kept.live:
            return _restore_kept(run, kept)
        return _mark_supervisor_died(run, kept or state)
    finally:
        release_run_locks(locks)


def _restore_kept(run: RunDir, kept: StateRecord) -> StateRecord:
    """The supervisor's last record, kept elsewhere, back in state.json if it takes it
    now; the kept file goes once it has."""
    try:
        write_state(run.state_file, kept)
    except RecordWriteError:
        return kept  # still said from where it is kept, next time too
    if kept.kept_in is not None:
        forget_kept(kept.kept_in)
    run.remove_qemu_sockets()
    run.supervisor_socket.unlink(missing_ok=True)
    return kept


def _mark_supervisor_died(run: RunDir, state: StateRecord) -> StateRecord:
    # it was killed, or it ended as planned but the disk refused its last record (EIO,
    # EROFS): from here the two look the same, so say both
    reason = (
        f"supervisor (pid {state.supervisor_pid}) ended without its last record "
        "(killed, or the state dir refused the write; see supervisor.log)"
    )
    qemu_problem = qemu_identity_problem(run, state) if state.qemu_pid else None
    if state.qemu_pid and qemu_problem is None:
        # leave the record alone: the orphaned QEMU is still there to be killed
        return state._replace(
            orphaned=True, crash_reason=reason + f"; QEMU (pid {state.qemu_pid}) still runs"
        )
    if state.qemu_pid and not gone(qemu_problem):
        reason += f"; the QEMU it names is not signalled: {qemu_problem}"
    state = state._replace(
        state="crashed",
        qemu_pid=None,
        crash_reason=reason,
        exit=ExitRecord(code=None, signal=None, reason=reason, failed=True, at=time.time()),
    )
    try:
        write_state(run.state_file, state)
    except RecordWriteError:
        return state  # said again next time, once the disk takes it
    run.remove_qemu_sockets()
    run.supervisor_socket.unlink(missing_ok=True)
    return state


def wait_not_running(run: RunDir, timeout: float) -> bool:
    """Wait until no supervisor is alive (e.g. the guest powered itself off)."""
    deadline = time.monotonic() + timeout
    while supervisor_alive(run):
        if time.monotonic() > deadline:
            return False
        time.sleep(0.02)
    return True
