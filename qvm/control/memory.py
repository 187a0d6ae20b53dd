"""Memory hotplug on a running VM: DIMMs (pc-dimm) and virtio-mem devices.

``-m SIZE,slots=N,maxmem=MAX`` (``memory.size``, ``memory.slots``, ``memory.max``) gives a
VM boot memory and room for memory devices: a DIMM takes a slot and its size, a
virtio-mem device takes no slot but reserves its maximum size (QEMU counts it so:
"not enough space, currently 0x30000000 in use of total space for memory devices").

What QEMU 7.2 and the test guest do here, measured:

- a 256 MiB DIMM: the guest's MemTotal grows about 134 ms after ``device_add`` (the
  guest onlines the new blocks itself: Linux needs ``auto_online_blocks`` or a udev
  rule); ``device_del``: ``DEVICE_DELETED`` after about 62 ms, then the backend object
  can go. Linux onlines memory in 128 MiB blocks.
- virtio-mem (pc and q35, where it needs a PCIe root port like any PCI device): the
  guest's virtio_mem driver plugs the requested size (~140 ms for 128 MiB) and QEMU
  reports each change with ``MEMORY_DEVICE_SIZE_CHANGE``; shrinking to 0 took ~2.3 s.
  QEMU 7.2 cannot unplug a virtio-mem device at all ("virtio based memory devices
  cannot be unplugged"): resize it to 0 instead; it goes at the next restart.
- the guest kernel keeps 64 MiB for swiotlb when memory hotplug is configured, so the
  MemTotal it reports is below the VM's memory.

Nothing here prints.
"""

from __future__ import annotations

import time
from collections.abc import Iterable, Sequence
from typing import TYPE_CHECKING, Any

from qvm.base.record import Record
from qvm.base.sizes import human_size
from qvm.base.text import display_path
from qvm.cmdline.argv import has_shared_memory
from qvm.control.guard import check_device_add
from qvm.control.guest import guest_report
from qvm.control.guest_agent_facts import SOURCE_QEMU, SOURCE_SERIAL, agent_link
from qvm.control.memory_blocks import (
    GuestBlocks,
    check_block_multiple,
    dimm_blocks_online,
    guest_block_size,
)
from qvm.control.pci import choose_pci_bus, pci_places
from qvm.control.qmp_session import Events, QmpSession
from qvm.control.transaction import (
    DeviceUnplug,
    ListedDevice,
    Peripheral,
    Plug,
    Step,
    already_pending,
    find_listed,
    launch_of,
    new_device_id,
    opened,
    peripheral_ids,
    plug,
    reconcile_devices,
    restart_hint,
    since,
    taken_ids,
    unplug_one,
)
from qvm.errors import HotplugError
from qvm.layout import kinds
from qvm.layout.rundir import RunDir
from qvm.store.devices import Command, DeviceRecord, update_device_record
from qvm.store.launch import LaunchRecord
from qvm.store.pending import pending_ids
from qvm.supervisor.qmp_replies import memory_devices, memory_summary

if TYPE_CHECKING:
    from qvm.store.snapshots import MemoryDevice as SavedMemory

DIMM_PREFIX = kinds.DIMM.id_prefix
VIRTIO_MEM_PREFIX = kinds.VIRTIO_MEM.id_prefix
BACKEND_PREFIX = "mem-"
# sizes of memory devices are whole multiples of this (virtio-mem's block size on x86)
SIZE_STEP = 2 * 1024**2
DEFAULT_GUEST_TIMEOUT = 10.0
SIZE_CHANGE = "MEMORY_DEVICE_SIZE_CHANGE"
MEMORY_KINDS = tuple(k.name for k in kinds.group_kinds("mem"))  # "dimm", "virtio-mem"
DIMM = Peripheral(kinds.DIMM.noun)


