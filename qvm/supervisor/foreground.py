"""`qvm up --foreground`: the supervisor in the calling process, and what it tells the
world there. Stdlib only: ``qvm.supervisor.spawn`` uses it before the supervisor proper
is exec'd, in the same process.

The process that ran `qvm up --foreground` spawns QEMU and execs the supervisor proper
(no fork, no ``setsid``: its pid stays the one a service manager or a batch system
watches, and QEMU stays its child). It says "ready" as ``qvm up`` returns, once QMP
answers: a line on stdout, and ``READY=1`` on ``$NOTIFY_SOCKET`` (systemd's protocol)
when set. SIGTERM and SIGINT are a stop request within the stop budget; at the end, a
line saying how the VM ended, and an exit status that says it to a program
(``exit_status``).
"""

from __future__ import annotations

import contextlib
import os
import signal

from qvm.errors import (
    EXIT_FAILURE,
    EXIT_OK,
    EXIT_VM_CRASHED,
    EXIT_VM_KILLED,
    EXIT_VM_PANICKED,
)
from qvm.store.state import ExitRecord

# the stop budget in seconds, from `qvm up --foreground` to the supervisor it execs into
FOREGROUND_ENV = "QVM_FOREGROUND"
STOP_SIGNALS = frozenset({signal.SIGTERM, signal.SIGINT})
DEFAULT_STOP_TIMEOUT = 20.0  # inside Slurm's default KillWait (30 s) and systemd's (90 s)
PANIC_REASON = "guest panic"


def hold_stop_signals() -> None:
    """SIGTERM and SIGINT stay pending until the supervisor proper handles them (it
    unblocks them then: ``release_stop_signals``): a stop asked for while it starts is
    carried out, and the last record written, instead of the process dying with QEMU
    running. Blocked signals stay blocked, and pending, across exec."""
    signal.pthread_sigmask(signal.SIG_BLOCK, STOP_SIGNALS)


def release_stop_signals() -> None:
    signal.pthread_sigmask(signal.SIG_UNBLOCK, STOP_SIGNALS)


def sd_notify(state: str) -> None:
    """Send ``state`` ("READY=1", "STOPPING=1") to the service manager on
    ``$NOTIFY_SOCKET``, a unix datagram socket ('@' for Linux's abstract namespace);
    nothing without one, and a manager that does not listen loses nothing but it."""
    path = os.environ.get("NOTIFY_SOCKET")
    if not path:
        return
    import socket  # noqa: PLC0415 -- `qvm up` imports this module: only with a manager

    address = "\0" + path[1:] if path.startswith("@") else path
    with (
        contextlib.suppress(OSError),
        socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as sock,
    ):
        sock.sendto(state.encode(), address)


def say(line: str, fd: int = 1) -> None:
    """A line on the caller's stdout (or ``fd``): the foreground's word to whoever runs it."""
    with contextlib.suppress(OSError):
        os.write(fd, (line + "\n").encode(errors="replace"))


def announce_ready(name: str, qemu_pid: int) -> None:
    say(f"{name}: ready (QEMU pid {qemu_pid}); stop with SIGTERM, Ctrl-C or qvm down {name}")
    sd_notify("READY=1")


def exit_status(ended: ExitRecord | None) -> int:
    """How the VM ended, as the exit status of `qvm up --foreground`: 0 for a guest
    power-off or a stop someone asked for, its own codes for a crash, a guest panic, and
    a SIGKILL (`qvm kill`, or a stop that had to end with one); 1 when it never ran."""
    if ended is None:
        return EXIT_FAILURE
    if ended.ended_by == "kill":
        return EXIT_VM_KILLED
    if not ended.failed:
        return EXIT_OK
    if ended.reason.startswith(PANIC_REASON):
        return EXIT_VM_PANICKED
    if ended.ran_seconds is None or ended.stderr_tail is not None:
        return EXIT_FAILURE  # QEMU failed to start
    return EXIT_VM_CRASHED


def announce_end(name: str, ended: ExitRecord | None) -> int:
    """The last line (stdout for an end asked for, stderr for a failure), the exit status."""
    status = exit_status(ended)
    if ended is None:
        say(f"qvm: {name}: the supervisor ended without a record of QEMU's end", fd=2)
        return status
    line = f"{name}: {'crashed' if ended.failed else 'stopped'}: {ended.reason}"
    if ended.stderr_tail:
        line += "".join(f"\n  {tail}" for tail in ended.stderr_tail)
    say(f"qvm: {line}" if status else line, fd=2 if status else 1)
    return status
