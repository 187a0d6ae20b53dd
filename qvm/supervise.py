"""Entry point of the supervisor process: spawn QEMU first, think later.

``qvm up`` runs ``python -m qvm.supervise RUNDIR``. Everything QEMU's start needs is read
with the standard library's lightest modules, QEMU is spawned, and the `qvm up` waiting on
the readiness pipe hears "ready" as soon as QMP answers, before this process imports
asyncio, qemu.qmp or the rest of qvm (``qvm.supervisor``), which then take over.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from collections.abc import Callable
    from typing import Any

QMP_ANSWER_TIMEOUT = 60.0
# QEMU must not outlive a supervisor that is killed outright: SIGTERM makes it quit
# cleanly ("host-signal"), and the next `qvm up` or `qvm status` sees the stale state.
PR_SET_PDEATHSIG = 1
LOG_MARKER = "=== qvm: QEMU start at"


def with_parent_death_signal(argv: list[str]) -> tuple[list[str], Callable[[], None] | None]:
    """Make QEMU get SIGTERM when the supervisor dies, however it dies.

    util-linux's setpriv (essential on Debian) sets it and execs QEMU, so the pid stays
    QEMU's and the supervisor needs no ctypes and no preexec function (which would force a
    slower fork). Elsewhere, prctl through ctypes, resolved here in the parent.
    """
    setpriv = next(
        (p for d in os.get_exec_path() if os.access(p := os.path.join(d, "setpriv"), os.X_OK)),
        None,
    )
    if setpriv:
        return [setpriv, "--pdeathsig", "TERM", "--", *argv], None
    import ctypes

    prctl = ctypes.CDLL(None, use_errno=True).prctl

    def set_signal() -> None:
        prctl(PR_SET_PDEATHSIG, signal.SIGTERM)

    return argv, set_signal


def wait_qmp_answer(path: str, qemu: subprocess.Popen[bytes], timeout: float) -> bool:
    """Block until QEMU's monitor on ``path`` answers a command (QMP is ready), or QEMU dies.

    The greeting alone is not enough: QEMU greets before it has created the devices on
    its command line, and may still fail on one. Commands are only answered from the main
    loop, after start-up. Plain sockets, before asyncio is even imported: the `qvm up`
    waiting on us hears "ready" as soon as a raw client could, not after our own imports.
    """
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if qemu.poll() is not None:
            return False
        try:
            with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as probe:
                probe.settimeout(max(deadline - time.monotonic(), 0.01))
                probe.connect(path)
                if b'"QMP"' not in read_line(probe):
                    continue
                probe.sendall(b'{"execute": "qmp_capabilities"}\n')
                if b'"return"' in read_line(probe):
                    return True
        except OSError:
            pass  # not listening yet, or QEMU went away: poll() above tells which
        time.sleep(0.002)
    return False


def read_line(sock: socket.socket) -> bytes:
    """One newline-terminated message (or what came before the peer closed)."""
    data = b""
    while not data.endswith(b"\n"):
        chunk = sock.recv(4096)
        if not chunk:
            break
        data += chunk
    return data


def spawn_qemu(argv: list[str], run_path: str) -> subprocess.Popen[bytes]:
    """Start QEMU with its output appended to qemu.log after a start marker."""
    spawn_argv, preexec = with_parent_death_signal(argv)
    with open(os.path.join(run_path, "qemu.log"), "ab") as log:
        log.write(f"{LOG_MARKER} {time.strftime('%Y-%m-%d %H:%M:%S')} ===\n".encode())
        log.flush()
        return subprocess.Popen(
            spawn_argv,
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=subprocess.STDOUT,
            cwd=run_path,
            preexec_fn=preexec,  # noqa: PLW1509 - only where setpriv is missing
        )


def initial_state(launch: dict[str, Any]) -> dict[str, Any]:
    """The first state record of a supervisor, before it has a QEMU."""
    from qvm.proc import process_start_time

    return {
        "name": launch["name"],
        "machine_file": launch.get("machine_file"),
        "accel": launch.get("accel"),
        "accel_reason": launch.get("accel_reason"),
        "supervisor_pid": os.getpid(),
        "supervisor_start_time": process_start_time(os.getpid()),
        "state": "starting",
        "restarts": 0,
        "exit": None,
        "crash_reason": None,
    }


def record_spawned(run_path: str, launch: dict[str, Any], qemu: subprocess.Popen[bytes]) -> None:
    """state.json names this QEMU before `qvm up` returns: the commands a script runs next
    (status, cpu add) must not read the previous run's record, or none."""
    from qvm.jsonfile import write_json_atomic
    from qvm.proc import process_start_time

    state = initial_state(launch)
    state.update(
        qemu_pid=qemu.pid, qemu_start_time=process_start_time(qemu.pid), started_at=time.time()
    )
    write_json_atomic(os.path.join(run_path, "state.json"), state)


def notify(fd: int | None, line: str) -> None:
    """Tell the `qvm up` that started us how far we got; it may have gone away."""
    if fd is None:
        return
    try:
        os.write(fd, (line + "\n").encode())
    except OSError:
        return  # nobody is listening any more; that is fine


def main(argv: list[str]) -> int:
    run_path = argv[0]
    ready_fd = int(os.environ["QVM_READY_FD"]) if "QVM_READY_FD" in os.environ else None
    # The inherited lock fd stays open for our whole life: it is what says we are alive.
    # Started by hand (no inherited lock), take it ourselves.
    if "QVM_LOCK_FD" not in os.environ:
        from pathlib import Path

        from qvm.rundir import RunDir, try_lock

        if try_lock(RunDir(Path(run_path)).lock_file) is None:
            return 3
    try:
        with open(os.path.join(run_path, "launch.json")) as handle:
            launch = json.load(handle)
    except (OSError, ValueError):
        notify(ready_fd, "failed")
        return 2
    try:
        qemu = spawn_qemu(launch["argv"], run_path)
    except OSError as error:
        from qvm.supervisor import record_spawn_failure

        record_spawn_failure(run_path, launch, error)
        notify(ready_fd, "failed")
        return 1
    record_spawned(run_path, launch, qemu)
    notify(ready_fd, f"spawned {qemu.pid}")
    answered = wait_qmp_answer(os.path.join(run_path, "events.sock"), qemu, QMP_ANSWER_TIMEOUT)
    if answered and ready_fd is not None:
        # `qvm up` is done waiting: it must not also wait for our imports below
        notify(ready_fd, f"ready {qemu.pid}")
        os.close(ready_fd)
        ready_fd = None

    from qvm.supervisor import run_supervisor

    return run_supervisor(run_path, launch, ready_fd, qemu, answered)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
