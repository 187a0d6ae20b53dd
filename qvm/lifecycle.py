"""Starting, stopping and describing VMs: the client side of the supervisor.

``up`` validates against this host, prepares the run dir (overlays, ports), takes the
VM's ``supervisor.lock`` and hands it to a new supervisor process (forked, see
``qvm.supervise``), so two concurrent ``up``s of one VM start exactly one QEMU.
Everything else asks the live supervisor over its socket, or reads the facts it left
behind when there is none.
"""

from __future__ import annotations

import json
import os
import select
import signal
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any, NamedTuple, NoReturn

from qvm.errors import HostError, LaunchError, NotRunningError, QvmError, VmStateError
from qvm.proc import same_process_alive
from qvm.rundir import RunDir, is_locked, read_json, try_lock, write_json_atomic
from qvm.supervise import read_line

if TYPE_CHECKING:
    import socket

LIVE_STATES = ("starting", "running", "paused", "stopping", "restarting")
SUPERVISOR_ANSWER_TIMEOUT = 3.0
DEFAULT_READY_TIMEOUT = 60.0


# --- talking to a supervisor ---------------------------------------------------------


def supervisor_alive(run: RunDir) -> bool:
    return is_locked(run.lock_file)


def ask_supervisor(run: RunDir, request: dict[str, Any], timeout: float) -> dict[str, Any]:
    """One JSON request, one JSON reply; raises QvmError naming the VM on any failure."""
    name = run.name
    deadline = time.monotonic() + timeout
    try:
        sock = connect_supervisor(run, deadline)
        with sock:
            sock.settimeout(max(deadline - time.monotonic(), 0.1))
            sock.sendall(json.dumps(request).encode() + b"\n")
            data = read_line(sock)
    except TimeoutError as exc:
        raise VmStateError(
            f"{name}: the supervisor did not answer within {timeout:g} s "
            f"(hint: see {run.supervisor_log})"
        ) from exc
    except OSError as exc:
        raise VmStateError(f"{name}: cannot reach the supervisor: {exc.strerror or exc}") from exc
    try:
        reply = json.loads(data)
    except ValueError as exc:
        raise VmStateError(f"{name}: the supervisor gave no answer") from exc
    if "error" in reply:
        raise VmStateError(f"{name}: supervisor: {reply['error']}")
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


def clean_stale(run: RunDir) -> dict[str, Any] | None:
    """Recognise a run whose supervisor died, record it, and tidy the run dir.

    Returns the (possibly updated) state. Must be called without the lock held by us.
    """
    state = read_json(run.state_file)
    if state is None or state.get("state") not in LIVE_STATES:
        return state
    lock_fd = try_lock(run.lock_file)
    if lock_fd is None:
        return state  # a supervisor is alive: nothing is stale
    try:
        return _mark_supervisor_died(run, state)
    finally:
        os.close(lock_fd)


def _mark_supervisor_died(run: RunDir, state: dict[str, Any]) -> dict[str, Any]:
    qemu_alive = same_process_alive(state.get("qemu_pid"), state.get("qemu_start_time"))
    reason = f"supervisor (pid {state.get('supervisor_pid')}) died unexpectedly"
    if qemu_alive:
        # leave the record alone: the orphaned QEMU is still there to be killed
        state["orphaned"] = True
        state["crash_reason"] = reason + f"; QEMU (pid {state.get('qemu_pid')}) still runs"
        return state
    state.update(
        state="crashed",
        qemu_pid=None,
        crash_reason=reason,
        exit={
            "code": None,
            "signal": None,
            "failed": True,
            "reason": reason,
            "at": time.time(),
        },
    )
    write_json_atomic(run.state_file, state)
    run.remove_qemu_sockets()
    run.supervisor_socket.unlink(missing_ok=True)
    return state


# --- up ------------------------------------------------------------------------------


class UpResult(NamedTuple):
    name: str
    already_running: bool
    qemu_pid: int | None
    accel: str | None
    accel_reason: str | None
    serial_log: Path
    qmp_socket: Path
    ready: bool


def rotate_log(path: Path) -> None:
    """Keep the previous run's log as NAME.1 so that each run's log starts empty."""
    if path.exists():
        os.replace(path, path.with_name(path.name + ".1"))