class MemoryInfo(Record, ListedDevice):
    id: str
    kind: str  # "dimm" or "virtio-mem"
    size: int  # bytes plugged now
    backend: str | None  # the memory backend object's id (under /objects)
    slot: int | None = None  # a DIMM's slot
    max_size: int | None = None  # virtio-mem: its backend's size
    requested_size: int | None = None  # virtio-mem: what the guest is asked to plug
    block_size: int | None = None
    addr: int | None = None
    bus: str | None = None  # the root port a virtio-mem device sits on (q35)
    by_qvm: bool = False  # hotplugged by qvm (else with qvm qmp, or at boot)
    pending: bool = False  # device_del asked, the guest has not released it

    @property
    def reserved(self) -> int:
        """What it takes of memory.max: a virtio-mem device reserves its maximum."""
        return self.max_size if self.kind == "virtio-mem" and self.max_size else self.size


class MemoryState(Record):
    name: str
    boot: int  # boot memory (memory.size)
    max: int | None  # memory.max; None: no memory hotplug
    slots: int  # memory.slots
    devices: Sequence[MemoryInfo] = ()
    plugged: int = 0  # QEMU's plugged-memory
    guest_kb: int | None = None  # the guest's own MemTotal, from its serial console

    @property
    def total(self) -> int:
        """What QEMU gives the guest now: boot memory and what is plugged."""
        return self.boot + self.plugged

    @property
    def in_use(self) -> int:
        """Of memory.max: boot memory, DIMMs, and virtio-mem devices' maximums."""
        return self.boot + sum(d.reserved for d in self.devices)

    @property
    def room(self) -> int:
        return max((self.max or self.boot) - self.in_use, 0)

    @property
    def slots_used(self) -> int:
        return sum(1 for d in self.devices if d.kind == "dimm")

    def find(self, dev_id: str) -> MemoryInfo | None:
        return find_listed(self.devices, dev_id)

    def summary(self) -> str:
        if self.max is None:
            return (
                f"{human_size(self.total)}; memory hotplug is off (no memory.max and memory.slots)"
            )
        return (
            f"{human_size(self.total)} ({human_size(self.boot)} boot + "
            f"{human_size(self.plugged)} plugged); {human_size(self.in_use)} of memory.max "
            f"{human_size(self.max)} in use, room for {human_size(self.room)}; "
            f"{self.slots_used} of {self.slots} DIMM slots used"
        )

    def as_json(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "boot": self.boot,
            "max": self.max,
            "slots": self.slots,
            "slots_used": self.slots_used,
            "plugged": self.plugged,
            "total": self.total,
            "in_use": self.in_use,
            "room": self.room,
            "devices": [d.as_json() for d in self.devices],
            "guest_mem_kb": self.guest_kb,
        }


def memory_state_from(
    name: str,
    launch: LaunchRecord,
    devices: Any,
    summary: Any,
    records: Iterable[DeviceRecord],
    pending: set[str],
    guest: dict[str, str] | None = None,
) -> MemoryState:
    """``MemoryState`` from ``query-memory-devices``, ``query-memory-size-summary``,
    qvm's records and pending marks, and the guest's own report."""
    ours = {r.id: r for r in records if r.kind in MEMORY_KINDS}
    found = [
        MemoryInfo(
            id=device.id,
            kind=device.type,
            size=device.size,
            backend=device.backend,
            slot=device.slot,
            max_size=device.max_size,
            requested_size=device.requested_size,
            block_size=device.block_size,
            addr=device.addr,
            bus=ours[device.id].bus if device.id in ours else None,
            by_qvm=device.id in ours,
            pending=device.id in pending,
        )
        for device in memory_devices(devices)
    ]
    sizes = memory_summary(summary)
    guest_kb = None
    if guest and str(guest.get("mem_kb", "")).isdigit():
        guest_kb = int(guest["mem_kb"])
    return MemoryState(
        name=name,
        boot=sizes.base or launch.memory_size or 0,
        max=launch.memory_max,
        slots=launch.memory_slots or 0,
        devices=found,
        plugged=sizes.plugged,
        guest_kb=guest_kb,
    )


