"""How a supervisor process begins: spawn QEMU first, think later.

``qvm up`` forks; the child calls ``start``, which spawns QEMU at once and tells the
``qvm up`` waiting on the readiness pipe "ready" as soon as QMP answers, then execs
``python -m qvm.supervisor RUNDIR QEMU_PID HOW`` (``qvm.supervisor.__main__``), which
imports asyncio, qemu.qmp and the rest of qvm (``qvm.supervisor.process``) and supervises
QEMU to its end.
"""

from __future__ import annotations

import contextlib
import os
import sys
import time

from qvm.base.checking import TYPE_CHECKING
from qvm.base.jsonfile import RecordWriteError
from qvm.base.proc import find_program, process_start_time
from qvm.layout.runfiles import EVENTS_SOCKET, QEMU_LOG, STATE_FILE
from qvm.store.state import ExitRecord, QemuRun, StateRecord, write_state
from qvm.supervisor.foreground import (
    FOREGROUND_ENV,
    announce_ready,
    hold_stop_signals,
    say,
)

if TYPE_CHECKING:
    import socket
    import subprocess
    from collections.abc import Callable
    from typing import NoReturn

    from qvm.store.launch import LaunchRecord
    from qvm.supervisor.wire import LineReader

QMP_ANSWER_TIMEOUT = 60.0
# QEMU must not outlive a supervisor that is killed outright: SIGTERM makes it quit
# cleanly ("host-signal"), and the next `qvm up` or `qvm status` sees the stale state.
PR_SET_PDEATHSIG = 1
LOG_MARKER = "=== qvm: QEMU start at"


# Every module a function here imports, in the forked child, before its exec. A `qvm up`
# of several VMs forks from threads (qvm.ops.fanout), and a module another thread was in
# the middle of importing at the fork stays locked in the child for ever: the parent
# imports these whole first (qvm.supervisor.boot). tests/unit/supervisor checks the list.
CHILD_IMPORTS = (
    "ctypes",
    "functools",
    "json",
    "pathlib",
    "re",  # qvm.layout.rundir's, for `qvm rm` only
    "signal",
    "socket",
    "subprocess",
    "qvm.host.usernet",
    "qvm.layout.rundir",
    "qvm.store.forwards",
    "qvm.supervisor.shares",
    "qvm.supervisor.wire",
)


def with_parent_death_signal(
    argv: tuple[str, ...],
) -> tuple[list[str], Callable[[], None] | None]:
    """Make QEMU get SIGTERM when the supervisor dies, however it dies.

    util-linux's setpriv (essential on Debian) sets it and execs QEMU, so the pid stays
    QEMU's and the supervisor needs no ctypes and no preexec function (which would force a
    slower fork). Elsewhere, prctl through ctypes, resolved here in the parent.
    """
    setpriv = find_program("setpriv")
    if setpriv:
        return [setpriv, "--pdeathsig", "TERM", "--", *argv], None
    # rarely needed (no setpriv); this runs in the forked child of `qvm up`
    import ctypes  # noqa: PLC0415
    import signal  # noqa: PLC0415

    prctl = ctypes.CDLL(None, use_errno=True).prctl

    def set_signal() -> None:
        prctl(PR_SET_PDEATHSIG, signal.SIGTERM)

    return list(argv), set_signal


def wait_qmp_answer(
    path: str,
    qemu: subprocess.Popen[bytes],
    timeout: float,
    then: Callable[[Callable[[str], str | None]], None] | None = None,
) -> bool:
    """Block until QEMU's monitor on ``path`` answers a command (QMP is ready), or QEMU dies.
    ``then`` is called once it answers, with a function that runs an HMP command on the
    same connection (its reply, or None): one more round trip, not one more connection.

    The greeting alone is not enough: QEMU greets before it has created the devices on
    its command line, and may still fail on one. Commands are only answered from the main
    loop, after start-up. Plain sockets, before asyncio is even imported: the `qvm up`
    waiting on us hears "ready" as soon as a raw client could, not after our own imports.
    """
    # imported after QEMU is spawned, where its start hides them: this process is a fork
    # of `qvm up`, which waits for "spawned"
    import functools  # noqa: PLC0415
    import socket  # noqa: PLC0415

    from qvm.supervisor.wire import LineReader  # noqa: PLC0415

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if qemu.poll() is not None:
            return False
        try:
            with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as probe:
                probe.settimeout(max(deadline - time.monotonic(), 0.01))
                probe.connect(path)
                lines = LineReader(probe)
                if b'"QMP"' not in lines.line():
                    continue
                probe.sendall(b'{"execute": "qmp_capabilities"}\n')
                if b'"return"' in lines.line():
                    if then is not None:
                        then(functools.partial(_hmp, probe, lines))
                    return True
        except OSError:
            pass  # not listening yet, or QEMU went away: poll() above tells which
        time.sleep(0.002)
    return False


