"""Starting a supervisor: the ``qvm up`` side of the fork.

``start_supervisor`` takes the VM's ``supervisor.lock`` and forks; the child leaves the
CLI's session and output and runs ``qvm.supervisor.spawn.start``, which spawns QEMU and
execs the supervisor proper. The parent reads the readiness pipe ("spawned", "ready",
"failed") and reports, so two concurrent ``up``s of one VM start exactly one QEMU.
"""

from __future__ import annotations

import contextlib
import os
import select
import threading
import time
from pathlib import Path

from qvm.base.checking import TYPE_CHECKING
from qvm.base.record import Record
from qvm.errors import HostError, LaunchError, QvmError, VmStateError
from qvm.layout.rundir import RunDir
from qvm.store.launch import LaunchRecord, write_launch
from qvm.store.state import read_state
from qvm.supervisor.client import (
    ACCEPT_TIMEOUT,
    ask_supervisor,
    clean_stale,
    release_run_locks,
    take_run_locks,
)
from qvm.supervisor.spawn import CHILD_IMPORTS, start

if TYPE_CHECKING:
    from typing import NoReturn

DEFAULT_READY_TIMEOUT = 60.0
# `qvm up` of several VMs starts them from threads (``qvm.ops.fanout``). A fork while
# another thread holds its VM's locks, or the write end of its readiness pipe, would give
# copies of them to this VM's supervisor until it execs, seconds later (it waits for QMP
# first): that VM would look alive, or its `up` would wait for an end of file that does
# not come. So one thread at a time takes its locks, forks and lets them go.
_FORK = threading.Lock()


# --- up ------------------------------------------------------------------------------


class UpResult(Record):
    name: str
    already_running: bool
    qemu_pid: int | None
    accel: str | None
    accel_reason: str | None
    serial_log: Path
    qmp_socket: Path
    ready: bool
    notes: tuple[str, ...] = ()  # what the start changed that the user should hear (qvm.ops)


def rotate_log(path: Path) -> None:
    """Keep the previous run's log as NAME.1 so that each run's log starts empty."""
    if path.exists():
        os.replace(path, path.with_name(path.name + ".1"))


def start_supervisor(
    run: RunDir, launch: LaunchRecord, wait: bool, timeout: float = DEFAULT_READY_TIMEOUT
) -> UpResult:
    """Start a supervisor for a prepared launch, unless one is alive already."""
    name = launch.name
    if threading.active_count() > 1:
        _import_child_modules()
    with _FORK:
        locks = _take_run(run, name)
        if locks is not None:
            try:
                _prepare_files(run, launch)
                ready_read, ready_write = os.pipe()
                supervisor_pid = os.fork()
                if supervisor_pid == 0:
                    _become_supervisor(run, launch, ready_read, ready_write, locks)
                os.close(ready_write)
            finally:
                release_run_locks(locks)  # the supervisor holds its own copies now
    if locks is None:
        return _already_running(run, name, wait, timeout)
    try:
        lines, eof = _read_readiness(
            ready_read, want="ready" if wait else "spawned", timeout=timeout
        )
    finally:
        os.close(ready_read)
    last = lines[-1].split()[0] if lines and lines[-1].split() else None
    if last != ("ready" if wait else "spawned"):
        # "failed" or end of file: the supervisor is ending; otherwise time ran out
        timed_out = last != "failed" and not eof
        exit_code = None if timed_out else _reap(supervisor_pid, timeout=10)
        raise _launch_failure(run, name, exit_code, timed_out=timed_out)
    qemu_pid = int(lines[-1].split()[1]) if len(lines[-1].split()) > 1 else None
    return UpResult(
        name=name,
        already_running=False,
        qemu_pid=qemu_pid,
        accel=launch.accel,
        accel_reason=launch.accel_reason,
        serial_log=run.serial_log,
        qmp_socket=run.qmp_socket,
        ready=wait,
    )


