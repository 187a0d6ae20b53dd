"""Disk hotplug on a running VM: attach an image as a virtio-blk-pci disk, detach it.

Attach is three QMP steps, undone in reverse if a later one fails: ``blockdev-add`` of a
``file`` node (``<id>-file``), ``blockdev-add`` of the format node (``<id>``, the same
names the boot disks get), ``device_add virtio-blk-pci`` on a free PCIe root port (q35)
or on ``pci.0`` (pc). Detach is ``device_del``, ``DEVICE_DELETED`` of the device itself
(its ``virtio-backend`` child goes ~50 ms earlier), then ``blockdev-del`` of both nodes.

Images are the user's: qvm never deletes or overwrites one. ``--new SIZE`` creates a
qcow2 in the VM's run dir (``hotplug-<id>.qcow2``, never over an existing file);
detaching it keeps it there. An image another QEMU holds is refused before QEMU is asked, naming the
VM (other run dirs' records) or the process; QEMU's own "Failed to get "write" lock" is
translated the same way.

Nothing here prints.
"""

from __future__ import annotations

import os
from collections.abc import Collection, Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

from qvm.base.record import Record
from qvm.control import transaction
from qvm.control.guard import check_device_add
from qvm.control.guest import guest_report
from qvm.control.pci import PciListing, PciPlaces, choose_pci_bus, pci_places
from qvm.control.qmp_session import QmpSession
from qvm.errors import HotplugError
from qvm.host.holders import describe_holders, locked_by_someone, users_of
from qvm.layout import kinds
from qvm.layout.rundir import RunDir
from qvm.store.devices import Command, DeviceRecord
from qvm.store.launch import LaunchRecord
from qvm.store.pending import pending_ids
from qvm.store.stamped import qemu_run
from qvm.supervisor.qmp_replies import block_devices, named_block_nodes

if TYPE_CHECKING:
    from qvm.store.snapshots import PluggedDevice

DISK_PREFIX = kinds.DISK.id_prefix
DEFAULT_UNPLUG_TIMEOUT = 10.0
LOCK_ERROR = 'Failed to get "write" lock'
SHARED_LOCK_ERROR = 'Failed to get shared "write" lock'
DISK = transaction.Peripheral(kinds.DISK.noun)


class DiskInfo(Record, transaction.ListedDevice):
    id: str
    origin: str  # "boot" (the machine file), "qvm" (attached by qvm), "other" (qvm qmp)
    file: str | None
    format: str | None
    readonly: bool
    node: str | None  # the format node QEMU reads it through
    size: int | None  # virtual size
    bus: str | None = None  # the root port it sits on (q35, attached by qvm)
    created: bool = False  # made by 'disk attach --new' in the run dir
    pending: bool = False


# `disk list`: the guest's names for what it has are those in its /sys/block
DiskList = PciListing[DiskInfo]
LISTING_KEYS = ("disks", "guest_blk")  # their names in JSON (schemas/disk-list.json)


def disks_from(
    name: str,
    block: Any,
    records: Mapping[str, DeviceRecord],
    pending: Collection[str],
    boot_ids: Collection[str],
    places: PciPlaces,
    guest: dict[str, str] | None = None,
) -> DiskList:
    """``DiskList`` from ``query-block``, qvm's records (of disks) by id and the boot
    ``-device`` ids."""
    disks = []
    for entry in block_devices(block):
        dev_id = entry.device_id
        inserted = entry.inserted
        if dev_id is None or inserted is None:
            continue
        record = records.get(dev_id)
        disks.append(
            DiskInfo(
                id=dev_id,
                origin=transaction.origin_of(dev_id, record, boot_ids),
                file=(record and record.file) or inserted.file or None,
                format=inserted.driver or None,
                readonly=inserted.readonly,
                node=inserted.node or None,
                size=inserted.virtual_size,
                bus=record.bus if record else None,
                created=bool(record and record.created),
                pending=dev_id in pending,
            )
        )
    return PciListing(name, LISTING_KEYS, disks, places, transaction.guest_names(guest, "blk"))


def _query(session: QmpSession, run: RunDir, launch: LaunchRecord) -> DiskList:
    records = transaction.reconcile_devices(
        session, run, transaction.peripheral_ids(session), (kinds.DISK.name,)
    )
    return disks_from(
        run.name,
        session.execute("query-block"),
        records,
        pending_ids(run),
        transaction.boot_device_ids(launch.argv),
        pci_places(session, launch),
        guest_report(run),
    )


def list_disks(run: RunDir) -> DiskList:
    with transaction.opened(run) as (session, launch):
        return _query(session, run, launch)


# --- checks ------------------------------------------------------------------------------


