"""`qvm down` and `qvm kill`: ask the live supervisor to end QEMU (ACPI, then quit, then
SIGKILL, or SIGKILL at once) and wait until it has gone; with no supervisor, end an
orphaned QEMU by its recorded pid and start time.
"""

from __future__ import annotations

import os
import signal
import time
from typing import NamedTuple

from qvm.base.proc import same_process_alive
from qvm.errors import NotRunningError, VmStateError
from qvm.layout.rundir import RunDir
from qvm.store.state import read_state
from qvm.supervisor.client import ask_supervisor, clean_stale, supervisor_alive
from qvm.supervisor.wire import KillRequest, StopRequest

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
    reply = ask_supervisor(run, StopRequest(timeout, force), timeout=timeout + 20)
    _wait_supervisor_gone(run, timeout=15)
    return _result(name, reply.ended_by)


def kill(run: RunDir) -> StopResult:
    name = run.name
    if not supervisor_alive(run):
        return _stop_without_supervisor(run, kill=True)
    reply = ask_supervisor(run, KillRequest(), timeout=15)
    _wait_supervisor_gone(run, timeout=15)
    return _result(name, reply.ended_by)


def _result(name: str, ended_by: str | None) -> StopResult:
    return StopResult(name, ended_by, ENDED_BY_TEXT.get(ended_by or "", "it was not running"))


def _stop_without_supervisor(run: RunDir, kill: bool) -> StopResult:
    """No supervisor: an orphaned QEMU (its supervisor was killed) is ended by pid."""
    name = run.name
    state = read_state(run.state_file)
    pid = state.qemu_pid if state is not None else None
    if (
        state is not None
        and pid is not None
        and state.live
        and same_process_alive(pid, state.qemu_start_time)
    ):
        os.kill(pid, signal.SIGKILL)
        deadline = time.monotonic() + 10
        while same_process_alive(pid, state.qemu_start_time) and time.monotonic() < deadline:
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
