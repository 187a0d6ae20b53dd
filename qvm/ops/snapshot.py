"""Snapshots, the use cases: save, list, rm, restore (and `qvm up --restore`).

A snapshot with memory is QEMU's internal snapshot in every writable qcow2 image of the VM
plus the RAM and device state in one of them (the run dir's ``state.qcow2`` when the VM
has no writable qcow2 disk of its own). Its record (``qvm.store.snapshots``) is written
only once QEMU's job concluded, and says what a truthful restore needs: the device set
and the shape of the definition.

Restore, the one rule: the guest's memory and QEMU's devices must agree. On a running VM
whose device set and shape match, ``snapshot-load`` in place (QEMU 7.2 does not check
this itself). Otherwise, or on a stopped VM, QEMU is started anew with the snapshot's
device set on its command line and ``-loadvm``. Everything that can refuse (no such tag,
a disk gone, a definition changed in a way that breaks the snapshot) is checked before
the running VM is touched.

Nothing here prints: every operation returns a record for the CLI.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import re
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from qvm.base.jsonfile import RecordWriteError
from qvm.base.record import Record
from qvm.base.sizes import human_size
from qvm.cmdline.argv import STATE_NODE, LaunchInputs, StartFrom, build_argv
from qvm.definition.naming import overlay_name
from qvm.definition.schema import Machine
from qvm.errors import EXIT_USAGE, ControlError, QvmError, VmStateError
from qvm.host.qemu_img_snapshots import image_snapshots, qemu_img_snapshot
from qvm.layout.rundir import RunDir
from qvm.ops.frozen import check_unused
from qvm.store.launch import LaunchRecord
from qvm.store.snapshots import (
    TAG_PATTERN,
    DeviceSet,
    SnapshotRecord,
    add_snapshot,
    device_set_differences,
    drop_snapshot,
    find_snapshot,
    read_snapshots,
    shape_differences,
    shape_of_argv,
)
from qvm.store.state import read_state
from qvm.supervisor.boot import UpResult
from qvm.supervisor.client import supervisor_alive

# (bytes done, bytes in all) of a running save
Progress = Callable[[int, int], None]


class TagError(QvmError):
    exit_code = EXIT_USAGE


def check_tag(name: str, tag: str) -> None:
    if not re.fullmatch(TAG_PATTERN, tag):
        raise TagError(
            f"{name}: snapshot tag {tag!r}: must match {TAG_PATTERN} (hint: e.g. 'booted')"
        )


def no_snapshot(run: RunDir, tag: str) -> VmStateError:
    return VmStateError(f"{run.name}: no snapshot {tag!r} (hint: qvm snapshot list {run.name})")


# --- the shape of a definition (pure) --------------------------------------------------------


def start_from(record: SnapshotRecord) -> StartFrom:
    """The snapshot's device set on QEMU's command line, and ``-loadvm`` of its tag."""
    from qvm.control.kinds import device_set_start  # noqa: PLC0415 -- QMP: not for `snapshot list`

    return device_set_start(record.devices)._replace(loadvm=record.tag)


def definition_sha256(path: str | None) -> str | None:
    if not path:
        return None
    try:
        return hashlib.sha256(Path(path).read_bytes()).hexdigest()
    except OSError:
        return None


def _made_by_qvm(run: RunDir, image: Path) -> bool:
    """An image `disk attach --new` made in this run dir (a ``file =`` after --persist)."""
    return os.path.realpath(image) in {os.path.realpath(p) for p in run.new_disk_images()}


def stopped_disks(run: RunDir, machine: Machine) -> list[Path]:
    """The images a disk-only snapshot of a stopped VM goes into: every ``base`` disk's
    overlay. Refused, naming the disk: ``file =`` disks and read-only ones."""
    files = []
    for index, disk in enumerate(machine.disks):
        where = f"{machine.path}: disk[{index}]"
        if disk.readonly:
            raise VmStateError(
                f"{where} is read-only: qvm cannot record its state, and could not vouch at "
                "restore that it is unchanged (hint: set readonly = false, or remove it)"
            )
        if disk.file is not None and _made_by_qvm(run, disk.file):
            files.append(disk.file)  # made by `disk attach --new`, then persisted: qvm's own
            continue
        if disk.file is not None:
            raise VmStateError(
                f"{where}.file: {disk.file} is used as is: a snapshot would be written into "
                "your image (hint: use `base =` instead: qvm then keeps an overlay)"
            )
        overlay = run.path / overlay_name(index)
        if not overlay.exists():
            raise VmStateError(
                f"{where}: its overlay {overlay} does not exist yet (hint: qvm up {run.name} once)"
            )
        files.append(overlay)
    if not files:
        raise VmStateError(
            f"{run.name}: no disk to snapshot (hint: a snapshot of a stopped VM holds disks "
            f"only; start it with qvm up {run.name} and save one with memory)"
        )
    return files


# --- save ----------------------------------------------------------------------------------


class SaveResult(Record):
    name: str
    record: SnapshotRecord
    state_disk_added: bool  # the state disk was added to the running QEMU by this save

    def as_json(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "state_disk_added": self.state_disk_added,
            **snapshot_json(self.record),
        }


def snapshot_json(record: SnapshotRecord) -> dict[str, Any]:
    data = record.to_json()
    data["device_summary"] = record.devices.summary()
    return data


def save(
    run: RunDir,
    tag: str,
    disk_only: bool = False,
    machine: Machine | None = None,
    progress: Progress | None = None,
) -> SaveResult:
    """Save snapshot ``tag`` of the VM: with memory on a running VM, the disks only
    (``disk_only``) on a running or stopped one (``machine``: its definition)."""
    check_tag(run.name, tag)
    if find_snapshot(run, tag) is not None:
        raise VmStateError(
            f"{run.name}: snapshot {tag!r} exists (hint: qvm snapshot rm {run.name} {tag}, "
            "or pick another tag)"
        )
    if supervisor_alive(run):
        return _save_running(run, tag, disk_only, progress)
    if not disk_only:
        raise VmStateError(
            f"{run.name}: not running: a snapshot with memory needs a running VM (hint: "
            f"qvm up {run.name}; or --disk-only for its disks alone)"
        )
    if machine is None:
        raise VmStateError(f"{run.name}: not running, and its definition was not given")
    return _save_stopped(run, tag, machine)


def _save_running(run: RunDir, tag: str, disk_only: bool, progress: Progress | None) -> SaveResult:
    from qvm.control import snapshot as qmp  # noqa: PLC0415 -- QMP: not for `snapshot list`
    from qvm.control.cpu_slots import topology_from_launch  # noqa: PLC0415 -- as above
    from qvm.control.transaction import opened  # noqa: PLC0415 -- as above

    with opened(run) as (session, launch):
        nodes = qmp.block_nodes(session)
        targets = qmp.snapshot_nodes(run, nodes)
        taken = [n.node for n in targets if tag in n.snapshots]
        if taken:
            raise VmStateError(
                f"{run.name}: the disks {', '.join(taken)} already hold a snapshot {tag!r} that "
                f"qvm did not record (hint: qvm qmp {run.name} snapshot-delete, or pick "
                "another tag)"
            )
        if disk_only:  # the state disk holds no guest data: nothing to keep of it
            targets = [n for n in targets if n.node != STATE_NODE]
            if not targets:
                raise VmStateError(
                    f"{run.name}: no disk to snapshot: --disk-only keeps disks, and this VM "
                    f"has none (hint: qvm snapshot save {run.name} {tag}, with its memory)"
                )
        added = False
        state = None if disk_only else qmp.vmstate_node(targets)
        if not disk_only and not targets:
            if not run.state_disk.exists():
                from qvm.host.qemu_img import qemu_img_create  # noqa: PLC0415 -- 1st save only

                qemu_img_create(run.state_disk, 1024**2)
            qmp.add_state_node(session, run)
            added = True
            targets = qmp.snapshot_nodes(run, qmp.block_nodes(session))
            state = qmp.vmstate_node(targets)
        if not targets:
            raise VmStateError(f"{run.name}: no disk to hold the snapshot")
        names = [n.node for n in targets]
        devices = qmp.device_set(session, run, launch, topology_from_launch(launch))
        ram = qmp.ram_bytes(session)
        guest_ns = qmp.guest_time_ns(run)
        if disk_only or state is None:
            seconds = qmp.save_disk_only(session, tag, names)
        else:
            try:
                seconds = qmp.save_job(session, tag, state.node, names, progress)
            except ControlError as error:
                raise _with_space_hint(error, Path(state.file), ram) from error
        after = qmp.block_nodes(session)
        clock, vmstate_size = (None, None)
        if state is not None and not disk_only:
            clock, vmstate_size = qmp.vm_clock_ns(after, state.node, tag)
        record = SnapshotRecord(
            tag=tag,
            created=time.time(),
            disk_only=disk_only,
            guest_time_ns=guest_ns,
            vm_clock_ns=clock,
            ram_bytes=ram,
            vmstate_bytes=vmstate_size,
            vmstate_node=None if disk_only or state is None else state.node,
            nodes=tuple(names),
            files=tuple(n.file for n in targets),
            devices=devices,
            definition_sha256=definition_sha256(launch.machine_file),
            shape=shape_of_argv(launch.argv),
            save_seconds=round(seconds, 3),
        )
        try:
            add_snapshot(run, record)
        except RecordWriteError:
            # no record, no snapshot: a snapshot nobody lists would only take space
            with contextlib.suppress(QvmError):
                qmp.delete_job(session, tag, names)
            raise
    return SaveResult(run.name, record, added)


def _with_space_hint(error: ControlError, image: Path, ram: int) -> ControlError:
    """QEMU says "Input/output error" when the RAM state does not fit: say where."""
    if error.qemu_exited:
        return error
    try:
        free = os.statvfs(image.parent).f_bavail * os.statvfs(image.parent).f_frsize
    except OSError:
        return error
    if free >= ram:
        return error
    return ControlError(
        f"{error} (hint: {image.parent} has {human_size(free)} free, and the RAM state needs "
        f"up to {human_size(ram)}: free some space there)",
        qemu_class=error.qemu_class,
        qemu_desc=error.qemu_desc,
    )


def _save_stopped(run: RunDir, tag: str, machine: Machine) -> SaveResult:
    started = time.monotonic()
    files = stopped_disks(run, machine)
    for path in files:
        if tag in image_snapshots(path):
            raise VmStateError(
                f"{run.name}: {path} already holds a snapshot {tag!r} that qvm did not record "
                f"(hint: qemu-img snapshot -d {tag} {path}, or pick another tag)"
            )
    done: list[Path] = []
    try:
        for path in files:
            qemu_img_snapshot("-c", tag, path)
            done.append(path)
    except QvmError:
        for path in done:
            with contextlib.suppress(QvmError):
                qemu_img_snapshot("-d", tag, path)
        raise
    argv = build_argv(machine, LaunchInputs(accel="tcg", run_dir=run))
    # no RAM, no guest clock, no QEMU block nodes: the record's defaults say none
    record = SnapshotRecord(
        tag=tag,
        created=time.time(),
        disk_only=True,
        files=tuple(str(p) for p in files),
        devices=DeviceSet(cpu_slots=tuple(range(machine.cpu.count))),
        definition_sha256=definition_sha256(str(machine.path)),
        shape=_without_accel(shape_of_argv(argv)),
        save_seconds=round(time.monotonic() - started, 3),
    )
    try:
        add_snapshot(run, record)
    except RecordWriteError:
        for path in files:
            with contextlib.suppress(QvmError):
                qemu_img_snapshot("-d", tag, path)
        raise
    return SaveResult(run.name, record, False)


def _without_accel(shape: dict[str, Any]) -> dict[str, Any]:
    """A disk-only snapshot does not depend on the accelerator."""
    return {k: v for k, v in shape.items() if k != "machine"}


# --- list and rm ---------------------------------------------------------------------------


class ListedSnapshot(Record):
    record: SnapshotRecord
    missing: tuple[str, ...]  # images that should hold it and do not (or are gone)

    @property
    def state(self) -> str:
        return "ok" if not self.missing else "broken"

    def as_json(self) -> dict[str, Any]:
        return {**snapshot_json(self.record), "state": self.state, "missing": list(self.missing)}


def list_snapshots(run: RunDir) -> list[ListedSnapshot]:
    """Every recorded snapshot, each checked against the images that should hold it."""
    records = read_snapshots(run)
    tags_of: dict[str, tuple[str, ...] | None] = {}
    listed = []
    for record in records:
        missing = []
        for file in record.files:
            if file not in tags_of:
                try:
                    tags_of[file] = image_snapshots(Path(file)) if Path(file).exists() else None
                except QvmError:
                    tags_of[file] = None
            tags = tags_of[file]
            if tags is None or record.tag not in tags:
                missing.append(file)
        listed.append(ListedSnapshot(record, tuple(missing)))
    return listed


class RemoveResult(Record):
    name: str
    tag: str
    images: tuple[str, ...]
    frozen: str | None = None  # the frozen copy for clones ($STATE/NAME@TAG) removed with it
    kept: tuple[tuple[str, str], ...] = ()  # (file, why) left in the frozen copy's folder

    def as_json(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "tag": self.tag,
            "images": list(self.images),
            "frozen": self.frozen,
            "kept": [{"file": file, "why": why} for file, why in self.kept],
        }


def remove(run: RunDir, tag: str) -> RemoveResult:
    """Delete snapshot ``tag`` from every image that holds it, then its record, then its
    frozen copy for clones; a frozen copy clones use refuses it all, before anything is
    deleted. With the VM gone (`qvm rm`), its frozen copy alone."""
    check_tag(run.name, tag)
    record = find_snapshot(run, tag)
    frozen = check_unused(run, tag)
    if record is None and frozen is None:
        raise no_snapshot(run, tag)
    if record is not None:
        _remove_from_images(run, record, supervisor_alive(run))
        drop_snapshot(run, tag)
    images = record.files if record is not None else ()
    if frozen is None:
        return RemoveResult(run.name, tag, images)
    from qvm.ops.files import remove as remove_files  # noqa: PLC0415 -- not `snapshot list`

    removed = remove_files(frozen, purge=False)
    kept = tuple((str(path), why) for path, why in removed.kept)
    return RemoveResult(run.name, tag, images, str(frozen.path), kept)


def _remove_from_images(run: RunDir, record: SnapshotRecord, running: bool) -> None:
    tag = record.tag
    if running:
        from qvm.control import snapshot as qmp  # noqa: PLC0415 -- QMP: not for `snapshot list`
        from qvm.control.transaction import opened  # noqa: PLC0415 -- as above

        with opened(run) as (session, _launch):
            holding = [n.node for n in qmp.block_nodes(session) if tag in n.snapshots]
            if holding:
                qmp.delete_job(session, tag, holding)
    else:
        for file in record.files:
            path = Path(file)
            if path.exists() and tag in image_snapshots(path):
                qemu_img_snapshot("-d", tag, path)


# --- restore -------------------------------------------------------------------------------


class RestoreResult(Record):
    name: str
    tag: str
    how: str  # "loaded in place", "restarted", "disks reverted"
    replugged: int  # devices started on the command line beyond the definition's
    seconds: float
    devices: str  # the device set now, for people
    guest_clock: str | None  # what happened to the guest's clock
    definition_changed: bool  # the file changed since the save (not in a way that matters)
    pid: int | None = None
    # the VM's QEMU afterwards, as `qvm up` reports it; None when disks were reverted
    up: UpResult | None = None

    def as_json(self) -> dict[str, Any]:
        data = self._asdict()
        del data["up"]
        return data


def restore(run: RunDir, tag: str, machine: Machine) -> RestoreResult:
    """Bring the VM back to snapshot ``tag``: in place when it runs with the snapshot's
    device set and shape, else by starting QEMU with them and ``-loadvm``."""
    check_tag(run.name, tag)
    record = find_snapshot(run, tag)
    if record is None:
        raise no_snapshot(run, tag)
    started = time.monotonic()
    changed = definition_sha256(str(machine.path)) != record.definition_sha256
    running = supervisor_alive(run)
    if record.disk_only:
        return _revert_disks(run, record, running, started, changed)
    if running:
        result = _load_in_place(run, record, started, changed)
        if result is not None:
            return result
    return _restart(run, record, machine, running, started, changed)


def _revert_disks(
    run: RunDir, record: SnapshotRecord, running: bool, started: float, changed: bool
) -> RestoreResult:
    if running:
        raise VmStateError(
            f"{run.name}: snapshot {record.tag!r} holds disks only: it is restored on a "
            f"stopped VM (hint: qvm down {run.name}, then restore it)"
        )
    _check_images(run, record, [Path(f) for f in record.files])
    for file in record.files:
        qemu_img_snapshot("-a", record.tag, Path(file))
    return _restored(run, record, started, changed, "disks reverted", devices="-")


def _restored(
    run: RunDir,
    record: SnapshotRecord,
    started: float,
    changed: bool,
    how: str,
    devices: str,
    guest_clock: str | None = None,
    replugged: int = 0,
    up: UpResult | None = None,
    pid: int | None = None,
) -> RestoreResult:
    """The result of each way a restore goes, timed from ``started``."""
    seconds = round(time.monotonic() - started, 3)
    return RestoreResult(
        run.name, record.tag, how, replugged, seconds, devices, guest_clock, changed, pid, up
    )


def _check_images(run: RunDir, record: SnapshotRecord, files: list[Path]) -> None:
    for path in files:
        if not path.exists():
            raise VmStateError(
                f"{run.name}: snapshot {record.tag!r} cannot be restored: {path} is gone "
                f"(hint: qvm snapshot rm {run.name} {record.tag})"
            )
        if record.tag not in image_snapshots(path):
            raise VmStateError(
                f"{run.name}: snapshot {record.tag!r} cannot be restored: {path} does not "
                f"hold it (hint: qvm snapshot rm {run.name} {record.tag})"
            )


def _load_in_place(
    run: RunDir, record: SnapshotRecord, started: float, changed: bool
) -> RestoreResult | None:
    """``snapshot-load`` when the running QEMU has the snapshot's device set and shape;
    None when it does not (the caller restarts QEMU)."""
    from qvm.control import snapshot as qmp  # noqa: PLC0415 -- QMP: not for `snapshot list`
    from qvm.control.cpu_slots import topology_from_launch  # noqa: PLC0415 -- as above
    from qvm.control.transaction import opened  # noqa: PLC0415 -- as above

    with opened(run) as (session, launch):
        if shape_differences(record.shape, _shape_for(record, launch.argv)):
            return None
        devices = qmp.device_set(session, run, launch, topology_from_launch(launch))
        if device_set_differences(record.devices, devices):
            return None
        nodes = qmp.block_nodes(session)
        lacking = [
            n
            for n in record.nodes
            if not any(b.node == n and record.tag in b.snapshots for b in nodes)
        ]
        if lacking or record.vmstate_node is None:
            raise VmStateError(
                f"{run.name}: snapshot {record.tag!r} cannot be loaded: the disks "
                f"{', '.join(lacking) or '-'} do not hold it (hint: qvm snapshot list {run.name})"
            )
        qmp.load_job(session, record.tag, record.vmstate_node, list(record.nodes))
    clock = _fix_clock(run, record)
    up = _running(run, launch)
    return _restored(
        run, record, started, changed, "loaded in place", devices.summary(), clock, up=up
    )


def _running(run: RunDir, launch: LaunchRecord) -> UpResult:
    """The QEMU a restore in place left running, as `qvm up` reports one already running."""
    state = read_state(run.state_file)
    return UpResult(
        name=run.name,
        already_running=True,
        qemu_pid=state.qemu_pid if state else None,
        accel=launch.accel,
        accel_reason=launch.accel_reason,
        serial_log=run.serial_log,
        qmp_socket=run.qmp_socket,
        ready=True,
    )


def _shape_for(record: SnapshotRecord, argv: tuple[str, ...] | list[str]) -> dict[str, Any]:
    shape = shape_of_argv(argv, record.devices.plugged)
    return _without_accel(shape) if "machine" not in record.shape else shape


def _restart(
    run: RunDir,
    record: SnapshotRecord,
    machine: Machine,
    running: bool,
    started: float,
    changed: bool,
) -> RestoreResult:
    from qvm.ops.up import plan_launch, start_vm  # noqa: PLC0415 -- host checks: not `snapshot list`

    plan = plan_launch(machine, run, start_from(record))
    differences = shape_differences(record.shape, _shape_for(record, plan.argv))
    if differences:
        raise VmStateError(
            f"{run.name}: snapshot {record.tag!r} cannot be loaded: the definition changed: "
            f"{'; '.join(differences[:3])}"
            f"{f' (and {len(differences) - 3} more)' if len(differences) > 3 else ''} "
            f"(hint: undo the change in {machine.path}, or take a new snapshot)"
        )
    images = {Path(f) for f in record.files}
    if plan.inputs.state_disk:
        images.add(run.state_disk)
    images |= {run.path / overlay_name(i) for i, d in enumerate(machine.disks) if d.base}
    _check_images(run, record, sorted(images))
    if running:
        from qvm.ops.stop import kill  # noqa: PLC0415 -- not for `snapshot list`

        kill(run)
    up = start_vm(plan, wait=True)
    _record_devices(run, record)
    clock = _fix_clock(run, record)
    replugged = max(
        0,
        len(record.devices.memory)
        + len(record.devices.plugged)
        + max(0, len(record.devices.cpu_slots) - 1)
        - max(0, machine.cpu.count - 1),
    )
    devices = record.devices.summary()
    return _restored(
        run, record, started, changed, "restarted", devices, clock, replugged, up, up.qemu_pid
    )


def _fix_clock(run: RunDir, record: SnapshotRecord) -> str:
    """The guest's clock stood still since the save: set it to the host's, when an agent
    answered at save time (and so runs in the restored guest)."""
    if record.guest_time_ns is None:
        return "not set: no guest agent answered at save time"
    from qvm.control import snapshot as qmp  # noqa: PLC0415 -- QMP: not for `snapshot list`

    return qmp.set_guest_time(run)


def _record_devices(run: RunDir, record: SnapshotRecord) -> None:
    """The memory devices, disks and NICs started on the command line, as if qvm had
    hotplugged them, so that `mem list`, `disk detach`, `nic del` know them."""
    if record.devices.memory or record.devices.plugged:
        from qvm.control.kinds import restored_records  # noqa: PLC0415 -- QMP: not for `snapshot list`
        from qvm.store.devices import save_devices  # noqa: PLC0415 -- as above

        save_devices(run, restored_records(record.devices, time.time()))
