"""What TAB offers for a VM name, a device id or a `cp` end (``NAME:``, local files),
read from machine files and run-dir records; only the vCPUs `cpu del` can take are asked
of QEMU (through the supervisor, within a second), since no record keeps them.
Completion never starts QEMU and never fails (a broken record offers nothing rather than
a traceback in the user's prompt).

The shell side (scripts, Click's completion protocol) is ``qvm.cli.parsing.completion``.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterable
from typing import TYPE_CHECKING, TypeVar

from qvm.cli import resolve
from qvm.layout.kinds import (
    BOOT_IDS_DRIVES,
    BOOT_IDS_NICS,
    BOOT_IDS_NONE,
    BOOT_IDS_QEMU,
    BOOT_IDS_SHARES,
    Kind,
    group_kinds,
    kind_named,
)

if TYPE_CHECKING:
    from qvm.layout.rundir import RunDir
    from qvm.store.devices import DeviceRecord
    from qvm.store.launch import LaunchRecord

_T = TypeVar("_T")

# `-device DRIVER,drive=NODE,...,id=ID`: a disk of the machine file (or the cloud-init seed)
# compiled on a TAB press only: the Typer CLI imports this module for every help
_DISK_DEVICE = r"(?:^|,)drive=[^,]+(?:,|$)"
_DEVICE_ID = r"(?:^|,)id=([^,]+)"


def vm_names() -> list[str]:
    """Every machine file lookup finds and every VM with a run dir, sorted."""
    from qvm.definition.discovery import list_machine_files
    from qvm.layout.rundir import list_run_dirs

    names = {path.stem for path in _quietly(lambda: list_machine_files(resolve.search_dirs()))}
    names.update(run.name for run in _quietly(lambda: list_run_dirs(resolve.state_root())))
    return sorted(names)


def target_words() -> list[str]:
    """What a command about several VMs takes (``qvm.cli.targets``): the VM names, then
    ``@GROUP`` for each group a machine file names."""
    from qvm.definition.groups import group_names

    groups = _quietly(lambda: group_names(resolve.search_dirs()))
    return vm_names() + [f"@{group}" for group in groups]


def device_ids(key: str, vm: str | None) -> list[str]:
    """The ids ``qvm KIND del`` (``disk detach``, ``port del``) takes for ``vm``: ``key`` is
    a command group (``mem``: every kind of it), one kind's name (``virtio-mem``, for
    ``mem resize``) or ``port``; the kinds are ``qvm.layout.kinds``'."""
    if not vm:
        return []
    if key == "port":
        return _quietly(lambda: _forwards(resolve.run_dir_of(vm)))
    kinds = device_kinds(key)
    if not kinds:
        return []
    return _quietly(lambda: _kind_ids(resolve.run_dir_of(vm), kinds))


def device_kinds(key: str) -> tuple[Kind, ...]:
    """The kinds a completion key stands for: a group's, or the one kind of that name."""
    named = kind_named(key)
    return group_kinds(key) or ((named,) if named is not None else ())


def _kind_ids(run: RunDir, kinds: tuple[Kind, ...]) -> list[str]:
    """Each kind's boot devices (``boot_ids``), then those qvm hotplugged (its records)."""
    ids = [ident for kind in kinds for ident in BOOT_IDS[kind.boot_ids](run)]
    recorded = {kind.name for kind in kinds if kind.recorded}
    if recorded:
        ids += [d.id for d in _hotplugged(run) if d.kind in recorded]
    return list(dict.fromkeys(ids))


def snapshot_tags(vms: list[str]) -> list[str]:
    """The tags of the snapshots ``snapshots.json`` records for each of ``vms``, in order."""
    from qvm.store.snapshots import read_snapshots

    def tags_of(vm: str) -> Callable[[], list[str]]:
        return lambda: [s.tag for s in read_snapshots(resolve.run_dir_of(vm))]

    tags: list[str] = []
    for vm in vms:
        tags += _quietly(tags_of(vm))
    return list(dict.fromkeys(tags))