def check_image(run: RunDir, path: Path, readonly: bool, disks: DiskList) -> None:
    """Refuse an image this VM already has, or another QEMU holds, before QEMU is asked."""
    name = run.name
    real = os.path.realpath(path)
    if not path.exists():
        raise HotplugError(
            f"{name}: disk attach: {path}: file not found "
            "(hint: check the path, or use --new SIZE to make an empty image)"
        )
    if not path.is_file() and not path.is_block_device():
        raise HotplugError(f"{name}: disk attach: {path}: not a file (hint: check the path)")
    mine = [d.id for d in disks.devices if d.file and os.path.realpath(d.file) == real]
    if mine:
        raise HotplugError(
            f"{name}: disk attach: {path} is already attached to {name} as {mine[0]} "
            f"(hint: qvm disk list {name})"
        )
    others = users_of(path, run.path.parent, exclude=name)
    blocking = sorted({vm for vm, writes in others if writes or not readonly})
    if blocking:
        raise HotplugError(
            f"{name}: disk attach: {path} is in use by VM {', VM '.join(blocking)} "
            f"(hint: detach it there or stop {blocking[0]} first"
            f"{'' if readonly else ', or attach it --readonly if they only read it'})"
        )
    if locked_by_someone(path, write=not readonly):
        who = describe_holders(run.path.parent, path, None) or "another process"
        raise HotplugError(
            f"{name}: disk attach: {path} is locked by {who}, which uses it "
            "(hint: stop it first; 'fuser' or 'lslocks' show the holder)"
        )


def _qemu_pid(run: RunDir) -> int | None:
    return qemu_run(run).pid


# --- attach ------------------------------------------------------------------------------


class DiskAttach(Record):
    name: str
    disk: DiskInfo
    places: PciPlaces  # after the attach
    created: Path | None = None  # the image 'attach --new' made
    forced_after_unplug: bool = False

    def as_json(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "disk": self.disk.as_json(),
            "created": str(self.created) if self.created else None,
            "pci": self.places.as_json(),
        }


def attach_disk(
    run: RunDir,
    file: Path | None = None,
    new_size: int | None = None,
    fmt: str | None = None,
    readonly: bool = False,
    dev_id: str | None = None,
    force: bool = False,
) -> DiskAttach:
    """Attach ``file`` (or a new qcow2 of ``new_size`` bytes in the run dir) as a
    virtio-blk-pci disk."""
    launch = transaction.launch_of(run)
    name = run.name
    if (file is None) == (new_size is None):
        raise HotplugError(f"{name}: disk attach: give an image FILE or --new SIZE (one of them)")
    if new_size is not None and (fmt not in (None, "qcow2") or readonly):
        raise HotplugError(f"{name}: disk attach --new makes a writable qcow2 image")
    if new_size is not None and (new_size <= 0 or new_size % 512):
        raise HotplugError(
            f"{name}: disk attach --new: the size must be a positive multiple of 512 bytes, "
            f"got {new_size}"
        )
    with transaction.opened(run, launch) as (session, launch):
        forced = check_device_add(run, launch, "disk attach", force)
        disks = _query(session, run, launch)
        named = named_block_nodes(session.execute("query-named-block-nodes", {"flat": True}))
        nodes = {n.node for n in named if n.node}
        taken = transaction.taken_ids(session, run, (d.id for d in disks.devices)) | nodes
        created = None
        if new_size is not None:
            dev_id = _new_disk_id(run, dev_id, taken, nodes, new=True)
            bus = choose_pci_bus(disks.places, run, launch, "disk attach")
            created = run.new_disk_image(dev_id)
            create_image(run, created, new_size)
            path, fmt = created, "qcow2"
        else:
            assert file is not None
            path = Path(os.path.abspath(file.expanduser()))
            check_image(run, path, readonly, disks)  # first: it is what the user named
            dev_id = _new_disk_id(run, dev_id, taken, nodes, new=False)
            bus = choose_pci_bus(disks.places, run, launch, "disk attach")
            if fmt is None:
                from qvm.host.qemu_img import detect_format  # noqa: PLC0415 -- not `disk list`

                fmt = detect_format(path)
        record = DeviceRecord(
            dev_id,
            kinds.DISK.name,
            cleanup=node_cleanup(dev_id),
            bus=bus,
            file=str(path),
            format=fmt,
            readonly=readonly,
            created=created is not None,
        )
        try:
            transaction.plug(session, run, _plan(run, record, path, fmt))
        except BaseException:
            if created is not None:
                created.unlink(missing_ok=True)  # made a moment ago for this attach only
            raise
        after = _query(session, run, launch)
        disk = after.find(dev_id) or DiskInfo(dev_id, "qvm", str(path), fmt, readonly, dev_id, None)
        return DiskAttach(name, disk, after.places, created, forced)


def node_cleanup(dev_id: str) -> tuple[Command, ...]:
    """What deletes a hotplugged disk's block nodes once the device is gone."""
    return (
        ("blockdev-del", {"node-name": dev_id}),
        ("blockdev-del", {"node-name": f"{dev_id}-file"}),
    )


