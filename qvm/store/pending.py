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

import time
from collections.abc import Iterable, Sequence
from typing import Any

from qvm.base.jsonfile import read_json, write_json_atomic
from qvm.layout.rundir import RunDir
from qvm.store.devices import qemu_run, same_run

PERIPHERAL = "/machine/peripheral/"

# One QMP command: (name, arguments)
Command = tuple[str, dict[str, Any]]


def device_state(pending: bool) -> str:
    """The state word every `list` uses for a present device: one vocabulary for all kinds."""
    return "unplug-pending" if pending else "present"


def own_path(dev_id: str) -> str:
    """A device's QOM path: ``/machine/peripheral/<id>``, or the path itself for a
    device added without an id (``/machine/peripheral-anon/device[2]``)."""
    return dev_id if dev_id.startswith("/") else f"{PERIPHERAL}{dev_id}"


def pending_marks(run: RunDir) -> dict[str, dict[str, Any]]:
    """Id -> mark, for unplug requests still open in the current QEMU run."""
    pending = read_json(run.pending_file) or {}
    current = qemu_run(run)
    return {
        dev_id: info if isinstance(info, dict) else {}
        for dev_id, info in pending.items()
        if not isinstance(info, dict) or "qemu_pid" not in info or same_run(info, current)
    }


def pending_ids(run: RunDir) -> set[str]:
    """Ids with an unplug request still open in the current QEMU run."""
    return set(pending_marks(run))


def mark_pending(
    run: RunDir, ids: Iterable[str], exact: bool = False, cleanup: Sequence[Command] = ()
) -> None:
    pending = read_json(run.pending_file) or {}
    info: dict[str, Any] = {**qemu_run(run), "since": time.time()}
    if exact:
        info["exact"] = True
    if cleanup:
        info["cleanup"] = [[command, arguments] for command, arguments in cleanup]
    for dev_id in ids:
        pending[dev_id] = info
    write_json_atomic(run.pending_file, pending)


def unmark_pending(run: RunDir, ids: Iterable[str]) -> None:
    pending = read_json(run.pending_file)
    if not pending:
        return
    remaining = {k: v for k, v in pending.items() if k not in set(ids)}
    if remaining != pending:
        write_json_atomic(run.pending_file, remaining)


def deleted_ids(marks: dict[str, Any], data: dict[str, Any]) -> list[str]:
    """The marked ids that a ``DEVICE_DELETED`` event (its ``data``) completes."""
    device = data.get("device")
    path = data.get("path") or ""
    done = []
    for dev_id, info in marks.items():
        own = own_path(dev_id)
        exact = isinstance(info, dict) and info.get("exact")
        if dev_id == device or path == own or (not exact and path.startswith(own + "/")):
            done.append(dev_id)
    return done


def commands_of(mark: dict[str, Any]) -> list[Command]:
    """The cleanup commands of a mark or a ``devices.json`` record."""
    return [
        (str(c[0]), dict(c[1]))
        for c in mark.get("cleanup", []) or []
        if isinstance(c, list | tuple) and len(c) == 2 and isinstance(c[1], dict)
    ]


def complete_pending(run: RunDir, data: dict[str, Any]) -> list[tuple[str, list[Command]]]:
    """Drop the marks a ``DEVICE_DELETED`` event completes; (id, its cleanup) for each."""
    marks = pending_marks(run)
    done = deleted_ids(marks, data)
    if not done:
        return []
    unmark_pending(run, done)
    return [(dev_id, commands_of(marks[dev_id])) for dev_id in done]
