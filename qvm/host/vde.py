"""A network's ``vde_switch`` (Debian's ``vde2``): started, checked and stopped with the
same care as QEMU. Its identity is its pid and start time (``switch.json``), checked with
its command line before any signal. It runs as a daemon of its own (``-d``): not a child
of whichever qvm process started it, so it outlives that process and leaves no zombie.

Every function here runs under the network's lock (``qvm.store.networks.network_lock``).
Stdlib only, without pathlib: the supervisor restarts a dead switch.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import time

from qvm.base.proc import find_program, identity_problem, process_start_time
from qvm.errors import HostError
from qvm.layout.netfiles import MGMT_SOCKET, SWITCH_PID, NetFiles
from qvm.store.networks import SwitchRecord, read_switch, write_switch

VDE_SWITCH = "vde_switch"
START_TIMEOUT = 3.0  # for the daemon to write its pid file and listen
STOP_TIMEOUT = 3.0
PACKAGE_HINT = "install Debian's vde2 (apt-get install vde2; scripts/setup does)"


def switch_problem(net: NetFiles, record: SwitchRecord | None) -> str | None:
    """Why the recorded switch is not running (None: it runs): never started, dead, or
    its pid now names another process."""
    if record is None:
        return "no switch was started"
    sock = net.switch_dir
    return identity_problem(
        record.pid,
        record.start_time,
        "the switch",
        lambda argv: os.path.basename(argv[0]) == VDE_SWITCH and sock in argv,
    )


def switch_running(net: NetFiles) -> SwitchRecord | None:
    """The running switch's record, or None."""
    record = read_switch(net)
    return record if switch_problem(net, record) is None else None


def ensure_switch(net: NetFiles, restart: bool = False) -> tuple[SwitchRecord, bool]:
    """The network's running switch, started if it is not: (its record, whether this
    call started it). ``restart``: a member found it dead (counted in ``restarts``)."""
    record = read_switch(net)
    if record is not None and switch_problem(net, record) is None:
        return record, False
    binary = find_program(VDE_SWITCH)
    if binary is None:
        raise HostError(f"network {net.name}: no {VDE_SWITCH} on PATH", hint=PACKAGE_HINT)
    try:
        _remove_leftovers(net)
    except OSError as error:
        raise HostError(
            f"network {net.name}: cannot clear the dead switch's files:"
            f" {error.filename}: {error.strerror or error}"
        ) from None
    argv = [
        binary,
        "-d",
        "-s",
        net.switch_dir,
        "-M",
        net.file(MGMT_SOCKET),
        "-p",
        net.file(SWITCH_PID),
    ]
    done = subprocess.run(
        argv, capture_output=True, text=True, check=False, stdin=subprocess.DEVNULL
    )
    if done.returncode != 0:
        why = " ".join(done.stderr.split())[:300] or f"exit status {done.returncode}"
        raise HostError(f"network {net.name}: {VDE_SWITCH} did not start: {why}")
    pid = _wait_started(net)
    # the count and the last death are of this switch's life: since a member's start
    # found none running
    old = record if restart and record is not None else None
    started = SwitchRecord(
        pid=pid,
        start_time=process_start_time(pid),
        started_at=time.time(),
        restarts=old.restarts + 1 if old else 0,
        died_at=old.died_at if old else None,
    )
    write_switch(net, started)
    return started, True


def _wait_started(net: NetFiles) -> int:
    deadline = time.monotonic() + START_TIMEOUT
    ctl = os.path.join(net.switch_dir, "ctl")
    while time.monotonic() < deadline:
        with contextlib.suppress(OSError, ValueError):
            with open(net.file(SWITCH_PID)) as handle:
                pid = int(handle.read().strip())
            if os.path.exists(ctl):
                return pid
        time.sleep(0.01)
    raise HostError(
        f"network {net.name}: {VDE_SWITCH} wrote no pid file or socket within"
        f" {START_TIMEOUT:g} s (see the system log)"
    )


def _remove_leftovers(net: NetFiles) -> None:
    """A killed switch leaves its sockets and pid file; a new one will not bind over them."""
    for name in (MGMT_SOCKET, SWITCH_PID):
        with contextlib.suppress(FileNotFoundError):
            os.unlink(net.file(name))
    with contextlib.suppress(FileNotFoundError):
        for entry in os.listdir(net.switch_dir):
            with contextlib.suppress(FileNotFoundError):
                os.unlink(os.path.join(net.switch_dir, entry))
        os.rmdir(net.switch_dir)


def stop_switch(net: NetFiles) -> bool:
    """Stop the network's switch (SIGTERM, then SIGKILL), once its identity is checked;
    True if one was running."""
    record = read_switch(net)
    if record is None or switch_problem(net, record) is not None:
        _remove_leftovers(net)
        return False
    for signum in (signal.SIGTERM, signal.SIGKILL):
        with contextlib.suppress(ProcessLookupError):
            os.kill(record.pid, signum)
        deadline = time.monotonic() + STOP_TIMEOUT
        while time.monotonic() < deadline:
            if switch_problem(net, record) is not None:
                _remove_leftovers(net)
                return True
            time.sleep(0.01)
    raise HostError(f"network {net.name}: the switch (pid {record.pid}) did not stop")
