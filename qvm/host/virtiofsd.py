"""virtiofsd, the host side of a virtiofs share: its command line, its start (the socket
QEMU connects to must exist first) and its end.

Debian 12 ships QEMU 7.2's C virtiofsd at ``/usr/lib/qemu/virtiofsd``. It runs as root
only (as another user it stops at once: "Failed to create directory /var/run/virtiofsd:
Permission denied"; its sandbox needs CAP_SYS_ADMIN too), and its default sandbox
(``-o sandbox=namespace``: mount, pid and net namespaces, pivot_root into the shared
folder) is what keeps the guest inside the folder: ``..`` at the top and a symlink
pointing out resolve inside it. It has no read-only option, so a read-only share runs in
a mount namespace of its own whose bind mount of the folder is read-only
(``util-linux``'s ``unshare``, essential on Debian): the host's kernel refuses the writes,
whatever the guest does. Each daemon gets SIGTERM when the supervisor dies (``setpriv
--pdeathsig``, as QEMU does), and exits by itself when QEMU closes its socket.

Stdlib only, no pathlib: the supervisor imports it.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import time

from qvm.base.proc import find_program, process_start_time

VIRTIOFSD = "/usr/lib/qemu/virtiofsd"
SOCKET_WAIT = 5.0  # for virtiofsd to listen on its socket
STOP_WAIT = 2.0  # for a daemon to end after SIGTERM, before SIGKILL
# a read-only bind mount of $1 on itself, in the namespace unshare made, then the daemon
_READONLY_SCRIPT = (
    'mount --bind -- "$1" "$1" && mount -o remount,bind,ro -- "$1" "$1" && shift && exec "$@"'
)


class VirtiofsdError(Exception):
    """virtiofsd could not be started: the message says why, in one line."""


def virtiofsd_argv(socket: str, source: str, readonly: bool) -> list[str]:
    """The command that serves ``source`` on ``socket`` (read-only: in a mount namespace
    where the folder is a read-only bind mount)."""
    daemon = [
        VIRTIOFSD,
        f"--socket-path={socket}",
        "-o",
        f"source={source}",
        "-o",
        "cache=auto",
        "-o",
        "sandbox=namespace",
    ]
    setpriv = find_program("setpriv")
    guard = [setpriv, "--pdeathsig", "TERM", "--"] if setpriv else []
    if not readonly:
        return [*guard, *daemon]
    unshare = find_program("unshare") or "unshare"
    shell = ["/bin/sh", "-c", _READONLY_SCRIPT, "virtiofsd-ro", source]
    return [*guard, unshare, "--mount", "--propagation", "private", "--", *shell, *daemon]


def start_virtiofsd(
    socket: str, source: str, readonly: bool, timeout: float = SOCKET_WAIT
) -> tuple[int, int | None]:
    """Start virtiofsd for ``source`` and wait until it listens on ``socket``; its pid and
    start time. Its stderr is ours (the supervisor's log). VirtiofsdError if it ends or
    does not listen in time (it is stopped then)."""
    with contextlib.suppress(FileNotFoundError):
        os.unlink(socket)  # a stale one from a killed run: virtiofsd would refuse it
    try:
        daemon = subprocess.Popen(
            virtiofsd_argv(socket, source, readonly),
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
        )
    except OSError as error:
        raise VirtiofsdError(f"cannot run {VIRTIOFSD}: {error.strerror or error}") from None
    deadline = time.monotonic() + timeout
    while not os.path.exists(socket):
        code = daemon.poll()
        if code is not None:
            raise VirtiofsdError(
                f"virtiofsd for {source} exited with status {code} before listening "
                "(its message is in the supervisor's log)"
            )
        if time.monotonic() > deadline:
            stop_daemon(daemon.pid, None)
            raise VirtiofsdError(f"virtiofsd for {source} did not listen within {timeout:g} s")
        time.sleep(0.002)
    # Popen's own record is dropped: whoever owns the daemon reaps it by its pid
    daemon.returncode = 0
    return daemon.pid, process_start_time(daemon.pid)


def stop_daemon(pid: int, start_time: int | None, wait: float = STOP_WAIT) -> None:
    """End a daemon this process started (its child): SIGTERM, then SIGKILL, and reap it.
    A pid whose start time is not ``start_time`` any more is another process: left alone."""
    if start_time is not None and process_start_time(pid) not in (start_time, None):
        return
    with contextlib.suppress(ProcessLookupError):
        os.kill(pid, signal.SIGTERM)
    deadline = time.monotonic() + wait
    while time.monotonic() < deadline:
        if _reaped(pid):
            return
        time.sleep(0.005)
    with contextlib.suppress(ProcessLookupError):
        os.kill(pid, signal.SIGKILL)
    with contextlib.suppress(ChildProcessError):
        os.waitpid(pid, 0)


def _reaped(pid: int) -> bool:
    try:
        done, _ = os.waitpid(pid, os.WNOHANG)
    except ChildProcessError:  # not our child (or reaped already): gone when kill says so
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return True
        return False
    return done == pid