def copy_ends(incomplete: str) -> list[str]:
    """What `qvm cp`'s SOURCE and TARGET take: ``NAME:`` for each VM (the guest's side),
    then the local files and folders (a folder with its "/"), as bash's own file completion
    would offer them: an answer replaces it. Nothing for a guest path (after ``NAME:``):
    the guest's files are not asked on a TAB press."""
    if ":" in incomplete:
        return []
    vms = [] if "/" in incomplete else [f"{name}:" for name in vm_names()]
    return vms + sorted(_quietly(lambda: _local_paths(incomplete)))


def _local_paths(incomplete: str) -> list[str]:
    import os

    head = incomplete[: incomplete.rfind("/") + 1]  # as typed, "~/" kept
    prefix = incomplete[len(head) :]
    found = []
    with os.scandir(os.path.expanduser(head) if head else ".") as entries:
        for entry in entries:
            if entry.name.startswith(prefix) and (prefix or not entry.name.startswith(".")):
                found.append(head + entry.name + ("/" if entry.is_dir() else ""))
    return found


def _cpu_ids(run: RunDir) -> list[str]:
    """The vCPUs present now with an id (`cpu del` takes those): only QEMU knows them, so
    they are asked of it (``query-hotpluggable-cpus``, one second at most). A VM that does
    not answer in time gets every id a vCPU slot can have (cpuN)."""
    from qvm.supervisor.client import supervisor_alive

    if not supervisor_alive(run):
        return []
    try:
        from qvm.control.session import ControlSession
        from qvm.supervisor.qmp_replies import hotpluggable_cpus

        with ControlSession(run, timeout=1.0, lock_timeout=1.0) as session:
            slots = hotpluggable_cpus(session.execute("query-hotpluggable-cpus"))
        prefix = "/machine/peripheral/"
        return sorted(
            path.removeprefix(prefix)
            for slot in slots
            if (path := slot.qom_path or "").startswith(prefix)
        )
    except Exception:  # noqa: BLE001 - not answering: the ids a slot can have
        launch = _launch(run)
        if launch is None or launch.vcpus_max is None:
            return []
        return [f"cpu{index}" for index in range(1, launch.vcpus_max)]


def _boot_disk_ids(run: RunDir) -> list[str]:
    launch = _launch(run)
    if launch is None:
        return []
    args = launch.argv
    booted = [
        ident
        for flag, value in zip(args, args[1:], strict=False)
        if flag == "-device" and re.search(_DISK_DEVICE, value)
        for ident in re.findall(_DEVICE_ID, value)
    ]
    from qvm.definition.schema import SEED_DEVICE_ID

    return [ident for ident in booted if ident != SEED_DEVICE_ID]  # cloud-init's, not a disk


def _boot_nic_ids(run: RunDir) -> list[str]:
    launch = _launch(run)
    return list(launch.nics) if launch is not None else []


def _no_boot_ids(run: RunDir) -> list[str]:
    return []


def _share_paths(run: RunDir) -> list[str]:
    """The guest paths of the shares qvm added (``share del`` takes one): boot shares
    are not removed at run time."""
    from qvm.store.shares import read_shares

    return [share.guest for share in read_shares(run.shares_file) if share.origin == "qvm"]


def _forwards(run: RunDir) -> list[str]:
    """Each forward as ``port list`` prints it and ``port del`` takes it."""
    from qvm.control.forwards import forward_text
    from qvm.store.forwards import read_forwards

    return [forward_text(forward) for forward in read_forwards(run)]


def _launch(run: RunDir) -> LaunchRecord | None:
    from qvm.store.launch import read_launch

    return read_launch(run.launch_file)


def _hotplugged(run: RunDir) -> tuple[DeviceRecord, ...]:
    from qvm.store.devices import device_records

    return device_records(run)


# where each kind's boot devices are found (qvm.layout.kinds.Kind.boot_ids)
BOOT_IDS: dict[str, Callable[[RunDir], list[str]]] = {
    BOOT_IDS_QEMU: _cpu_ids,
    BOOT_IDS_DRIVES: _boot_disk_ids,
    BOOT_IDS_NICS: _boot_nic_ids,
    BOOT_IDS_NONE: _no_boot_ids,
    BOOT_IDS_SHARES: _share_paths,
}


def _quietly(read: Callable[[], Iterable[_T]]) -> list[_T]:
    try:
        return list(read())
    except Exception:  # noqa: BLE001 - a TAB press must never print a traceback
        return []