def _query(session: QmpSession, run: RunDir, launch: LaunchRecord) -> MemoryState:
    records = reconcile_devices(session, run, peripheral_ids(session), MEMORY_KINDS)
    return memory_state_from(
        run.name,
        launch,
        session.execute("query-memory-devices"),
        session.execute("query-memory-size-summary"),
        records.values(),
        pending_ids(run),
        guest_report(run),
    )


def list_memory(run: RunDir) -> MemoryState:
    with opened(run) as (session, launch):
        return _query(session, run, launch)


# --- checks, before QEMU is asked --------------------------------------------------------


def check_size(name: str, action: str, size: int) -> None:
    if size <= 0 or size % SIZE_STEP:
        raise HotplugError(
            f"{name}: {action}: the size must be a positive multiple of "
            f"{human_size(SIZE_STEP)}, got {size} bytes ({human_size(size)}) "
            '(hint: sizes look like "256M" or "1G")'
        )


def check_room(state: MemoryState, run: RunDir, launch: LaunchRecord, size: int) -> None:
    """Refuse a memory device of ``size`` bytes past memory.max, saying by how much."""
    name = run.name
    if state.max is None or state.max <= state.boot:
        raise HotplugError(
            f"{name}: mem add: memory hotplug is off: the VM was started without room above "
            f"memory.size (hint: set memory.max and memory.slots in "
            f"{_file(launch)}, then qvm restart {name})"
        )
    if size > state.room:
        devices = state.in_use - state.boot
        room = f"add at most {human_size(state.room)}, or " if state.room else ""
        raise HotplugError(
            f"{name}: mem add {human_size(size)}: past memory.max: {human_size(state.in_use)} "
            f"in use ({human_size(state.boot)} boot + {human_size(devices)} of memory "
            f"devices), asked {human_size(size)}, max {human_size(state.max)} "
            f"(hint: {room}{restart_hint(run, launch, 'memory.max')})"
        )


def check_slot(state: MemoryState, run: RunDir, launch: LaunchRecord) -> None:
    if state.slots_used >= state.slots:
        # a virtio-mem device without --max takes all the room left: said, not a surprise
        virtio_mem = (
            f"add --virtio-mem (it needs no slot; without --max it reserves all the "
            f"{human_size(state.room)} left below memory.max), "
            if state.room >= SIZE_STEP
            else ""
        )
        raise HotplugError(
            f"{run.name}: mem add: no free memory slot: {state.slots_used} of {state.slots} "
            f"DIMM slots used (hint: remove a DIMM with qvm mem del, {virtio_mem}"
            f"or {restart_hint(run, launch, 'memory.slots')})"
        )


def _file(launch: LaunchRecord) -> str:
    file = launch.machine_file
    return display_path(file) if file else "the machine file"


# --- add -------------------------------------------------------------------------------


class MemoryAdd(Record):
    name: str
    device: MemoryInfo
    state: MemoryState  # after the add
    # virtio-mem: what the guest plugged within the timeout, and when
    plugged: int | None = None
    seconds: float | None = None
    forced_after_unplug: bool = False
    # a DIMM's blocks as the guest agent saw them (None: no agent; source says what told)
    guest: GuestBlocks | None = None
    source: str = SOURCE_QEMU
    source_detail: str | None = None  # why not the agent

    @property
    def complete(self) -> bool:
        if self.guest is not None and not self.guest.complete:
            return False
        wanted = self.device.requested_size
        return self.device.kind == "dimm" or self.plugged == wanted

    def as_json(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "device": self.device.as_json(),
            "memory": self.state.as_json(),
            "plugged": self.plugged,
            "seconds": self.seconds,
            "guest": self.guest.as_json() if self.guest else None,
            "source": self.source,
            "source_detail": self.source_detail,
            "complete": self.complete,
        }


