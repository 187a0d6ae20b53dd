"""``forwards.json``: the forwards of the current QEMU run after a change at run time,
stamped with that run, so a restarted QEMU (which has only its argv's forwards) is never
described by a stale list.
"""

from __future__ import annotations

from typing import Any

from qvm.base.jsonfile import read_json, write_json_atomic
from qvm.layout.rundir import RunDir
from qvm.store.devices import qemu_run, same_run


def current_forwards(run: RunDir) -> list[dict[str, Any]]:
    """The forwards of the VM's current (or last) QEMU run."""
    launch = read_json(run.launch_file) or {}
    record = read_json(run.forwards_file)
    if record is not None and same_run(record, qemu_run(run)):
        return list(record.get("forwards") or [])
    return list(launch.get("forwards") or [])


def save(run: RunDir, forwards: list[dict[str, Any]]) -> None:
    write_json_atomic(run.forwards_file, {**qemu_run(run), "forwards": forwards})


def record_forwards(run: RunDir, entries: list[dict[str, Any]]) -> None:
    """Forwards QEMU has now besides the current ones (a NIC hotplugged with them)."""
    save(run, [*current_forwards(run), *entries])


def forget_forwards(run: RunDir, nic: str) -> None:
    """The NIC ``nic`` is gone, and its netdev with its forwards."""
    forwards = current_forwards(run)
    kept = [f for f in forwards if f.get("nic") != nic]
    if kept != forwards:
        save(run, kept)