def _hmp(probe: socket.socket, lines: LineReader, command: str) -> str | None:
    """An HMP command's reply on a QMP connection, events skipped; None if it failed."""
    import json  # noqa: PLC0415 -- as socket in wait_qmp_answer: after QEMU is spawned

    request = {"execute": "human-monitor-command", "arguments": {"command-line": command}}
    try:
        probe.sendall(json.dumps(request).encode() + b"\n")
        while line := lines.line():
            reply = json.loads(line)
            if isinstance(reply, dict) and "event" not in reply:
                answer = reply.get("return")
                return answer if isinstance(answer, str) else None
    except (OSError, ValueError):
        pass  # QEMU went away, or said something that is not QMP: no reply
    return None


def forwards_recorder(
    run_path: str, launch: LaunchRecord, qemu_pid: int
) -> Callable[[str | None], None]:
    """What records ``forwards.json`` for this QEMU run from an ``info usernet`` reply:
    launch.json's forwards with the host ports QEMU bound for port 0 (``qvm.host.usernet``).
    Its imports (~3 ms) happen here, which ``start`` calls while QEMU starts. The recorder
    never raises: a port that cannot be read back stays 0, and supervisor.log says why."""
    # only where a forward has host port 0: the supervisor proper does without pathlib
    # (qvm.layout.runfiles) until a restart needs it
    from pathlib import Path  # noqa: PLC0415 -- see the comment above

    from qvm.host.usernet import bind_ports, parse_usernet  # noqa: PLC0415 -- see above
    from qvm.layout.rundir import RunDir  # noqa: PLC0415 -- see the comment above
    from qvm.store.forwards import save  # noqa: PLC0415 -- see the comment above

    run = RunDir(Path(run_path))

    def record(usernet: str | None) -> None:
        forwards = bind_ports(launch.forwards, parse_usernet(usernet or ""))
        for forward in (f for f in forwards if f.host_port == 0):
            log_line(
                f"qvm supervisor: {forward.proto}:{forward.host_addr}:0:{forward.guest_port} "
                f"({forward.nic}): QEMU did not list the port it bound "
                f"(info usernet: {usernet!r})"
            )
        try:
            save(run, forwards, QemuRun(qemu_pid, process_start_time(qemu_pid)))
        except (RecordWriteError, OSError) as error:
            log_line(f"qvm supervisor: {error}")

    return record


def spawn_qemu(argv: tuple[str, ...], run_path: str) -> subprocess.Popen[bytes]:
    """Start QEMU with its output appended to qemu.log after a start marker."""
    # the supervisor proper imports this module, and needs subprocess only for a restart
    import subprocess  # noqa: PLC0415

    spawn_argv, preexec = with_parent_death_signal(argv)
    with open(os.path.join(run_path, QEMU_LOG), "ab") as log:
        log.write(f"{LOG_MARKER} {time.strftime('%Y-%m-%d %H:%M:%S')} ===\n".encode())
        log.flush()
        return subprocess.Popen(
            spawn_argv,
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=subprocess.STDOUT,
            cwd=run_path,
            preexec_fn=preexec,  # noqa: PLW1509 - only where setpriv is missing
            # its own process group: a Ctrl-C at the terminal of `qvm up --foreground`
            # is the supervisor's to turn into a stop, not QEMU's to die of
            process_group=0,
        )


def initial_state(launch: LaunchRecord) -> StateRecord:
    """The first state record of a supervisor, before it has a QEMU."""
    return StateRecord(
        name=launch.name,
        machine_file=launch.machine_file,
        accel=launch.accel,
        accel_reason=launch.accel_reason,
        supervisor_pid=os.getpid(),
        supervisor_start_time=process_start_time(os.getpid()),
        state="starting",
        restarts=0,
        exit=None,
        crash_reason=None,
    )


def record_spawned(run_path: str, launch: LaunchRecord, qemu: subprocess.Popen[bytes]) -> None:
    """state.json names this QEMU before `qvm up` returns: the commands a script runs next
    (status, cpu add) must not read the previous run's record, or none."""
    state = initial_state(launch)._replace(
        qemu_pid=qemu.pid, qemu_start_time=process_start_time(qemu.pid), started_at=time.time()
    )
    try:
        write_state(os.path.join(run_path, STATE_FILE), state)
    except RecordWriteError as error:
        # a full or failing state dir must not cost the VM: the supervisor keeps its
        # state in memory, answers status from it, and writes again at the next change
        log_line(f"qvm supervisor: {error}")


def record_spawn_failure(run_path: str, launch: LaunchRecord, reason: str) -> None:
    """QEMU could not even be spawned: the state record says why, for `qvm up` to tell."""
    ended = ExitRecord(
        code=None,
        signal=None,
        reason=reason,
        failed=True,
        at=time.time(),
    )
    state = initial_state(launch)._replace(state="crashed", exit=ended)
    try:
        write_state(os.path.join(run_path, STATE_FILE), state)
    except RecordWriteError as error:
        log_line(f"qvm supervisor: {error}")