def add_memory(
    run: RunDir,
    size: int,
    virtio_mem: bool = False,
    max_size: int | None = None,
    dev_id: str | None = None,
    timeout: float = DEFAULT_GUEST_TIMEOUT,
    force: bool = False,
    online_them: bool = True,
) -> MemoryAdd:
    """Plug a DIMM of ``size`` bytes, or a virtio-mem device (``virtio_mem``) that asks
    the guest for ``size`` bytes and may grow to ``max_size`` (default: all the room).

    A DIMM must be a whole number of the guest's memory blocks; when the guest agent
    answers, qvm waits until the guest has the DIMM's blocks online, onlining those it
    leaves offline (unless not ``online_them``)."""
    launch = launch_of(run)
    action = "mem add"
    if size or not virtio_mem:  # a virtio-mem device may start empty
        check_size(run.name, action, size)
    if max_size is not None and not virtio_mem:
        raise HotplugError(f"{run.name}: mem add: --max is for --virtio-mem devices only")
    with opened(run, launch) as (session, launch):
        forced = check_device_add(run, launch, action, force)
        state = _query(session, run, launch)
        taken = _taken_ids(session, run, state)
        if virtio_mem:
            return _add_virtio_mem(
                session, run, launch, state, size, max_size, dev_id, taken, timeout, forced
            )
        check_room(state, run, launch, size)
        check_slot(state, run, launch)
        with agent_link(run) as link:
            block_size = guest_block_size(link)
            check_block_multiple(run.name, size, block_size)
            dev_id = new_device_id(run, dev_id, DIMM_PREFIX, taken, action)
            record = _record(dev_id, "dimm", size)
            plug(session, run, _plan(run, launch, record, size, {"driver": "pc-dimm"}))
            after = _query(session, run, launch)
            device = after.find(dev_id) or MemoryInfo(
                dev_id, "dimm", size, record.backend, by_qvm=True
            )
            blocks, source, why = dimm_blocks_online(
                link, block_size, device.addr, size, timeout, online_them
            )
            if blocks is None and source == SOURCE_QEMU and after.guest_kb is not None:
                source = SOURCE_SERIAL  # the test guest's MemTotal (mem list)
            return MemoryAdd(
                run.name,
                device,
                after,
                forced_after_unplug=forced,
                guest=blocks,
                source=source,
                source_detail=why,
            )


def _add_virtio_mem(
    session: QmpSession,
    run: RunDir,
    launch: LaunchRecord,
    state: MemoryState,
    size: int,
    max_size: int | None,
    dev_id: str | None,
    taken: set[str],
    timeout: float,
    forced: bool,
) -> MemoryAdd:
    name = run.name
    maximum = max_size if max_size is not None else state.room - state.room % SIZE_STEP
    check_room(state, run, launch, max(maximum, SIZE_STEP))
    check_size(name, "mem add --max", maximum)
    if size > maximum:
        raise HotplugError(
            f"{name}: mem add: {human_size(size)} is more than the device's maximum "
            f"{human_size(maximum)} (hint: raise --max)"
        )
    bus = choose_pci_bus(pci_places(session, launch), run, launch, "mem add --virtio-mem")
    dev_id = new_device_id(run, dev_id, VIRTIO_MEM_PREFIX, taken, "mem add")
    record = _record(dev_id, "virtio-mem", size, max_size=maximum, bus=bus)
    device: dict[str, Any] = {"driver": "virtio-mem-pci", "requested-size": size}
    if bus is not None:
        device["bus"] = bus
    # the guest is quick: its size changes are listened for from before device_add
    plan = _plan(run, launch, record, maximum, device)._replace(events=(SIZE_CHANGE,))
    started = time.monotonic()

    def plugged(events: Events | None) -> tuple[int, float | None]:
        assert events is not None
        return _wait_size(session, events, dev_id, size, started + timeout, started)

    reached = plug(session, run, plan, plugged)
    assert reached is not None
    after = _query(session, run, launch)
    added = after.find(dev_id) or MemoryInfo(dev_id, "virtio-mem", 0, record.backend, by_qvm=True)
    return MemoryAdd(name, added, after, *reached, forced)