def start_supervisor(
    run: RunDir, launch: dict[str, Any], wait: bool, timeout: float = DEFAULT_READY_TIMEOUT
) -> UpResult:
    """Start a supervisor for a prepared launch, unless one is alive already."""
    name = launch["name"]
    run.create()
    state = clean_stale(run)
    if state and state.get("orphaned"):
        raise VmStateError(
            f"{name}: {state['crash_reason']} (hint: qvm kill {name}, then qvm up {name})"
        )
    lock_fd = try_lock(run.lock_file)
    if lock_fd is None:
        return _already_running(run, name)
    try:
        run.remove_qemu_sockets()
        run.supervisor_socket.unlink(missing_ok=True)
        rotate_log(run.serial_log)
        rotate_log(run.qemu_log)
        run.pending_file.unlink(missing_ok=True)
        write_json_atomic(run.launch_file, launch)
        ready_read, ready_write = os.pipe()
        supervisor_pid = os.fork()
        if supervisor_pid == 0:
            _become_supervisor(run, launch, ready_read, ready_write, lock_fd)
        os.close(ready_write)
    finally:
        os.close(lock_fd)  # the supervisor holds its own copy now
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
        accel=launch.get("accel"),
        accel_reason=launch.get("accel_reason"),
        serial_log=run.serial_log,
        qmp_socket=run.qmp_socket,
        ready=wait,
    )


def _become_supervisor(
    run: RunDir, launch: dict[str, Any], ready_read: int, ready_write: int, lock_fd: int
) -> NoReturn:
    """In the child of ``os.fork``: leave the CLI's session and output, start QEMU, and
    exec into the supervisor (``qvm.supervise.start``). Never returns to the CLI's code."""
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
        from qvm.supervise import start

        start(str(run.path), launch, ready_write, lock_fd)
    except BaseException:  # noqa: BLE001 - whatever happens, never run the CLI twice
        import traceback

        traceback.print_exc()  # into supervisor.log; `qvm up` sees the pipe close
    os._exit(1)


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
    state = read_json(run.state_file) or {}
    ended = state.get("exit") or {}
    tail = ended.get("stderr_tail") or []
    reason = ended.get("reason") or f"the supervisor exited with code {supervisor_exit}"
    message = f"{name}: QEMU failed to start: {reason}"
    if tail:
        message += "\n" + "\n".join(f"  {line}" for line in tail)
    else:
        message += f" (hint: see {run.supervisor_log})"
    return LaunchError(message)


def _try_kill(run: RunDir) -> str:
    try:
        ask_supervisor(run, {"op": "kill"}, timeout=10)
    except QvmError as exc:
        return f"could not stop it: {exc}"
    return "stopped it"


def _already_running(run: RunDir, name: str) -> UpResult:
    state = read_json(run.state_file) or {}
    return UpResult(
        name=name,
        already_running=True,
        qemu_pid=state.get("qemu_pid"),
        accel=state.get("accel"),
        accel_reason=state.get("accel_reason"),
        serial_log=run.serial_log,
        qmp_socket=run.qmp_socket,
        ready=True,
    )


# --- down / kill ---------------------------------------------------------------------


class StopResult(NamedTuple):
    name: str
    ended_by: str | None  # "acpi", "quit", "kill", or None when it was not running
    message: str


ENDED_BY_TEXT = {
    "acpi": "the guest powered off after the ACPI power button",
    "quit": "QEMU quit over QMP",
    "kill": "QEMU was killed (SIGKILL)",
}


def stop(run: RunDir, timeout: float, force: bool) -> StopResult:
    name = run.name
    if not supervisor_alive(run):
        return _stop_without_supervisor(run, kill=False)
    reply = ask_supervisor(
        run, {"op": "stop", "timeout": timeout, "force": force}, timeout=timeout + 20
    )
    _wait_supervisor_gone(run, timeout=15)
    ended_by = reply.get("ended_by")
    return StopResult(name, ended_by, ENDED_BY_TEXT.get(ended_by or "", "it was not running"))


