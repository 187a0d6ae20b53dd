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

from qvm.base.jsonfile import write_json_atomic
from qvm.base.record import Record
from qvm.errors import RecordError
from qvm.layout.rundir import RunDir
from qvm.store.fields import Fields
from qvm.store.stamped import qemu_run, read_fields
from qvm.store.state import QemuRun

# QEMU 7.2 reports a vCPU's removal only for its LAPIC child (see qemu-facts.md)
_VCPU_LAPIC = re.compile(r"/machine/peripheral(?:-anon)?/(?P<id>[^/]+)/lapic")
_HINT = "qvm restart starts a QEMU run that ignores it"


class CpuUnplugRecord(Record):
    """The vCPUs that left one QEMU run."""

    run: QemuRun
    ids: tuple[str, ...]
    at: float | None = None

    @classmethod
    def read(cls, f: Fields) -> CpuUnplugRecord:
        return cls(QemuRun.stamp_of(f), f.str_list("ids", ()), f.float("at", None))

    def to_json(self) -> dict[str, Any]:
        return {**self.run.stamp(), "ids": list(self.ids), "at": self.at}


def unplugged_vcpu(event_data: dict[str, Any]) -> str | None:
    """The id of the vCPU a DEVICE_DELETED event is about, or None for any other device."""
    path = event_data.get("path")
    match = _VCPU_LAPIC.fullmatch(path) if isinstance(path, str) else None
    return match["id"] if match else None


def _read(run: RunDir) -> CpuUnplugRecord | None:
    f = read_fields(run.cpu_unplugged_file, _HINT)
    return CpuUnplugRecord.read(f) if f is not None else None


def cpu_unplugged_this_run(run: RunDir) -> bool:
    """A vCPU left the current QEMU run. A corrupt record: RecordError naming it."""
    record = _read(run)
    return record is not None and record.run.is_current(qemu_run(run))


def record_cpu_unplug(run: RunDir, ids: Sequence[str], current: QemuRun | None = None) -> None:
    """Add ``ids`` to the record of the QEMU run ``current`` (default: the one state.json
    names). RecordWriteError if the file cannot be written; a corrupt record is replaced
    (the supervisor calls this for every vCPU unplug it sees, and must go on watching)."""
    current = current if current is not None else qemu_run(run)
    try:
        record = _read(run)
    except RecordError:
        record = None
    known = record.ids if record is not None and record.run.is_current(current) else ()
    updated = CpuUnplugRecord(current, tuple(sorted({*known, *ids})), time.time())
    write_json_atomic(run.cpu_unplugged_file, updated.to_json())
