"""`qvm status` and `qvm list`: facts about one VM's current or last run. A live
supervisor answers; otherwise the records it left behind speak. Never raises for a VM in
a bad state: the problem rides along in the result.
"""

from __future__ import annotations

import time
from typing import Any

from qvm.base.jsonfile import read_json
from qvm.errors import QvmError
from qvm.layout.rundir import RunDir
from qvm.supervisor.client import (
    LIVE_STATES,
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
    from qvm.store.forwards import current_forwards

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