def _taken_ids(session: QmpSession, run: RunDir, state: MemoryState) -> set[str]:
    objects = session.execute("qom-list", {"path": "/objects"})
    taken = taken_ids(session, run, (d.id for d in state.devices))
    # a backend left behind (its deletion failed) keeps its device's id taken
    taken |= {
        o["name"][len(BACKEND_PREFIX) :] for o in objects if o["name"].startswith(BACKEND_PREFIX)
    }
    return taken


def _record(dev_id: str, kind: str, size: int, **facts: Any) -> DeviceRecord:
    backend = BACKEND_PREFIX + dev_id
    return DeviceRecord(
        dev_id,
        kind,
        cleanup=backend_cleanup(backend),
        backend=backend,
        size=size,
        added=time.time(),
        **facts,
    )


def backend_cleanup(backend: str) -> tuple[Command, ...]:
    """What deletes a memory device's backend once the device is gone."""
    return (("object-del", {"id": backend}),)


def restored_record(saved: SavedMemory, now: float) -> DeviceRecord:
    """The record of a memory device a snapshot's start put on QEMU's command line, as
    if qvm had hotplugged it (``mem list``, ``mem del`` know it)."""
    return DeviceRecord(
        saved.id,
        saved.kind,
        cleanup=backend_cleanup(saved.backend),
        bus=saved.bus,
        backend=saved.backend,
        size=saved.size,
        added=now,
    )


def plug_steps(
    dev_id: str, backend: str, size: int, device: dict[str, Any], shared: bool = False
) -> list[Step]:
    """A memory backend of ``size`` bytes (shared memory when the VM's RAM is: what its
    virtiofs shares need), then the device using it."""
    kind = {"qom-type": "memory-backend-memfd", "share": True} if shared else {}
    return [
        Step(
            "object-add",
            {"qom-type": "memory-backend-ram", **kind, "id": backend, "size": size},
            ("object-del", {"id": backend}),
        ),
        Step("device_add", {"id": dev_id, "memdev": backend, **device}),
    ]


def _plan(
    run: RunDir, launch: LaunchRecord, record: DeviceRecord, size: int, device: dict[str, Any]
) -> Plug:
    """The backend of ``size`` bytes and ``device`` on it, recorded as ``record``."""
    assert record.backend is not None

    def translate(desc: str) -> tuple[str, str | None] | None:
        if "not enough space" in desc:  # memory.max, as QEMU counts it
            return f"device_add: {desc}", restart_hint(run, launch, "memory.max")
        return None

    shared = has_shared_memory(launch.argv)
    steps = plug_steps(record.id, record.backend, size, device, shared)
    return Plug("mem add", steps, record, translate)


def _wait_size(
    session: QmpSession,
    events: Events,
    dev_id: str,
    wanted: int,
    deadline: float,
    started: float,
) -> tuple[int, float | None]:
    """Wait for ``MEMORY_DEVICE_SIZE_CHANGE`` events until the device's size is
    ``wanted``; (its size then, seconds it took or None if it never got there)."""
    size = _current_size(session, dev_id)

    def reached(event: dict[str, Any]) -> bool:
        nonlocal size
        data = event.get("data") or {}
        if data.get("id") == dev_id:
            size = int(data.get("size", size))
        return size == wanted

    if size != wanted and events.wait(reached, deadline) is None:
        return _current_size(session, dev_id), None
    return size, since(started)


def _current_size(session: QmpSession, dev_id: str) -> int:
    devices = memory_devices(session.execute("query-memory-devices"))
    return next((d.size for d in devices if d.id == dev_id), 0)


# --- remove ------------------------------------------------------------------------------


