"""``cpu-unplugged.json``: a vCPU left the current QEMU run. Under TCG, QEMU 7.2 crashes
on the next vCPU ``device_add`` after any vCPU unplug (``qvm.control.guard`` refuses it).

Two writers: qvm's own ``cpu del`` when it asks for the unplug, and the supervisor for
every ``DEVICE_DELETED`` of a vCPU it sees, whoever asked (a user's qmp-shell on
``qmp.sock``, ``qvm qmp ... device_del``): QEMU sends events to every monitor. The file
names the QEMU run (pid, start time) it is about; a later run ignores it.
"""

from __future__ import annotations

import re
import time
from collections.abc import Sequence
from typing import Any

from qvm.base.jsonfile import read_json, write_json_atomic
from qvm.layout.rundir import RunDir
from qvm.store.devices import qemu_run, same_run

# QEMU 7.2 reports a vCPU's removal only for its LAPIC child (see qemu-facts.md)
_VCPU_LAPIC = re.compile(r"/machine/peripheral(?:-anon)?/(?P<id>[^/]+)/lapic")


def unplugged_vcpu(event_data: dict[str, Any]) -> str | None:
    """The id of the vCPU a DEVICE_DELETED event is about, or None for any other device."""
    path = event_data.get("path")
    match = _VCPU_LAPIC.fullmatch(path) if isinstance(path, str) else None
    return match["id"] if match else None


def cpu_unplugged_this_run(run: RunDir) -> bool:
    record = read_json(run.cpu_unplugged_file)
    return record is not None and same_run(record, qemu_run(run))


def record_cpu_unplug(
    run: RunDir, ids: Sequence[str], current: dict[str, Any] | None = None
) -> None:
    """Add ``ids`` to the record of the QEMU run ``current`` (default: the one state.json
    names). RecordWriteError if the file cannot be written."""
    current = current if current is not None else qemu_run(run)
    record = read_json(run.cpu_unplugged_file)
    if record is None or not same_run(record, current):
        record = {**current, "ids": []}
    known = record.get("ids")
    record["ids"] = sorted(set(known if isinstance(known, list) else []) | set(ids))
    record["at"] = time.time()
    write_json_atomic(run.cpu_unplugged_file, record)
