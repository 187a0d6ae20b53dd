"""The run-dir records stamped with the QEMU run they are about (``devices.json``,
``forwards.json``, the pending and unplug marks): read field by field, and told from a
previous run's. A module of its own so that what reads one of them loads no other's
(`qvm up` reads the forwards, not the device records).
"""

from __future__ import annotations

from qvm.base.checking import TYPE_CHECKING
from qvm.layout.runfiles import STATE_FILE
from qvm.store.fields import Fields, read_record
from qvm.store.state import QemuRun, current_qemu_run

if TYPE_CHECKING:
    from pathlib import Path

    from qvm.layout.rundir import RunDir


def qemu_run(run: RunDir) -> QemuRun:
    """Which QEMU run a run dir's records are about now (``state.json``'s; corrupt:
    RecordError)."""
    return current_qemu_run(run.file(STATE_FILE))


def same_run(record: Fields, current: QemuRun) -> bool:
    """True if ``record`` (devices.json, forwards.json, ...) is stamped with the
    ``current`` QEMU run; a stamp of the wrong type is a RecordError naming the file."""
    return QemuRun.stamp_of(record).is_current(current)


def read_fields(path: str | Path, hint: str | None = None) -> Fields | None:
    """The JSON object in a run-dir record, to read field by field; None when there is
    none. Not JSON, or not an object: RecordError naming the file."""
    return read_record(path, lambda data, source: Fields(data, source, hint), hint)
