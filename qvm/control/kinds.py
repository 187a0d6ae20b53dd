"""The behaviour of each device kind of ``qvm.layout.kinds``, by reference to its own
module: how it is listed, added and removed on a running VM, and, for a start from a
snapshot (``-loadvm``, or a clone's ``-incoming``), how a saved device goes on QEMU's
command line and is recorded again (``devices.json``), as if qvm had hotplugged it.

The plain facts (id prefix, record name, where a snapshot keeps it, status, completion)
are ``qvm.layout.kinds``, which the CLI's fast paths read without importing this module
and every kind's code. ``tests/unit/layout/test_kinds.py`` holds the two tables to the same
kinds.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from qvm.base.record import Record
from qvm.cmdline.argv import StartFrom
from qvm.control import cpu, disk, memory, nic, share
from qvm.layout.kinds import CPU, DIMM, DISK, NIC, SHARE, VIRTIO_MEM, Kind
from qvm.store.devices import DeviceRecord
from qvm.store.snapshots import DeviceSet, MemoryDevice, PluggedDevice


class KindBehaviour(Record):
    kind: Kind
    list: Callable[..., Any]  # (run) -> the kind's listing (its CLI group's `list`)
    add: Callable[..., Any]  # (run, ...) -> what was added
    remove: Callable[..., Any]  # (run, ids or id, ...) -> what was removed
    # (the saved device, now) -> its devices.json record after a start from a snapshot;
    # None: never recorded (vCPUs: the snapshot keeps their slots)
    restored: Callable[[Any, float], DeviceRecord] | None = None


BEHAVIOURS: dict[str, KindBehaviour] = {
    CPU.name: KindBehaviour(CPU, cpu.list_cpus, cpu.add_cpus, cpu.remove_cpus),
    DIMM.name: KindBehaviour(
        DIMM, memory.list_memory, memory.add_memory, memory.remove_memory, memory.restored_record
    ),
    VIRTIO_MEM.name: KindBehaviour(
        VIRTIO_MEM,
        memory.list_memory,
        memory.add_memory,
        memory.remove_memory,
        memory.restored_record,
    ),
    DISK.name: KindBehaviour(
        DISK, disk.list_disks, disk.attach_disk, disk.detach_disk, disk.restored_record
    ),
    NIC.name: KindBehaviour(NIC, nic.list_nics, nic.add_nic, nic.remove_nic, nic.restored_record),
    # never in a snapshot (QEMU 7.2 cannot save vhost-user-fs), so never restored
    SHARE.name: KindBehaviour(SHARE, share.list_shares, share.add_share, share.remove_share),
}


def restored_records(devices: DeviceSet, now: float) -> list[DeviceRecord]:
    """The devices a snapshot's device set put on QEMU's command line (memory devices,
    hotplugged disks and NICs), as records of devices qvm hotplugged."""
    saved: list[MemoryDevice | PluggedDevice] = [*devices.memory, *devices.plugged]
    records = []
    for device in saved:
        restored = BEHAVIOURS[device.kind].restored
        if restored is None:
            raise ValueError(f"{device.kind} {device.id}: a kind never recorded in devices.json")
        records.append(restored(device, now))
    return records


def device_set_start(devices: DeviceSet) -> StartFrom:
    """A snapshot's device set on QEMU's command line: vCPU slots, memory devices,
    hotplugged disks and NICs with the ids, backends and buses they had."""
    return StartFrom(
        cpu_slots=devices.cpu_slots, memory_devices=devices.memory, plugged=devices.plugged
    )
