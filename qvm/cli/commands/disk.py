"""Disk hotplug commands: disk list, attach, detach."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from qvm.cli import resolve
from qvm.cli.device_options import (
    AS_JSON,
    FORCE,
    UNPLUG_TIMEOUT,
    machine_file,
    persisted_json,
    size_argument,
    unplug_problems,
)
from qvm.cli.output import abort, emit_json, human_bytes, ms, say, table, warn
from qvm.cli.parsing.declare import Argument, Commands, Option

commands = Commands(help="List, attach and detach disks of a running VM.")


@commands.command("list")
def list_cmd(
    name: str = Argument(..., help="Machine name."),
    as_json: bool = AS_JSON,
) -> None:
    """Every disk (boot, attached by qvm, other), free PCI places, and what the guest sees."""
    from qvm.control.disk import list_disks

    disks = list_disks(resolve.run_dir_of(name))
    if as_json:
        emit_json(disks.as_json())
        return
    rows = [
        [
            d.id,
            d.origin,
            d.file,
            d.format,
            human_bytes(d.size),
            "ro" if d.readonly else "rw",
            d.bus,
            d.state,
        ]
        for d in disks.disks
    ]
    say(table(["ID", "ORIGIN", "FILE", "FORMAT", "SIZE", "MODE", "BUS", "STATE"], rows))
    say(f"{name}: {disks.places.summary()}")
    if disks.guest_blk is not None:
        seen = ", ".join(disks.guest_blk) or "none"
        say(f"{name}: the guest reports block devices: {seen} (its own QVM-STATE line)")


@commands.command("attach")
def attach(
    name: str = Argument(..., help="Machine name."),
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
    force: bool = FORCE,
    persist: bool = Option(
        False,
        "--persist",
        help="After the attach succeeded, add a [[disk]] for it to the machine's TOML "
        "(comments and formatting kept), so it is there at the next boot.",
    ),
    as_json: bool = AS_JSON,
) -> None:
    """Hotplug an image as a virtio-blk-pci disk (blockdev-add + device_add; undone if a
    step fails). An image another VM or process holds is refused, naming it."""
    from qvm.control.disk import attach_disk

    if fmt is not None and fmt not in ("qcow2", "raw"):
        abort(f'{name}: --format must be "qcow2" or "raw", got {fmt!r}')
    size = size_argument(name, "--new", new) if new is not None else None
    run = resolve.run_dir_of(name)
    result = attach_disk(run, file, size, fmt, readonly, dev_id, force)
    persisted = _persist_attach(run, result, dev_id is not None) if persist else None
    if as_json:
        emit_json({**result.as_json(), "persisted": persisted})
        return
    disk = result.disk
    if result.created is not None:
        say(f"{name}: created {result.created} (qcow2, {human_bytes(size)})")
    where = f" on {disk.bus}" if disk.bus else ""
    mode = "read-only" if disk.readonly else "read-write"
    say(f"{name}: attached {disk.id} ({disk.file}, {disk.format}, {mode}){where}")
    if result.forced_after_unplug:
        warn(f"qvm: {name}: attached after a vCPU unplug under TCG (--force)")
    say(f"{name}: {result.places.summary()}")
    if persisted:
        say(f"{name}: added a [[disk]] for {disk.id} to {persisted['file']}")


def _persist_attach(run: Any, result: Any, with_id: bool) -> dict[str, Any]:
    from qvm.control.disk import disk_entry
    from qvm.definition.persist import persist_entry

    path = machine_file(run)
    done = persist_entry(path, "disk", disk_entry(result.disk, path, with_id))
    return persisted_json(done)


@commands.command("detach")
def detach(
    name: str = Argument(..., help="Machine name."),
    dev_id: str = Argument(..., metavar="ID", help="The disk's id (see qvm disk list)."),
    timeout: float = UNPLUG_TIMEOUT,
    persist: bool = Option(
        False,
        "--persist",
        help="After the detach succeeded, remove its [[disk]] from the machine's TOML too.",
    ),
    as_json: bool = AS_JSON,
) -> None:
    """Unplug a disk qvm attached (device_del, wait for DEVICE_DELETED, blockdev-del). The
    image file is kept, also one made by --new. Pending: exit status 3."""
    timeout = resolve.timeout_seconds(timeout)
    from qvm.control.disk import detach_disk

    run = resolve.run_dir_of(name)
    result = detach_disk(run, dev_id, timeout=timeout)
    unplug = result.unplug
    persisted = None
    if persist and unplug.outcome == "removed":
        persisted = _persist_detach(run, result.device)
    if as_json:
        emit_json({**result.as_json(), "persisted": persisted})
    elif unplug.outcome == "removed":
        kept = f"; the image stays at {result.device.file}" if result.device.file else ""
        say(f"{name}: detached {dev_id} in {ms(unplug.seconds)}{kept}")
        if persisted is not None:
            if persisted["action"] == "removed":
                say(f"{name}: removed its [[disk]] from {persisted['file']}")
            else:
                say(f"{name}: {persisted['file']} has no [[disk]] for it: nothing to remove")
    if persist and persisted is None:
        warn(f"qvm: {name}: --persist: not written, the live change did not complete")
    unplug_problems(name, unplug, "disk")


def _persist_detach(run: Any, disk: Any) -> dict[str, Any]:
    from qvm.control.disk import disk_entry_matches
    from qvm.definition.persist import unpersist_entry

    path = machine_file(run)
    done = unpersist_entry(path, "disk", lambda entry: disk_entry_matches(entry, disk, path))
    return persisted_json(done)