class MemoryRemove(Record):
    name: str
    device: MemoryInfo
    unplug: DeviceUnplug
    state: MemoryState  # after

    def as_json(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "device": self.device.as_json(),
            **self.unplug.as_json(),
            "memory": self.state.as_json(),
        }


def find_device(state: MemoryState, run: RunDir, dev_id: str) -> MemoryInfo:
    device = state.find(dev_id)
    if device is None:
        known = ", ".join(d.id for d in state.devices) or "none"
        raise HotplugError(
            f"{run.name}: no memory device {dev_id!r} (memory devices: {known}) "
            f"(hint: qvm mem list {run.name}; boot memory cannot be unplugged)"
        )
    return device


def remove_memory(run: RunDir, dev_id: str, timeout: float = DEFAULT_GUEST_TIMEOUT) -> MemoryRemove:
    """Unplug a DIMM, wait for the guest to release it, then delete its backend."""
    name = run.name
    with opened(run) as (session, launch):
        state = _query(session, run, launch)
        device = find_device(state, run, dev_id)
        if device.kind == "virtio-mem":
            raise HotplugError(
                f"{name}: {dev_id} is a virtio-mem device, which QEMU 7.2 cannot unplug "
                f"(hint: 'qvm mem resize {name} {dev_id} 0' gives its memory back; the device "
                "goes at the next restart)"
            )
        if device.pending:
            raise already_pending(name, dev_id, "mem")
        # a DIMM qvm did not add (qvm qmp) can go too: QEMU names its backend
        cleanup = [("object-del", {"id": device.backend})] if device.backend else []
        unplug = unplug_one(session, run, DIMM, dev_id, timeout, cleanup)
        return MemoryRemove(name, device, unplug, _query(session, run, launch))


# --- resize (virtio-mem) -------------------------------------------------------------------


class MemoryResize(Record):
    name: str
    id: str
    before: int
    requested: int
    size: int  # what the guest has plugged at the end of the wait
    seconds: float | None  # None: it did not reach the requested size in time
    timeout: float

    @property
    def complete(self) -> bool:
        return self.size == self.requested

    def as_json(self) -> dict[str, Any]:
        data = self._asdict()
        del data["timeout"]
        return {**data, "complete": self.complete}


def resize_memory(
    run: RunDir, dev_id: str, size: int, timeout: float = DEFAULT_GUEST_TIMEOUT
) -> MemoryResize:
    """Ask the guest to plug ``size`` bytes of a virtio-mem device (``requested-size``),
    and wait until its size is that (``MEMORY_DEVICE_SIZE_CHANGE``)."""
    name = run.name
    with opened(run) as (session, launch):
        device = find_device(_query(session, run, launch), run, dev_id)
        if device.kind != "virtio-mem":
            raise HotplugError(
                f"{name}: {dev_id} is a DIMM, whose size is fixed (hint: add or remove DIMMs, "
                f"or use a virtio-mem device: qvm mem add {name} SIZE --virtio-mem)"
            )
        if size and size % (device.block_size or SIZE_STEP):
            raise HotplugError(
                f"{name}: mem resize {dev_id}: the size must be a multiple of its block size "
                f"{human_size(device.block_size or SIZE_STEP)}, got {human_size(size)}"
            )
        if device.max_size is not None and size > device.max_size:
            raise HotplugError(
                f"{name}: mem resize {dev_id}: {human_size(size)} is more than its maximum "
                f"{human_size(device.max_size)} (hint: the maximum is fixed when the device "
                "is added: mem add --max)"
            )
        with session.listen([SIZE_CHANGE]) as events:
            started = time.monotonic()
            session.execute(
                "qom-set",
                {
                    "path": f"/machine/peripheral/{dev_id}",
                    "property": "requested-size",
                    "value": size,
                },
            )
            reached, seconds = _wait_size(session, events, dev_id, size, started + timeout, started)
        update_device_record(run, dev_id, size=size)
        return MemoryResize(name, dev_id, device.size, size, reached, seconds, timeout)
