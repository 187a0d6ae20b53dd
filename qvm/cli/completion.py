"""What TAB offers for a VM name or a device id, read from machine files and run-dir
records; only the vCPUs `cpu del` can take are asked of QEMU (through the supervisor,
within a second), since no record keeps them. Completion never starts QEMU and never
fails (a broken record offers nothing rather than a traceback in the user's prompt).

The shell side (scripts, Click's completion protocol) is ``qvm.cli.parsing.completion``.
"""

from __future__ import annotations

import re
from collections.abc import Callable

from qvm.cli import resolve

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


def device_ids(kind: str, vm: str | None) -> list[str]:
    """The ids ``qvm KIND del`` (``disk detach``, ``port del``) takes for ``vm``."""
    reader = DEVICE_READERS.get(kind)
    if reader is None or not vm:
        return []
    return _quietly(lambda: reader(resolve.run_dir_of(vm)))


def snapshot_tags(vms: list[str]) -> list[str]:
    """The tags of the snapshots ``snapshots.json`` records for each of ``vms``, in order."""
    from qvm.store.snapshots import read_snapshots

    tags: list[str] = []
    for vm in vms:
        tags += _quietly(lambda vm=vm: [s.tag for s in read_snapshots(resolve.run_dir_of(vm))])
    return list(dict.fromkeys(tags))


def _cpu_ids(run) -> list[str]:  # noqa: ANN001 - qvm.layout.rundir.RunDir, imported lazily
    """The vCPUs present now with an id (`cpu del` takes those): only QEMU knows them, so
    they are asked of it (``query-hotpluggable-cpus``, one second at most). A VM that does
    not answer in time gets every id a vCPU slot can have (cpuN)."""
    from qvm.supervisor.client import supervisor_alive

    if not supervisor_alive(run):
        return []
    try:
        from qvm.control.session import ControlSession

        with ControlSession(run, timeout=1.0, lock_timeout=1.0) as session:
            slots = session.execute("query-hotpluggable-cpus")
        prefix = "/machine/peripheral/"
        return sorted(
            path.removeprefix(prefix)
            for slot in slots
            if (path := slot.get("qom-path") or "").startswith(prefix)
        )
    except Exception:  # noqa: BLE001 - not answering: the ids a slot can have
        launch = _launch(run)
        if launch is None or launch.vcpus_max is None:
            return []
        return [f"cpu{index}" for index in range(1, launch.vcpus_max)]


def _memory_ids(run) -> list[str]:  # noqa: ANN001
    return [d.id for d in _hotplugged(run) if d.kind in ("dimm", "virtio-mem")]


def _virtio_mem_ids(run) -> list[str]:  # noqa: ANN001
    return [d.id for d in _hotplugged(run) if d.kind == "virtio-mem"]


def _disk_ids(run) -> list[str]:  # noqa: ANN001
    launch = _launch(run)
    booted = []
    if launch is not None:
        args = launch.argv
        booted = [
            ident
            for flag, value in zip(args, args[1:], strict=False)
            if flag == "-device" and re.search(_DISK_DEVICE, value)
            for ident in re.findall(_DEVICE_ID, value)
        ]
    from qvm.definition.schema import SEED_DEVICE_ID

    booted = [ident for ident in booted if ident != SEED_DEVICE_ID]  # cloud-init's, not a disk
    return list(dict.fromkeys([*booted, *(d.id for d in _hotplugged(run) if d.kind == "disk")]))


def _nic_ids(run) -> list[str]:  # noqa: ANN001
    launch = _launch(run)
    booted = list(launch.nics) if launch is not None else []
    return list(dict.fromkeys([*booted, *(d.id for d in _hotplugged(run) if d.kind == "nic")]))


def _forwards(run) -> list[str]:  # noqa: ANN001
    """Each forward as ``port list`` prints it and ``port del`` takes it."""
    from qvm.control.forwards import forward_text
    from qvm.store.forwards import read_forwards

    return [forward_text(forward) for forward in read_forwards(run)]


def _launch(run):  # noqa: ANN001, ANN202 - LaunchRecord | None
    from qvm.store.launch import read_launch

    return read_launch(run.launch_file)


def _hotplugged(run):  # noqa: ANN001, ANN202 - tuple[DeviceRecord, ...]
    from qvm.store.devices import device_records

    return device_records(run)


def _argv_device_ids(argv: tuple[str, ...]) -> list[str]:
    return [
        ident
        for flag, value in zip(argv, argv[1:], strict=False)
        if flag == "-device"
        for ident in re.findall(_DEVICE_ID, value)
    ]


DEVICE_READERS: dict[str, Callable[..., list[str]]] = {
    "cpu": _cpu_ids,
    "mem": _memory_ids,
    "virtio-mem": _virtio_mem_ids,
    "disk": _disk_ids,
    "nic": _nic_ids,
    "port": _forwards,
}


def _quietly(read: Callable[[], list]) -> list:  # type: ignore[type-arg]
    try:
        return list(read())
    except Exception:  # noqa: BLE001 - a TAB press must never print a traceback
        return []
