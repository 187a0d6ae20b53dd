"""Disk hotplug commands: disk list, attach, detach."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

from qvm.cli import device_options, resolve
from qvm.cli.output import abort, emit_json, human_bytes, ms, say
from qvm.cli.parsing import declare
from qvm.cli.parsing.declare import AS_JSON, MACHINE, Argument, Commands, Option, persist_option
from qvm.errors import EXIT_USAGE
from qvm.layout.rundir import RunDir

if TYPE_CHECKING:
    from qvm.control.disk import DiskAttach, DiskInfo
    from qvm.control.transaction import Removal

commands = Commands(help="List, attach and detach disks of a running VM.")


@commands.command("list")
def list_cmd(name: str = MACHINE, as_json: bool = AS_JSON) -> None:
    """Every disk (boot, attached by qvm, other), free PCI places, and what the guest sees.

    JSON: schemas/disk-list.json
    """
    from qvm.control.disk import list_disks

    device_options.show_listing(
        name,
        list_disks(resolve.run_dir_of(name)),
        as_json,
        ["ID", "ORIGIN", "FILE", "FORMAT", "SIZE", "MODE", "BUS", "STATE"],
        _disk_row,
        "block devices",
    )


def _disk_row(d: DiskInfo) -> list[Any]:
    mode = "ro" if d.readonly else "rw"
    return [d.id, d.origin, d.file, d.format, human_bytes(d.size), mode, d.bus, d.state]


@commands.command("attach")
def attach(
    name: str = MACHINE,
    file: Path | None = Argument(None, help="Image to attach (used as is, never deleted)."),
    new: str | None = Option(
        None,
        "--new",
        metavar="SIZE",
        help="Make an empty qcow2 of SIZE in the VM's run dir (RUNDIR/hotplug-<id>.qcow2) and "
        "attach it; it stays there after detach.",
    ),
    fmt: str | None = Option(
        None, "--format", help='"qcow2" or "raw" (default: read from the image\'s header).'
    ),
    readonly: bool = Option(False, "--readonly", help="Attach it read-only."),
    dev_id: str | None = Option(None, "--id", help="Device id (default: diskN)."),
    force: bool = declare.FORCE,
    persist: bool = persist_option(
        "add a [[disk]] for it to the machine's TOML, so it is there at the next boot"
    ),
    as_json: bool = AS_JSON,
) -> None:
    """Hotplug an image as a virtio-blk-pci disk (blockdev-add + device_add; undone if a
    step fails). An image another VM or process holds is refused, naming it.

    JSON: schemas/disk-attach.json
    """
    from qvm.cli.progress import run_waiting
    from qvm.control.disk import attach_disk

    if fmt is not None and fmt not in ("qcow2", "raw"):
        abort(f'{name}: --format must be "qcow2" or "raw", got {fmt!r}', EXIT_USAGE)
    size = device_options.size_argument(name, "--new", new) if new is not None else None
    run = resolve.run_dir_of(name)
    result = run_waiting(
        f"{name}: attaching the disk", attach_disk, run, file, size, fmt, readonly, dev_id, force
    )
    persisted = _persist_attach(run, result, True) if persist else None  # disk1 stays disk1
    if as_json:
        emit_json({**result.as_json(), "persisted": persisted})
        return
    disk = result.disk
    if result.created is not None:
        say(f"{name}: created {result.created} (qcow2, {human_bytes(size)})")
    where = f" on {disk.bus}" if disk.bus else ""
    mode = "read-only" if disk.readonly else "read-write"
    say(f"{name}: attached {disk.id} ({disk.file}, {disk.format}, {mode}){where}")
    device_options.say_plugged(name, result, "attached", disk.id, persisted)


def _persist_attach(run: RunDir, result: DiskAttach, with_id: bool) -> dict[str, Any]:
    from qvm.control.disk import disk_entry
    from qvm.definition.persist import persist_entry

    path = device_options.machine_file(run)
    done = persist_entry(path, "disk", disk_entry(result.disk, path, with_id))
    return device_options.persisted_json(run, done)


@commands.command("detach")
def detach(
    name: str = MACHINE,
    dev_id: str = Argument(..., metavar="ID", help="The disk's id (see qvm disk list)."),
    timeout: float = declare.UNPLUG_TIMEOUT,
    persist: bool = persist_option("remove its [[disk]] from the machine's TOML"),
    as_json: bool = AS_JSON,
) -> None:
    """Unplug a disk qvm attached (device_del, wait for DEVICE_DELETED, blockdev-del). The
    image file is kept, also one made by --new. Pending: exit status 3.

    JSON: schemas/disk-detach.json
    """
    from qvm.control.disk import detach_disk

    unpersist = _persist_detach if persist else None
    device_options.remove_device(
        name, dev_id, timeout, detach_disk, unpersist, as_json, "disk", _detached_text
    )


def _detached_text(result: Removal[DiskInfo]) -> str:
    kept = f"; the image stays at {result.device.file}" if result.device.file else ""
    return f"detached {result.unplug.id} in {ms(result.unplug.seconds)}{kept}"


def _persist_detach(run: RunDir, disk: DiskInfo) -> dict[str, Any]:
    from qvm.control.disk import disk_entry_matches
    from qvm.definition.persist import unpersist_entry

    path = device_options.machine_file(run)
    done = unpersist_entry(path, "disk", lambda entry: disk_entry_matches(entry, disk, path))
    return device_options.persisted_json(run, done)
