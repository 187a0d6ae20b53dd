"""``forwards.json``: the forwards of the current QEMU run after a change at run time,
stamped with that run, so a restarted QEMU (which has only its argv's forwards) is never
described by a stale list. Each forward is a ``qvm.store.launch.Forward``.

The supervisor writes it too, at each QEMU start with forwards whose host port is 0: with
the ports QEMU bound for them (``qvm.host.usernet``), which launch.json cannot know.
"""

from __future__ import annotations

from collections.abc import Iterable

from qvm.base.jsonfile import write_json_atomic
from qvm.layout.rundir import RunDir
from qvm.layout.runfiles import FORWARDS_FILE, LAUNCH_FILE
from qvm.store.launch import Forward, LaunchRecord
from qvm.store.stamped import qemu_run, read_fields, same_run
from qvm.store.state import QemuRun, StateRecord


def read_forwards(
    run: RunDir, state: StateRecord | None = None, launch: LaunchRecord | None = None
) -> tuple[Forward, ...]:
    """The forwards of the VM's current (or last) QEMU run; ``state`` and ``launch``:
    its records as the caller has just read them (`list` reads each file once a VM)."""
    record = read_fields(run.file(FORWARDS_FILE), "qvm restart rewrites it")
    if record is not None and same_run(
        record, qemu_run(run) if state is None else QemuRun.of_state(state)
    ):
        return record.records("forwards", Forward.read, ())
    if launch is not None:
        return launch.forwards
    # only the forwards of launch.json: the rest of it is not this module's business
    launched = read_fields(run.file(LAUNCH_FILE))
    return launched.records("forwards", Forward.read, ()) if launched is not None else ()


def save(run: RunDir, forwards: Iterable[Forward], stamp: QemuRun | None = None) -> None:
    """Write the forwards of the QEMU run ``stamp`` (by default the run ``state.json``
    names)."""
    stamp = qemu_run(run) if stamp is None else stamp
    write_json_atomic(
        run.forwards_file, {**stamp.stamp(), "forwards": [f.to_json() for f in forwards]}
    )


def record_forwards(run: RunDir, entries: Iterable[Forward]) -> None:
    """Forwards QEMU has now besides the current ones (a NIC hotplugged with them)."""
    save(run, [*read_forwards(run), *entries])


def forget_forwards(run: RunDir, nic: str) -> None:
    """The NIC ``nic`` is gone, and its netdev with its forwards."""
    forwards = read_forwards(run)
    kept = [f for f in forwards if f.nic != nic]
    if len(kept) != len(forwards):
        save(run, kept)