def restored_record(saved: PluggedDevice, now: float) -> DeviceRecord:
    """The record of a disk a snapshot's start put on QEMU's command line, as if qvm had
    hotplugged it (``disk list``, ``disk detach`` know it)."""
    return DeviceRecord(**saved._asdict(), cleanup=node_cleanup(saved.id), added=now)


def _new_disk_id(
    run: RunDir, dev_id: str | None, taken: set[str], nodes: set[Any], new: bool
) -> str:
    def free(candidate: str) -> bool:
        if f"{candidate}-file" in nodes:
            return False
        return not (new and run.new_disk_image(candidate).exists())

    if dev_id is None:
        return transaction.fresh_id(DISK_PREFIX, taken, ok=free)[1]
    transaction.check_new_id(
        run,
        dev_id,
        taken | {n[: -len("-file")] for n in nodes if n and n.endswith("-file")},
        "disk attach",
    )
    image = run.new_disk_image(dev_id)
    if new and image.exists():
        raise HotplugError(
            f"{run.name}: disk attach --new: {image} exists already, and qvm never overwrites "
            f"an image (hint: attach it as is: qvm disk attach {run.name} {image}, or pick "
            "another --id)"
        )
    return dev_id


def create_image(run: RunDir, path: Path, size: int) -> None:
    """``qemu-img create -f qcow2 PATH SIZE``, never over an existing file."""
    from qvm.host.qemu_img import qemu_img_create  # noqa: PLC0415 -- not for `disk list`

    if path.exists():
        raise HotplugError(f"{run.name}: disk attach --new: {path} exists already")
    qemu_img_create(path, size)


def _plan(run: RunDir, record: DeviceRecord, path: Path, fmt: str) -> transaction.Plug:
    """A file node, a format node, the device; what was done is undone when a step fails."""
    dev_id, bus, readonly = record.id, record.bus, record.readonly
    file_node = f"{dev_id}-file"
    device = {"driver": "virtio-blk-pci", "id": dev_id, "drive": dev_id}
    steps = [
        transaction.Step(
            "blockdev-add",
            {
                "driver": "file",
                "node-name": file_node,
                "filename": str(path),
                "read-only": readonly,
            },
            ("blockdev-del", {"node-name": file_node}),
        ),
        transaction.Step(
            "blockdev-add",
            {"driver": fmt, "node-name": dev_id, "file": file_node, "read-only": readonly},
            ("blockdev-del", {"node-name": dev_id}),
        ),
        transaction.Step("device_add", device | ({"bus": bus} if bus else {})),
    ]

    def translate(desc: str) -> tuple[str, str | None] | None:
        if LOCK_ERROR not in desc and SHARED_LOCK_ERROR not in desc:
            return None
        who = describe_holders(run.path.parent, path, _qemu_pid(run)) or "another process"
        return (
            f'{path} is locked by {who}: QEMU could not take its lock ("{desc}")',
            "detach it there or stop it first",
        )

    return transaction.Plug("disk attach", steps, record, translate)


# --- detach ------------------------------------------------------------------------------


def detach_disk(
    run: RunDir, dev_id: str, timeout: float = DEFAULT_UNPLUG_TIMEOUT
) -> transaction.Removal[DiskInfo]:
    """Unplug a disk qvm attached, wait for the guest, delete its block nodes. The image
    file stays where it is."""
    with transaction.opened(run) as (session, launch):
        disks = _query(session, run, launch).devices
        return transaction.remove_hotplugged(session, run, launch, DISK, dev_id, disks, timeout)


# --- the machine file ----------------------------------------------------------------------


def disk_entry(disk: DiskInfo, machine_file: Path, with_id: bool) -> dict[str, Any]:
    """The ``[[disk]]`` that gives this disk at the next boot (``--persist``): its file
    (relative to the machine file's folder when inside it), format, read-only, and the
    id when the user chose it (else the boot id is disk<index>, as for any [[disk]])."""
    entry: dict[str, Any] = {"file": _file_for(Path(str(disk.file)), machine_file)}
    if disk.format:
        entry["format"] = disk.format
    if disk.readonly:
        entry["readonly"] = True
    if with_id:
        entry["id"] = disk.id
    return entry


def disk_entry_matches(entry: dict[str, Any], disk: DiskInfo, machine_file: Path) -> bool:
    """True if a ``[[disk]]`` of the machine file is this disk: the same id, or no id and
    the same file."""
    if entry.get("id") is not None:
        return bool(entry.get("id") == disk.id)
    file = entry.get("file")
    if not isinstance(file, str) or not disk.file:
        return False
    path = machine_file.parent / Path(file).expanduser()
    return os.path.realpath(path) == os.path.realpath(disk.file)


def _file_for(path: Path, machine_file: Path) -> str:
    folder = machine_file.parent.resolve()
    try:
        return str(path.resolve().relative_to(folder))
    except ValueError:
        return str(path)
