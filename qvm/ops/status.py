"""`qvm status` and `qvm list`: facts about one VM's current or last run. A live
supervisor answers; otherwise the records it left behind speak. Never raises for a VM in
a bad state: the problem rides along in the result.
"""

from __future__ import annotations

import time
from typing import Any

from qvm.errors import QvmError, RecordError
from qvm.layout.rundir import RunDir
from qvm.store.launch import read_launch
from qvm.store.state import StateRecord, read_state
from qvm.supervisor.client import (
    SUPERVISOR_ANSWER_TIMEOUT,
    ask_supervisor,
    clean_stale,
    supervisor_alive,
)

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
    try:
        _fill_status(record, run)
    except RecordError as error:  # state.json does not parse: say which file, never fail
        record.update(state="unknown", error=str(error))
    return record


def _fill_status(record: dict[str, Any], run: RunDir) -> None:
    launch_problem = None
    try:
        launch = read_launch(run.launch_file)
    except RecordError as error:  # the state record can still tell the most
        launch, launch_problem = None, str(error)
    state = read_state(run.state_file)
    if state is None:
        record["error"] = launch_problem
        return
    alive = supervisor_alive(run)
    if not alive:
        state = clean_stale(run) or state
    record.update(
        accel=state.accel,
        accel_reason=state.accel_reason,
        restarts=state.restarts,
        last_exit=_exit_json(state),
        machine_file=state.machine_file,
        supervisor_pid=state.supervisor_pid if alive else None,
        error=launch_problem,
    )
    if not alive:
        record["state"] = state.state
        if state.live:  # orphaned QEMU
            record["state"] = "crashed"
            record["pid"] = state.qemu_pid
        record["reason"] = state.ended_reason or state.crash_reason
        if state.orphaned:
            record["reason"] = state.crash_reason
        return
    from qvm.supervisor.wire import StatusRequest  # only a running VM is asked

    try:
        live = ask_supervisor(run, StatusRequest(), timeout=SUPERVISOR_ANSWER_TIMEOUT)
    except QvmError as exc:
        state = read_state(run.state_file) or state
        record["state"] = state.state
        if state.state in ("stopped", "crashed"):
            # a supervisor on its way out after QEMU ended: its record is complete
            record["reason"] = state.ended_reason
            record["last_exit"] = _exit_json(state)
            record["supervisor_pid"] = None
            return
        record["pid"] = state.qemu_pid
        record["error"] = str(exc)
        return
    now = live.record
    record["state"] = now.state
    record["pid"] = now.qemu_pid
    # the live answer, not state.json read a moment earlier: a restart may lie between them
    record["restarts"] = now.restarts
    record["last_exit"] = _exit_json(now)
    if now.state in ("stopped", "crashed") or now.qemu_pid is None:
        record["reason"] = now.ended_reason
    if now.started_at and now.qemu_pid:
        record["uptime"] = round(time.time() - now.started_at, 1)
    if live.vcpus_present is not None:
        vcpus_max = launch.vcpus_max if launch is not None else None
        record["vcpus"] = {"present": live.vcpus_present, "max": vcpus_max}
    if live.memory_bytes is not None:
        memory_max = launch.memory_max if launch is not None else None
        record["memory"] = {"bytes": live.memory_bytes, "max": memory_max}
    from qvm.store.forwards import current_forwards

    record["forwards"] = current_forwards(run)
    record["rss_bytes"] = live.rss_bytes
    record["cpu_percent"] = live.cpu_percent
    record["error"] = live.qmp_error or launch_problem


def _exit_json(state: StateRecord) -> dict[str, Any] | None:
    return state.exit.to_json() if state.exit is not None else None


# --- the guest's own word --------------------------------------------------------------


def add_guest_facts(record: dict[str, Any]) -> dict[str, Any]:
    """``record`` (from ``vm_status``) with ``agent`` (its state: answering, not answering,
    not configured, not running) and ``guest`` (OS, kernel, host name, addresses, from
    the agent; None without one). The agent is asked only while the VM runs, briefly."""
    if record.get("state") != "running" or not record.get("run_dir"):
        # as GuestFacts(NOT_RUNNING) says it, without importing the agent's client
        record["agent"] = {"state": "not running", "detail": None}
        record["guest"] = None
        return record
    from pathlib import Path

    from qvm.control.guest_agent_facts import guest_facts

    facts = guest_facts(RunDir(Path(record["run_dir"])))
    data = facts.as_json()
    record["agent"] = {"state": data.pop("state"), "detail": data.pop("detail")}
    record["guest"] = data if facts.agent == "answering" else None
    return record