def _import_child_modules() -> None:
    """What the forked child imports before its exec, imported whole here first: a module
    another thread is importing at the fork would stay locked in the child for ever."""
    import importlib  # noqa: PLC0415 -- only when several VMs start from threads

    for name in CHILD_IMPORTS:
        importlib.import_module(name)


def run_foreground(run: RunDir, launch: LaunchRecord, stop_budget: float) -> NoReturn:
    """`qvm up --foreground`: become the VM's supervisor in this very process (no fork,
    no setsid; ``qvm.supervisor.foreground``), and exit, when the VM has ended, with how
    it ended. A VM that runs already is refused: its supervisor is another process."""
    name = launch.name
    locks = _take_run(run, name)
    if locks is None:
        raise VmStateError(
            f"{name}: already running under another supervisor "
            f"(hint: qvm down {name}, then qvm up --foreground {name})"
        )
    try:
        _prepare_files(run, launch)
        os.chdir(run.path)
    except BaseException:
        release_run_locks(locks)
        raise
    # absolute: the supervisor's command line is how clients recognise it
    start(os.path.abspath(run.path), launch, None, locks, stop_budget)


def _take_run(run: RunDir, name: str) -> tuple[int, int] | None:
    """The run dir's locks, for a new supervisor; None while one is alive."""
    run.create()
    state = clean_stale(run)
    if state is not None and state.orphaned:
        raise VmStateError(
            f"{name}: {state.crash_reason} (hint: qvm kill {name}, then qvm up {name})"
        )
    try:
        return take_run_locks(run)
    except OSError as error:
        raise HostError(
            f"{name}: cannot lock run dir {run.path}: {error.strerror or error}"
        ) from error


def _prepare_files(run: RunDir, launch: LaunchRecord) -> None:
    """A fresh start's run dir: no sockets of the last run, its logs kept as NAME.1."""
    try:
        run.remove_qemu_sockets()
        run.supervisor_socket.unlink(missing_ok=True)
        rotate_log(run.serial_log)
        rotate_log(run.qemu_log)
        run.pending_file.unlink(missing_ok=True)
    except OSError as error:
        raise HostError(
            f"{launch.name}: cannot prepare run dir {run.path}: {error.strerror or error}"
        ) from error
    write_launch(run.launch_file, launch)  # RecordWriteError: one line


