"""The client side of a supervisor: is it alive, one request and one reply over
``supervisor.sock``, and what a run whose supervisor died leaves behind.

"Alive" is the flock on ``supervisor.lock``, never a pid the kernel may have reused.
"""

from __future__ import annotations

import os
import time
from typing import TYPE_CHECKING, TypeVar

from qvm.base.proc import same_process_alive
from qvm.errors import VmStateError
from qvm.layout.locks import is_locked, try_lock
from qvm.layout.rundir import RunDir
from qvm.store.state import ExitRecord, StateRecord, read_state, write_state
from qvm.supervisor.wire import ErrorReply, Request, decode_reply, encode, read_line

if TYPE_CHECKING:
    import socket

SUPERVISOR_ANSWER_TIMEOUT = 3.0
_Reply = TypeVar("_Reply")


# --- talking to a supervisor ---------------------------------------------------------


def supervisor_alive(run: RunDir) -> bool:
    return is_locked(run.lock_file)


def ask_supervisor(run: RunDir, request: Request[_Reply], timeout: float) -> _Reply:
    """One request, its reply; raises QvmError naming the VM on any failure (a reply that
    does not parse: RecordError)."""
    name = run.name
    deadline = time.monotonic() + timeout
    try:
        sock = connect_supervisor(run, deadline)
        with sock:
            sock.settimeout(max(deadline - time.monotonic(), 0.1))
            sock.sendall(encode(request.to_json()))
            data = read_line(sock)
    except TimeoutError as exc:
        raise VmStateError(
            f"{name}: the supervisor did not answer within {timeout:g} s "
            f"(hint: see {run.supervisor_log})"
        ) from exc
    except OSError as exc:
        raise VmStateError(f"{name}: cannot reach the supervisor: {exc.strerror or exc}") from exc
    if not data.strip():
        raise VmStateError(f"{name}: the supervisor gave no answer")
    reply = decode_reply(request, data, f"{name}: supervisor reply")
    if isinstance(reply, ErrorReply):
        raise VmStateError(f"{name}: supervisor: {reply.error}")
    return reply


def connect_supervisor(run: RunDir, deadline: float) -> socket.socket:
    """Connect, waiting while a live supervisor is still starting its request socket."""
    import socket  # not at the top: `qvm up` has no use for it (2-3 ms)

    while True:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            sock.connect(str(run.supervisor_socket))
            return sock
        except (FileNotFoundError, ConnectionRefusedError):
            sock.close()
            if time.monotonic() > deadline or not supervisor_alive(run):
                raise
            time.sleep(0.005)
        except OSError:
            sock.close()
            raise


# --- stale state ---------------------------------------------------------------------


def clean_stale(run: RunDir) -> StateRecord | None:
    """Recognise a run whose supervisor died, record it, and tidy the run dir.

    Returns the (possibly updated) state. Must be called without the lock held by us.
    A corrupt state.json is a RecordError.
    """
    state = read_state(run.state_file)
    if state is None or not state.live:
        return state
    lock_fd = try_lock(run.lock_file)
    if lock_fd is None:
        return state  # a supervisor is alive: nothing is stale
    try:
        return _mark_supervisor_died(run, state)
    finally:
        os.close(lock_fd)


def _mark_supervisor_died(run: RunDir, state: StateRecord) -> StateRecord:
    reason = f"supervisor (pid {state.supervisor_pid}) died unexpectedly"
    if same_process_alive(state.qemu_pid, state.qemu_start_time):
        # leave the record alone: the orphaned QEMU is still there to be killed
        return state._replace(
            orphaned=True, crash_reason=reason + f"; QEMU (pid {state.qemu_pid}) still runs"
        )
    state = state._replace(
        state="crashed",
        qemu_pid=None,
        crash_reason=reason,
        exit=ExitRecord(code=None, signal=None, reason=reason, failed=True, at=time.time()),
    )
    write_state(run.state_file, state)
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