def log_line(line: str) -> None:
    """One line in supervisor.log (our stderr); a full disk loses it, and nothing else."""
    with contextlib.suppress(OSError):
        os.write(2, (line + "\n").encode(errors="replace"))


def notify(fd: int | None, line: str) -> None:
    """Tell the `qvm up` that started us how far we got; it may have gone away."""
    if fd is None:
        return
    try:
        os.write(fd, (line + "\n").encode())
    except OSError:
        return  # nobody is listening any more; that is fine


class AdoptedQemu:
    """The QEMU this process spawned before it exec'd into the supervisor proper: still
    its child, no longer a ``Popen``. The same small interface the supervisor uses."""

    def __init__(self, pid: int) -> None:
        self.pid = pid
        self.returncode: int | None = None

    def poll(self) -> int | None:
        if self.returncode is None:
            pid, status = os.waitpid(self.pid, os.WNOHANG)
            if pid:
                self.returncode = os.waitstatus_to_exitcode(status)
        return self.returncode

    def wait(self) -> int:
        if self.returncode is None:
            _, status = os.waitpid(self.pid, 0)
            self.returncode = os.waitstatus_to_exitcode(status)
        return self.returncode

    def send_signal(self, signum: int) -> None:
        if self.poll() is None:
            os.kill(self.pid, signum)


def start(
    run_path: str,
    launch: LaunchRecord,
    ready_fd: int | None,
    lock_fds: tuple[int, ...],
    stop_budget: float | None = None,
) -> NoReturn:
    """The first moments of a supervisor, in the process ``qvm up`` forked: spawn QEMU,
    say "spawned", then "ready" once QMP answers, then exec into the supervisor proper.

    Forking the CLI, which has everything QEMU's start needs in memory already, spawns
    QEMU ~40 ms sooner than starting a new Python would. The exec gives the supervisor a
    fresh, small process image (its RSS is a target) and keeps QEMU as its child.

    In the foreground (a ``stop_budget``: `qvm up --foreground`) this is the process that
    ran it, unforked, and "ready" goes to its stdout and the service manager
    (``qvm.supervisor.foreground``) instead of a pipe.
    """
    if launch.shares:
        # their virtiofsd must listen before QEMU connects to it; only VMs with shares
        from qvm.supervisor import shares  # noqa: PLC0415 -- see the comment above

        try:
            shares.start_boot_shares(run_path, launch)
        except shares.ShareStartError as error:
            record_spawn_failure(run_path, launch, str(error))
            notify(ready_fd, "failed")
            os._exit(1)
    try:
        qemu = spawn_qemu(launch.argv, run_path)
    except OSError as error:
        reason = f"could not start {launch.argv[0]}: {error.strerror or error}"
        record_spawn_failure(run_path, launch, reason)
        notify(ready_fd, "failed")
        if stop_budget is not None:
            say(f"qvm: {launch.name}: could not start {launch.argv[0]}: {error}", fd=2)
        os._exit(1)
    if stop_budget is not None:
        hold_stop_signals()
    record_spawned(run_path, launch, qemu)
    notify(ready_fd, f"spawned {qemu.pid}")
    read_back: Callable[[Callable[[str], str | None]], None] | None = None
    if any(f.host_port == 0 for f in launch.forwards):
        # the ports QEMU binds for host port 0 are read back before "ready": `qvm up`
        # prints them, and so may the command a script runs next
        from qvm.host.usernet import USERNET_COMMAND  # noqa: PLC0415 -- QEMU is spawned first

        record = forwards_recorder(run_path, launch, qemu.pid)

        def read_back_ports(hmp: Callable[[str], str | None]) -> None:
            record(hmp(USERNET_COMMAND))

        read_back = read_back_ports
    answered = wait_qmp_answer(
        os.path.join(run_path, EVENTS_SOCKET), qemu, QMP_ANSWER_TIMEOUT, then=read_back
    )
    env = dict(os.environ)
    for fd in lock_fds:  # held open for the supervisor's life: "alive"
        os.set_inheritable(fd, True)
    if stop_budget is not None:
        env[FOREGROUND_ENV] = repr(stop_budget)
        if answered:
            announce_ready(launch.name, qemu.pid)
    elif answered:
        # `qvm up` is done waiting: it must not also wait for the supervisor's imports
        notify(ready_fd, f"ready {qemu.pid}")
        if ready_fd is not None:
            os.close(ready_fd)
    elif ready_fd is not None:
        # QEMU died (or never answered): the supervisor records why, then says "failed"
        env["QVM_READY_FD"] = str(ready_fd)
        os.set_inheritable(ready_fd, True)
    # Popen has reaped a QEMU that died meanwhile: its exit code must travel with us
    how = (
        "answered"
        if answered
        else f"exited={qemu.returncode}"
        if qemu.poll() is not None
        else "silent"
    )
    os.execve(
        sys.executable, [sys.executable, "-m", "qvm.supervisor", run_path, str(qemu.pid), how], env
    )