def _become_supervisor(
    run: RunDir, launch: LaunchRecord, ready_read: int, ready_write: int, locks: tuple[int, int]
) -> NoReturn:
    """In the child of ``os.fork``: leave the CLI's session and output, start QEMU, and
    exec into the supervisor (``qvm.supervisor.spawn.start``). Never returns to the CLI's code."""
    try:
        os.setsid()  # a Ctrl-C at the terminal that ran `qvm up` must not reach us
        os.close(ready_read)
        os.chdir(run.path)
        null = os.open(os.devnull, os.O_RDONLY)
        log = os.open(run.supervisor_log, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
        os.dup2(null, 0)
        os.dup2(log, 1)
        os.dup2(log, 2)
        os.close(null)
        os.close(log)
        _close_inherited(keep={ready_write, *locks})
        # absolute: the supervisor's command line is how clients recognise it
        start(os.path.abspath(run.path), launch, ready_write, locks)
    except BaseException:  # noqa: BLE001 - whatever happens, never run the CLI twice
        import traceback  # noqa: PLC0415 -- only when the child failed

        traceback.print_exc()  # into supervisor.log; `qvm up` sees the pipe close
    os._exit(1)


def _close_inherited(keep: set[int]) -> None:
    """Close what the caller of `qvm up` let us inherit (``flock LOCK qvm up`` holds its
    lock through a descriptor; a CI runner waits for its pipes' end): the supervisor lives
    as long as the VM and would hold them all that time. Our own descriptors are
    close-on-exec and go at the supervisor's exec anyway."""
    for entry in os.listdir("/proc/self/fd"):
        fd = int(entry)
        if fd > 2 and fd not in keep:
            with contextlib.suppress(OSError):  # the listing's own descriptor, gone
                if os.get_inheritable(fd):
                    os.close(fd)


def _reap(pid: int, timeout: float) -> int | None:
    """The exit code of our child ``pid`` once it ends, or None if it is still running."""
    deadline = time.monotonic() + timeout
    while True:
        ended, status = os.waitpid(pid, os.WNOHANG)
        if ended:
            return os.waitstatus_to_exitcode(status)
        if time.monotonic() > deadline:
            return None
        time.sleep(0.01)


def _read_readiness(fd: int, want: str, timeout: float) -> tuple[list[str], bool]:
    """Lines the supervisor wrote, up to one starting with ``want`` or "failed"; and
    whether it closed its end (it only does so after "ready" or when it is ending)."""
    deadline = time.monotonic() + timeout
    buffer = b""
    lines: list[str] = []
    while True:
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            return lines, False
        readable, _, _ = select.select([fd], [], [], remaining)
        if not readable:
            return lines, False
        chunk = os.read(fd, 4096)
        if not chunk:
            return lines, True
        buffer += chunk
        while b"\n" in buffer:
            line, buffer = buffer.split(b"\n", 1)
            lines.append(line.decode())
            word = lines[-1].split()[0] if lines[-1].split() else ""
            if word in (want, "failed"):
                return lines, False


def _launch_failure(
    run: RunDir, name: str, supervisor_exit: int | None, timed_out: bool
) -> LaunchError:
    if timed_out:
        ask_kill = _try_kill(run)
        return LaunchError(f"{name}: QMP did not answer in time; {ask_kill}")
    state = read_state(run.state_file)
    ended = state.exit if state is not None else None
    tail = (ended.stderr_tail if ended is not None else None) or ()
    reason = (ended.reason if ended is not None else None) or (
        f"the supervisor exited with code {supervisor_exit}"
    )
    message = f"{name}: QEMU failed to start: {reason}"
    if tail:
        message += "\n" + "\n".join(f"  {line}" for line in tail)
    else:
        message += f" (hint: see {run.supervisor_log})"
    return LaunchError(message)


def _try_kill(run: RunDir) -> str:
    try:
        from qvm.supervisor.wire import KillRequest  # noqa: PLC0415 -- a start went wrong

        request = KillRequest(deadline=time.time() + ACCEPT_TIMEOUT)
        ask_supervisor(run, request, timeout=10, accept_timeout=ACCEPT_TIMEOUT)
    except QvmError as exc:
        return f"could not stop it: {exc}"
    return "stopped it"


def _supervisor_gone(run: RunDir) -> bool:
    """No supervisor holds the run dir's lock (a record that is not live while one does is
    the previous run's: the new supervisor has not written its first yet)."""
    try:
        locks = take_run_locks(run)
    except OSError:
        return False
    if locks is None:
        return False
    release_run_locks(locks)
    return True


def _already_running(run: RunDir, name: str, wait: bool, timeout: float) -> UpResult:
    """Another `qvm up` (or a restart) holds the VM: report its QEMU once the record names
    it, and with ``wait`` once QMP answered, as our own start would have; an up that runs
    in parallel may still be between its fork and its first record."""
    deadline = time.monotonic() + timeout
    while True:
        state = read_state(run.state_file)
        if (state is None or not state.live) and _supervisor_gone(run):
            raise VmStateError(
                f"{name}: another qvm command started it, and it ended: "
                f"{state.ended_reason or state.state if state else 'no record'} "
                f"(hint: qvm status {name})"
            )
        if state is not None and state.qemu_pid and (not wait or state.state != "starting"):
            break
        if time.monotonic() > deadline:
            break  # say what the record says, even if it names no QEMU yet
        time.sleep(0.01)
    return UpResult(
        name=name,
        already_running=True,
        qemu_pid=state.qemu_pid if state is not None else None,
        accel=state.accel if state is not None else None,
        accel_reason=state.accel_reason if state is not None else None,
        serial_log=run.serial_log,
        qmp_socket=run.qmp_socket,
        ready=state is not None and state.state != "starting",
    )