def kill(run: RunDir) -> StopResult:
    name = run.name
    if not supervisor_alive(run):
        return _stop_without_supervisor(run, kill=True)
    reply = ask_supervisor(run, {"op": "kill"}, timeout=15)
    _wait_supervisor_gone(run, timeout=15)
    ended_by = reply.get("ended_by")
    return StopResult(name, ended_by, ENDED_BY_TEXT.get(ended_by or "", "it was not running"))


def _stop_without_supervisor(run: RunDir, kill: bool) -> StopResult:
    """No supervisor: an orphaned QEMU (its supervisor was killed) is ended by pid."""
    name = run.name
    state = read_json(run.state_file) or {}
    pid = state.get("qemu_pid")
    if state.get("state") in LIVE_STATES and same_process_alive(pid, state.get("qemu_start_time")):
        os.kill(pid, signal.SIGKILL)
        deadline = time.monotonic() + 10
        while same_process_alive(pid, state.get("qemu_start_time")) and time.monotonic() < deadline:
            time.sleep(0.02)
        clean_stale(run)
        return StopResult(name, "kill", f"killed QEMU (pid {pid}), whose supervisor had died")
    clean_stale(run)
    raise NotRunningError(name)


def _wait_supervisor_gone(run: RunDir, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while supervisor_alive(run):
        if time.monotonic() > deadline:
            raise VmStateError(
                f"{run.name}: the supervisor did not exit within {timeout:g} s "
                f"(hint: see {run.supervisor_log})"
            )
        time.sleep(0.01)


def wait_not_running(run: RunDir, timeout: float) -> bool:
    """Wait until no supervisor is alive (e.g. the guest powered itself off)."""
    deadline = time.monotonic() + timeout
    while supervisor_alive(run):
        if time.monotonic() > deadline:
            return False
        time.sleep(0.02)
    return True


# --- status --------------------------------------------------------------------------


def vm_status(run: RunDir) -> dict[str, Any]:
    """Facts about one VM's current or last run, as a JSON-ready dict (never raises for
    a VM in a bad state: the problem is in the dict)."""
    record: dict[str, Any] = {
        "name": run.name,
        "state": "stopped",
        "reason": None,
        "pid": None,
        "supervisor_pid": None,
        "uptime": None,
        "accel": None,
        "accel_reason": None,
        "vcpus": None,
        "memory": None,
        "rss_bytes": None,
        "cpu_percent": None,
        "restarts": 0,
        "last_exit": None,
        "qmp_socket": str(run.qmp_socket),
        "serial_log": str(run.serial_log),
        "qemu_log": str(run.qemu_log),
        "console_socket": str(run.console_socket),
        "run_dir": str(run.path),
        "machine_file": None,
        "forwards": [],
        "error": None,
    }
    launch = read_json(run.launch_file) or {}
    state = read_json(run.state_file)
    if state is None:
        return record
    alive = supervisor_alive(run)
    if not alive:
        state = clean_stale(run) or state
    record.update(
        accel=state.get("accel"),
        accel_reason=state.get("accel_reason"),
        restarts=state.get("restarts", 0),
        last_exit=state.get("exit"),
        machine_file=state.get("machine_file"),
        supervisor_pid=state.get("supervisor_pid") if alive else None,
    )
    vcpus_max = launch.get("vcpus_max")
    if not alive:
        record["state"] = state.get("state", "stopped")
        if record["state"] in LIVE_STATES:  # orphaned QEMU
            record["state"] = "crashed"
            record["pid"] = state.get("qemu_pid")
        record["reason"] = (state.get("exit") or {}).get("reason") or state.get("crash_reason")
        if state.get("orphaned"):
            record["reason"] = state.get("crash_reason")
        return record
    try:
        live = ask_supervisor(run, {"op": "status"}, timeout=SUPERVISOR_ANSWER_TIMEOUT)
    except QvmError as exc:
        state = read_json(run.state_file) or state
        record["state"] = state.get("state", "running")
        if record["state"] in ("stopped", "crashed"):
            # a supervisor on its way out after QEMU ended: its record is complete
            record["reason"] = (state.get("exit") or {}).get("reason")
            record["last_exit"] = state.get("exit")
            record["supervisor_pid"] = None
            return record
        record["pid"] = state.get("qemu_pid")
        record["error"] = str(exc)
        return record
    record["state"] = live.get("state", "running")
    record["pid"] = live.get("qemu_pid")
    # the live answer, not state.json read a moment earlier: a restart may lie between them
    record["restarts"] = live.get("restarts", record["restarts"])
    record["last_exit"] = live.get("exit", record["last_exit"])
    if record["state"] in ("stopped", "crashed") or record["pid"] is None:
        record["reason"] = (live.get("exit") or {}).get("reason")
    if live.get("started_at") and record["pid"]:
        record["uptime"] = round(time.time() - live["started_at"], 1)
    if "vcpus_present" in live:
        record["vcpus"] = {"present": live["vcpus_present"], "max": vcpus_max}
    if "memory_bytes" in live:
        record["memory"] = {"bytes": live["memory_bytes"], "max": launch.get("memory_max")}
    from qvm.forwards import current_forwards

    record["forwards"] = current_forwards(run)
    record["rss_bytes"] = live.get("rss_bytes")
    record["cpu_percent"] = live.get("cpu_percent")
    record["error"] = live.get("qmp_error")
    return record


def machine_summary_for_stopped(
    record: dict[str, Any], vcpus_boot: int, vcpus_max: int, memory: int
) -> None:
    """Fill what a stopped VM would have from its definition."""
    if record.get("vcpus") is None:
        record["vcpus"] = {"present": 0, "max": vcpus_max, "boot": vcpus_boot}
    if record.get("memory") is None:
        record["memory"] = {"bytes": memory, "max": None}


# --- preparing a launch ----------------------------------------------------------------


QCOW2_MAGIC = b"QFI\xfb"


def detect_format(path: Path) -> str:
    try:
        with open(path, "rb") as handle:
            return "qcow2" if handle.read(4) == QCOW2_MAGIC else "raw"
    except OSError:
        return "raw"


def pick_free_port(host_addr: str, protocol: str) -> int:
    import socket

    kind = socket.SOCK_STREAM if protocol == "tcp" else socket.SOCK_DGRAM
    with socket.socket(socket.AF_INET, kind) as sock:
        sock.bind((host_addr, 0))
        return int(sock.getsockname()[1])


def port_in_use(host_addr: str, port: int, protocol: str) -> bool:
    import socket

    kind = socket.SOCK_STREAM if protocol == "tcp" else socket.SOCK_DGRAM
    with socket.socket(socket.AF_INET, kind) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind((host_addr, port))
        except OSError:
            return True
    return False


def port_holder(port: int) -> str | None:
    """Which process listens on a port, when this user may know (only asked on error)."""
    import psutil

    try:
        for conn in psutil.net_connections(kind="inet"):
            if conn.laddr and conn.laddr.port == port and conn.pid:
                try:
                    return f"pid {conn.pid} ({psutil.Process(conn.pid).name()})"
                except psutil.Error:
                    return f"pid {conn.pid}"
    except (psutil.Error, OSError):
        return None
    return None


def ensure_overlay(base: Path, base_format: str, overlay: Path, size: int | None) -> None:
    """Create the per-VM copy-on-write overlay once; the base image is only ever read."""
    if overlay.exists():
        return
    qemu_img_create(overlay, size, ["-F", base_format, "-b", str(base)])


def qemu_img_create(path: Path, size: int | None, options: list[str] | None = None) -> None:
    """``qemu-img create -f qcow2 [OPTIONS] PATH [SIZE]``; a half-made file is removed."""
    import subprocess

    argv = ["qemu-img", "create", "-q", "-f", "qcow2", *(options or []), str(path)]
    if size is not None:
        argv.append(str(size))
    try:
        done = subprocess.run(argv, capture_output=True, text=True, timeout=60, check=False)
    except OSError as exc:
        raise HostError(
            f"qemu-img: cannot run it: {exc} (hint: apt-get install qemu-utils)"
        ) from exc
    if done.returncode != 0:
        path.unlink(missing_ok=True)
        raise HostError(f"qemu-img create {path}: {done.stderr.strip()}")
