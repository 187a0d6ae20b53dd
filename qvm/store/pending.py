"""``pending.json``: unplug requests the guest has not completed yet.

The control layer writes a mark when it stops waiting for a device to go; the
supervisor, which hears every ``DEVICE_DELETED``, drops the mark when the device goes
and runs the mark's ``cleanup`` (the QMP commands that delete the device's backend: a
memory object, block nodes, a netdev), so a backend never outlives its device.

A mark belongs to one QEMU run (pid and start time); marks of an earlier run mean
nothing. ``exact`` marks end only with ``DEVICE_DELETED`` of the device itself: a
virtio PCI device's ``virtio-backend`` child is deleted about 50 ms before it, while a
vCPU is only ever reported through its ``lapic`` child (QEMU 7.2).
"""

from __future__ import annotations

from qvm.base.checking import TYPE_CHECKING

if TYPE_CHECKING:
    from typing import Any

import time
from collections.abc import Iterable, Sequence

from qvm.base.jsonfile import write_json_atomic
from qvm.base.record import Record
from qvm.errors import RecordError
from qvm.layout.rundir import RunDir
from qvm.layout.runfiles import PENDING_FILE
from qvm.store.devices import Command, commands_json, read_commands
from qvm.store.fields import Fields
from qvm.store.stamped import qemu_run, read_fields
from qvm.store.state import QemuRun

PERIPHERAL = "/machine/peripheral/"
PERIPHERAL_ANON = "/machine/peripheral-anon/"  # a device added without an id
_HINT = "qvm restart ends every pending unplug"


class PendingMark(Record):
    """An unplug request of one device that the guest has not completed."""

    run: QemuRun = QemuRun(None, None)  # pid None: a mark from before marks were stamped
    since: float | None = None
    exact: bool = False  # ended only by DEVICE_DELETED of the device itself
    cleanup: tuple[Command, ...] = ()

    @classmethod
    def read(cls, f: Fields) -> PendingMark:
        return cls(
            run=QemuRun.stamp_of(f),
            since=f.float("since", None),
            exact=f.bool("exact", False),
            cleanup=read_commands(f, "cleanup"),
        )

    def to_json(self) -> dict[str, Any]:
        data: dict[str, Any] = {**self.run.stamp(), "since": self.since}
        if self.exact:
            data["exact"] = True
        if self.cleanup:
            data["cleanup"] = commands_json(self.cleanup)
        return data

    def of_run(self, current: QemuRun) -> bool:
        return self.run.pid is None or self.run.is_current(current)


def device_state(pending: bool) -> str:
    """The state word every `list` uses for a present device: one vocabulary for all kinds."""
    return "unplug-pending" if pending else "present"


def own_path(dev_id: str) -> str:
    """A device's QOM path: ``/machine/peripheral/<id>``, or the path itself for a
    device added without an id (``/machine/peripheral-anon/device[2]``)."""
    return dev_id if dev_id.startswith("/") else f"{PERIPHERAL}{dev_id}"


def _all_marks(run: RunDir) -> dict[str, PendingMark]:
    f = read_fields(run.file(PENDING_FILE), _HINT)
    if f is None:
        return {}
    return {dev_id: PendingMark.read(f.object(dev_id)) for dev_id in f.data}


def _save(run: RunDir, marks: dict[str, PendingMark]) -> None:
    write_json_atomic(run.pending_file, {k: v.to_json() for k, v in marks.items()})


def pending_marks(run: RunDir) -> dict[str, PendingMark]:
    """Id -> mark, for unplug requests still open in the current QEMU run."""
    current = qemu_run(run)
    return {k: v for k, v in _all_marks(run).items() if v.of_run(current)}


def pending_ids(run: RunDir) -> set[str]:
    """Ids with an unplug request still open in the current QEMU run."""
    return set(pending_marks(run))


def mark_pending(
    run: RunDir, ids: Iterable[str], exact: bool = False, cleanup: Sequence[Command] = ()
) -> None:
    mark = PendingMark(qemu_run(run), time.time(), exact, tuple(cleanup))
    _save(run, {**_all_marks(run), **dict.fromkeys(ids, mark)})


def unmark_pending(run: RunDir, ids: Iterable[str]) -> None:
    marks = _all_marks(run)
    remaining = {k: v for k, v in marks.items() if k not in set(ids)}
    if len(remaining) != len(marks):
        _save(run, remaining)


def deleted_ids(marks: dict[str, PendingMark], data: dict[str, Any]) -> list[str]:
    """The marked ids that a ``DEVICE_DELETED`` event (its ``data``) completes."""
    device = data.get("device")
    path = data.get("path") or ""
    done = []
    for dev_id, mark in marks.items():
        own = own_path(dev_id)
        if dev_id == device or path == own or (not mark.exact and path.startswith(own + "/")):
            done.append(dev_id)
    return done


def complete_pending(run: RunDir, data: dict[str, Any]) -> list[tuple[str, list[Command]]]:
    """Drop the marks a ``DEVICE_DELETED`` event completes; (id, its cleanup) for each.

    Called by the supervisor for every ``DEVICE_DELETED``: a pending.json that does not
    parse completes nothing (as when there is none), since an error here would end the
    supervisor's event loop; the CLI's own reads say what is wrong with it.
    """
    try:
        marks = pending_marks(run)
    except RecordError:
        return []
    done = deleted_ids(marks, data)
    if not done:
        return []
    unmark_pending(run, done)
    return [(dev_id, list(marks[dev_id].cleanup)) for dev_id in done]
