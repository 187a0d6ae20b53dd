"""``devices.json``: what qvm hotplugged into the current QEMU run (memory, disks, NICs),
stamped with that run (QEMU's pid and start time), so that ``list`` can show files and
forwards QMP cannot and ``--persist`` knows what to write. QEMU stays the truth for what is
present: a record whose device is gone is dropped.
"""

from __future__ import annotations

from typing import Any

from qvm.base.jsonfile import read_json, write_json_atomic
from qvm.layout.rundir import RunDir


def qemu_run(run: RunDir) -> dict[str, Any]:
    """Which QEMU process a run dir's records are about now (pid and start time)."""
    state = read_json(run.state_file) or {}
    return {"qemu_pid": state.get("qemu_pid"), "qemu_start_time": state.get("qemu_start_time")}


def same_run(record: dict[str, Any], current: dict[str, Any]) -> bool:
    """True if ``record`` (pending marks, devices.json, ...) is about the ``current`` QEMU."""
    return bool(current.get("qemu_pid")) and all(
        record.get(k) == current.get(k) for k in ("qemu_pid", "qemu_start_time")
    )


def hotplugged(run: RunDir) -> list[dict[str, Any]]:
    """What qvm hotplugged into the VM's current QEMU (``devices.json``; an earlier
    run's record means nothing): one dict per device, with ``id`` and ``kind``."""
    record = read_json(run.devices_file)
    if record is None or not same_run(record, qemu_run(run)):
        return []
    return [d for d in record.get("devices", []) if isinstance(d, dict) and d.get("id")]


def save_hotplugged(run: RunDir, devices: list[dict[str, Any]]) -> None:
    write_json_atomic(run.devices_file, {**qemu_run(run), "devices": devices})


# --- what qvm hotplugged in this QEMU run ---------------------------------------------


def add_device_record(run: RunDir, entry: dict[str, Any]) -> None:
    save_hotplugged(run, [*hotplugged(run), entry])


def drop_device_record(run: RunDir, dev_id: str) -> None:
    devices = hotplugged(run)
    kept = [d for d in devices if d.get("id") != dev_id]
    if kept != devices:
        save_hotplugged(run, kept)
