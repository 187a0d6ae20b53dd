"""``snapshots.json``: the snapshots qvm took of a VM, each with what it needs to be
restored truthfully: when, the guest's clock, the RAM, the device set at that moment
(vCPU slots, DIMMs and virtio-mem, hotplugged disks and NICs, forwards) and the hash of
the definition it was taken under.

A record is added only after QEMU's job concluded without error, so a failed save (a full
disk, QEMU killed) lists nothing half-made. ``SnapshotRecord.read`` checks every field
where the file is read; a record that does not parse is a ``RecordError`` naming the file.

The comparison of two device sets (``device_set_differences``) and of two definition
shapes (``shape_differences``) is pure: it decides between loading in place and
restarting QEMU, and what a refusal says.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any, Self

from qvm.base.jsonfile import write_json_atomic
from qvm.base.record import Record
from qvm.layout.kinds import (
    CPU,
    KINDS,
    SNAPSHOT_MEMORY,
    SNAPSHOT_PLUGGED,
    count_text,
    snapshot_kinds,
)
from qvm.layout.rundir import RunDir
from qvm.store.fields import Fields, PlainRecord, read_record
from qvm.store.launch import Forward

if TYPE_CHECKING:
    from qvm.store.devices import DeviceRecord

SNAPSHOTS_HINT = "it lists qvm's snapshots; remove it to forget them (the disks keep theirs)"
MEMORY_KINDS = snapshot_kinds(SNAPSHOT_MEMORY)  # "dimm", "virtio-mem"
PLUGGED_KINDS = snapshot_kinds(SNAPSHOT_PLUGGED)  # "disk", "nic"
TAG_PATTERN = r"[A-Za-z0-9][A-Za-z0-9_.-]{0,63}"


class MemoryDevice(PlainRecord):
    """A DIMM or virtio-mem device present at save time."""

    id: str
    kind: str  # one of MEMORY_KINDS
    backend: str  # the memory backend's object id (its RAM block carries this name)
    size: int  # the backend's size (virtio-mem: its maximum)
    requested_size: int | None = None  # virtio-mem only
    bus: str | None = None  # the PCIe root port of a virtio-mem device (q35)

    @classmethod
    def read(cls, f: Fields) -> Self:
        return f.declared(cls, kind=f.one_of("kind", MEMORY_KINDS))


class PluggedDevice(PlainRecord):
    """A disk or NIC qvm hotplugged, present at save time: what the command line needs
    to recreate it (a kind of PLUGGED_KINDS uses the fields it needs)."""

    id: str
    kind: str  # one of PLUGGED_KINDS
    file: str | None = None
    format: str | None = None
    model: str | None = None
    mac: str | None = None
    bus: str | None = None  # the PCIe root port it sits on (q35): -loadvm finds it there
    readonly: bool = False

    @classmethod
    def read(cls, f: Fields) -> Self:
        return f.declared(cls, kind=f.one_of("kind", PLUGGED_KINDS))

    @classmethod
    def kept_of(cls, record: DeviceRecord) -> Self:
        """What a snapshot keeps of a device qvm recorded: the fields the two share (a
        ``restored_record`` in its kind's module makes the record again)."""
        return cls(**{field: getattr(record, field) for field in cls._fields})


class DeviceSet(Record):
    """What a QEMU run had beyond its definition's boot devices, as QEMU reported it."""

    cpu_slots: tuple[int, ...]  # the linear indexes of the present vCPU slots (0 = boot)
    memory: tuple[MemoryDevice, ...] = ()
    plugged: tuple[PluggedDevice, ...] = ()
    forwards: tuple[Forward, ...] = ()

    @classmethod
    def read(cls, f: Fields) -> DeviceSet:
        slots = f.any("cpu_slots")
        if not isinstance(slots, list) or not all(
            isinstance(s, int) and not isinstance(s, bool) and s >= 0 for s in slots
        ):
            raise f.fail("cpu_slots", "must be a list of slot numbers")
        return cls(
            cpu_slots=tuple(sorted(slots)),
            memory=f.records("memory", MemoryDevice.read, ()),
            plugged=f.records("plugged", PluggedDevice.read, ()),
            forwards=f.records("forwards", Forward.read, ()),
        )

    def to_json(self) -> dict[str, Any]:
        return {
            "cpu_slots": list(self.cpu_slots),
            "memory": [m.to_json() for m in self.memory],
            "plugged": [p.to_json() for p in self.plugged],
            "forwards": [f.to_json() for f in self.forwards],
        }

    def summary(self) -> str:
        """``3 vCPUs, 1 DIMM`` for people: every kind it holds, in the table's order."""
        parts = [count_text(CPU, len(self.cpu_slots))]
        parts_of: dict[str, Sequence[MemoryDevice | PluggedDevice]] = {
            SNAPSHOT_MEMORY: self.memory,
            SNAPSHOT_PLUGGED: self.plugged,
        }
        for kind in KINDS:
            devices = parts_of.get(kind.snapshot, ())
            count = sum(1 for d in devices if d.kind == kind.name)
            if count:
                parts.append(count_text(kind, count))
        return ", ".join(parts)


class SnapshotRecord(Record):
    tag: str
    created: float  # host time (time.time()) when the job concluded
    disk_only: bool  # no RAM: restored only on a stopped VM, by qemu-img
    files: tuple[str, ...]  # the image files that hold it (for qemu-img on a stopped VM)
    devices: DeviceSet
    definition_sha256: str | None  # the machine file's bytes at save time
    shape: dict[str, Any]  # what of the definition a load depends on (see ops.snapshot)
    save_seconds: float | None = None
    nodes: tuple[str, ...] = ()  # their block nodes, when QEMU saved it
    # with memory only (None for --disk-only):
    # the guest's own clock at save time (ns since the epoch, from the guest agent); None
    # when no agent answered
    guest_time_ns: int | None = None
    vm_clock_ns: int | None = None  # QEMU's virtual clock at save time (how long the guest ran)
    ram_bytes: int | None = None  # the VM's RAM at save time, boot memory and devices
    vmstate_bytes: int | None = None  # the size of the saved RAM and device state
    vmstate_node: str | None = None  # the block node holding the RAM state

    @classmethod
    def read(cls, f: Fields) -> SnapshotRecord:
        return f.declared(
            cls,
            disk_only=f.bool("disk_only", False),
            nodes=f.str_list("nodes"),
            files=f.str_list("files", ()),
            devices=DeviceSet.read(f.object("devices")),
            shape=f.mapping("shape", {}),
        )

    def to_json(self) -> dict[str, Any]:
        data = self._asdict()
        data["nodes"] = list(self.nodes)
        data["files"] = list(self.files)
        data["devices"] = self.devices.to_json()
        return data


def read_snapshots(run: RunDir) -> tuple[SnapshotRecord, ...]:
    """The VM's snapshot records, oldest first; none when there is no file."""
    f = read_record(run.snapshots_file, lambda data, source: Fields(data, source, SNAPSHOTS_HINT))
    if f is None:
        return ()
    return f.records("snapshots", SnapshotRecord.read, ())


def find_snapshot(run: RunDir, tag: str) -> SnapshotRecord | None:
    return next((s for s in read_snapshots(run) if s.tag == tag), None)


def write_snapshots(
    run: RunDir, records: tuple[SnapshotRecord, ...] | list[SnapshotRecord]
) -> None:
    write_json_atomic(run.snapshots_file, {"snapshots": [r.to_json() for r in records]})


def add_snapshot(run: RunDir, record: SnapshotRecord) -> None:
    """Add (or replace, by tag) one record; RecordWriteError when the disk is full."""
    kept = [s for s in read_snapshots(run) if s.tag != record.tag]
    write_snapshots(run, [*kept, record])


def drop_snapshot(run: RunDir, tag: str) -> None:
    records = read_snapshots(run)
    kept = [s for s in records if s.tag != tag]
    if len(kept) != len(records):
        write_snapshots(run, kept)


# --- comparisons (pure) -------------------------------------------------------------------


def _by_id_differences(
    saved: Sequence[Any], now: Sequence[Any], compared: Callable[[Any], object]
) -> list[str]:
    """Devices (with ``id`` and ``kind``) gone, added or changed by what ``compared`` keeps."""
    saved_by_id = {d.id: d for d in saved}
    now_by_id = {d.id: d for d in now}
    problems = [
        f"{saved_by_id[i].kind} {i} is gone" for i in sorted(saved_by_id.keys() - now_by_id.keys())
    ]
    problems += [
        f"{now_by_id[i].kind} {i} was added" for i in sorted(now_by_id.keys() - saved_by_id.keys())
    ]
    problems += [
        f"{saved_by_id[i].kind} {i} changed"
        for i in sorted(saved_by_id.keys() & now_by_id.keys())
        if compared(saved_by_id[i]) != compared(now_by_id[i])
    ]
    return problems


def device_set_differences(saved: DeviceSet, now: DeviceSet) -> list[str]:
    """How the device set ``now`` differs from the ``saved`` one, one phrase each; empty
    when a snapshot taken with ``saved`` loads truthfully into a QEMU with ``now``.
    Forwards are host-side only (not in the guest's state): they never differ here."""
    problems = []
    if saved.cpu_slots != now.cpu_slots:
        problems.append(
            f"vCPU slots {_slots(saved.cpu_slots)} at save time, {_slots(now.cpu_slots)} now"
        )
    problems += _by_id_differences(saved.memory, now.memory, lambda m: (m.kind, m.backend, m.size))
    problems += _by_id_differences(saved.plugged, now.plugged, lambda p: p)
    return problems


def shape_differences(saved: dict[str, Any], now: dict[str, Any]) -> list[str]:
    """The keys of a definition's shape (``key -> value``) that differ: ``cpu.max: 4 at
    save time, now 2``."""
    keys = sorted(saved.keys() | now.keys())
    return [
        f"{key}: {_shown(saved.get(key))} at save time, now {_shown(now.get(key))}"
        for key in keys
        if saved.get(key) != now.get(key)
    ]


# the command-line options whose values make up what a snapshot's state depends on
SHAPE_OPTIONS = ("-machine", "-cpu", "-smp", "-m", "-device", "-blockdev")
# devices a snapshot carries in its own device set, not in the definition's shape
DEVICE_SET_DRIVERS = ("pc-dimm", "virtio-mem-pci")
STATE_NODE_PREFIX = "qvm-state"  # the state disk's nodes (qvm.cmdline.argv.STATE_NODE)


def shape_of_argv(
    argv: tuple[str, ...] | list[str], plugged: Sequence[PluggedDevice] = ()
) -> dict[str, Any]:
    """What of QEMU's command line a snapshot's state depends on, by key: the machine,
    CPU, topology and memory, and every device and block node by its id. Host-side facts
    (forwarded ports, file logging, sockets, image paths) and the device set a snapshot
    carries itself (vCPU and memory devices, the state disk, and the ``plugged`` disks and
    NICs a restart puts on the command line) are left out."""
    carried = {p.id for p in plugged} | {f"{p.id}-file" for p in plugged}
    shape: dict[str, Any] = {}
    args = list(argv)
    for option, value in zip(args, args[1:], strict=False):
        if option not in SHAPE_OPTIONS:
            continue
        if option == "-device":
            driver = value.split(",", 1)[0]
            if driver.endswith("-x86_64-cpu") or driver in DEVICE_SET_DRIVERS:
                continue
            if _prop(value, "id") in carried:
                continue
            key = "device:" + (_prop(value, "id") or value)
        elif option == "-blockdev":
            node = _prop(value, "node-name") or value
            if node.startswith(STATE_NODE_PREFIX) or node in carried:
                continue
            key = "blockdev:" + node
            # where an image lies is the host's business (a clone's lie elsewhere)
            value = ",".join(p for p in value.split(",") if not p.startswith("filename="))
        else:
            key = option.lstrip("-")
        shape[key] = value
    return shape


def _prop(value: str, key: str) -> str | None:
    for part in value.split(","):
        if part.startswith(key + "="):
            return part[len(key) + 1 :]
    return None


def _slots(slots: tuple[int, ...]) -> str:
    return "{" + ",".join(str(s) for s in slots) + "}"


def _shown(value: Any) -> str:
    return "unset" if value is None else repr(value) if isinstance(value, str) else str(value)


# --- clones -------------------------------------------------------------------------------


class CloneRecord(Record):
    """``clone.json`` in a clone's run dir: where its first start comes from, and what
    that start did about the NICs' MACs."""

    template: str
    tag: str
    memory: str  # the migration stream (QEMU's -incoming) of the template's snapshot
    devices: DeviceSet
    # NIC id -> the template's MAC, which the guest's driver holds in the memory image
    template_macs: dict[str, str] = {}
    # after the first start: how each NIC got the clone's own MAC (or why it did not)
    mac_note: str | None = None
    # the template's clock at the save (its agent's answer); None: no agent answered then,
    # or a clone made by an older qvm
    guest_time_ns: int | None = None
    # after the first start: what happened to the guest's clock, which stood still since
    # the save, as a restore says it
    clock_note: str | None = None

    @classmethod
    def read(cls, f: Fields) -> CloneRecord:
        macs = f.object("template_macs", None)
        if macs is not None and not all(isinstance(v, str) for v in macs.data.values()):
            raise f.fail("template_macs", "must map NIC ids to MACs")
        return f.declared(
            cls,
            devices=DeviceSet.read(f.object("devices")),
            template_macs=dict(macs.data) if macs is not None else {},
        )

    def to_json(self) -> dict[str, Any]:
        return {**self._asdict(), "devices": self.devices.to_json()}


def read_clone(run: RunDir) -> CloneRecord | None:
    return read_record(
        run.clone_file, lambda data, source: CloneRecord.read(Fields(data, source, None))
    )


def write_clone(run: RunDir, record: CloneRecord) -> None:
    write_json_atomic(run.clone_file, record.to_json())
