"""Snapshots: qvm snapshot save/list/rm/restore."""

from __future__ import annotations

import sys
from typing import TYPE_CHECKING

from qvm.cli import resolve
from qvm.cli.output import emit_json, human_bytes, say, say_kept, table
from qvm.cli.parsing.declare import (
    ALL_RUNNING,
    AS_JSON,
    JOBS,
    MACHINE,
    SNAPSHOT_TAG,
    TARGETS,
    Argument,
    Commands,
    Option,
)

if TYPE_CHECKING:
    from collections.abc import Callable

    from qvm.ops.snapshot import RestoreResult, SaveResult

commands = Commands(help="Save a VM with its memory, list, remove and restore snapshots.")


@commands.command("save")
def save(
    names: list[str] | None = TARGETS,
    tag: str = Argument(..., help="The snapshot's name, e.g. booted."),
    disk_only: bool = Option(
        False, "--disk-only", help="Disks only, no memory (the way on a stopped VM)."
    ),
    as_json: bool = AS_JSON,
    every: bool = ALL_RUNNING,
    jobs: int | None = JOBS,
) -> None:
    """Save the VMs' disks, and on a running VM its memory and device state; the VM
    keeps running. A raw disk, a disk used as is (file =) or a read-only one is refused.
    Several VMs (`qvm snapshot save vm1 vm2 TAG`, @GROUP, --all) are saved at once.

    JSON: schemas/snapshot-save.json
    """
    import time

    from qvm.cli.several import Several

    several = Several(names, every, jobs, single_object=True)
    shown = [0.0]

    def progress(done: int, total: int) -> None:
        if sys.stderr.isatty() and total and time.monotonic() - shown[0] > 0.2:
            shown[0] = time.monotonic()
            sys.stderr.write(f"\r\033[Ksaving {tag}: {done * 100 // total}%")

    one = progress if len(several.specs) == 1 else None  # else the spinner says it

    def save_one(name: str) -> SaveResult:
        return _save(name, tag, disk_only, one)

    for spec, result in several.run(save_one, f"saving {tag}"):
        if shown[0]:
            sys.stderr.write("\r\033[K")
        if as_json:
            several.record(spec, result.as_json())
            continue
        record = result.record
        what = "disks only" if record.disk_only else f"memory {human_bytes(record.vmstate_bytes)}"
        say(f"{result.name}: saved snapshot {tag} ({what}) in {record.save_seconds or 0:.2f} s")
        say(f"  devices     {record.devices.summary()}")
        if record.ram_bytes:
            say(f"  ram         {human_bytes(record.ram_bytes)}")
        say(f"  images      {' '.join(record.files)}")
        if result.state_disk_added:
            say("  state disk  added to the running VM (the VM has no writable qcow2 disk)")
        if not record.disk_only and record.guest_time_ns is None:
            say("  guest clock not recorded (no guest agent answered)")
    several.finish(as_json)


def _save(
    name: str, tag: str, disk_only: bool, progress: Callable[[int, int], None] | None
) -> SaveResult:
    from qvm.ops.snapshot import save as save_snapshot
    from qvm.supervisor.client import supervisor_alive

    run = resolve.run_dir_of(name)
    machine = None if supervisor_alive(run) else resolve.load(name)
    return save_snapshot(run, tag, disk_only=disk_only, machine=machine, progress=progress)


@commands.command("list")
def list_cmd(name: str = MACHINE, as_json: bool = AS_JSON) -> None:
    """The VM's snapshots (running or stopped), each checked against its images.

    JSON: schemas/snapshot-list.json
    """
    import datetime

    from qvm.ops.snapshot import list_snapshots

    listed = list_snapshots(resolve.run_dir_of(name))
    if as_json:
        emit_json([entry.as_json() for entry in listed])
        return
    rows = []
    for entry in listed:
        record = entry.record
        when = datetime.datetime.fromtimestamp(record.created).strftime("%Y-%m-%d %H:%M:%S")
        rows.append(
            [
                record.tag,
                when,
                "disks" if record.disk_only else human_bytes(record.vmstate_bytes),
                human_bytes(record.ram_bytes),
                record.devices.summary(),
                entry.state,
            ]
        )
    say(table(["TAG", "SAVED", "MEMORY", "RAM", "DEVICES", "STATE"], rows))


@commands.command("rm")
def remove(
    name: str = MACHINE,
    tag: str = SNAPSHOT_TAG,
    as_json: bool = AS_JSON,
) -> None:
    """Delete a snapshot from the VM's images and forget it, and its frozen copy for
    clones ($STATE/NAME@TAG) when no clone uses it (refused, naming them, otherwise).

    JSON: schemas/snapshot-rm.json
    """
    from qvm.ops.snapshot import remove as remove_snapshot

    result = remove_snapshot(resolve.run_dir_of(name), tag)
    if as_json:
        emit_json(result.as_json())
        return
    if result.images:
        say(f"{result.name}: removed snapshot {tag}")
    if result.frozen is not None:
        say(f"{result.name}: removed its frozen copy for clones, {result.frozen}")
    say_kept(result.name, result.kept)


@commands.command("restore")
def restore(
    name: str = MACHINE,
    tag: str = SNAPSHOT_TAG,
    as_json: bool = AS_JSON,
) -> None:
    """Bring the VM back to a snapshot: loaded in place when it runs with the snapshot's
    device set, else QEMU restarted with that device set (-loadvm).

    JSON: schemas/snapshot-restore.json
    """
    from qvm.ops.snapshot import restore as restore_snapshot

    machine = resolve.load(name)
    result = restore_snapshot(resolve.run_dir(machine.name), tag, machine)
    if as_json:
        emit_json(result.as_json())
        return
    say_restored(result)


def say_restored(result: RestoreResult) -> None:
    how = result.how
    if how == "restarted":
        how = f"restarted QEMU (pid {result.pid}) with {result.replugged} device(s) re-plugged"
    say(f"{result.name}: restored snapshot {result.tag}: {how}, in {result.seconds:.2f} s")
    say(f"  devices     {result.devices}")
    if result.guest_clock is not None:
        say(f"  guest clock {result.guest_clock}")
    if result.definition_changed:
        say("  definition  changed since the save, not in a way the snapshot depends on")


def new_clone(name: str, source: str, as_json: bool) -> None:
    """`qvm new CLONE --from VM@TAG`."""
    from qvm.ops.clone import clone, parse_source

    template_name, tag = parse_source(source)
    template = resolve.load(template_name)
    run = resolve.run_dir(name)
    path = resolve.new_machines_dir() / f"{name}.toml"
    result = clone(resolve.run_dir(template.name), template, tag, name, path, run)
    start = f"qvm up {name}"
    if as_json:
        emit_json({"name": name, "file": result.machine_file, "start": start, "login": None})
        return
    say(f"{name}: wrote {result.machine_file}, a clone of {template.name}@{tag}")
    if result.froze_seconds is not None:
        say(f"  froze {template.name}@{tag} in {result.froze_seconds:.2f} s: {result.memory}")
    say(f"  start it:   {start} (resumes from the memory image)")
