"""A clone's first start (``qvm.ops.clone``): QEMU with the snapshot's device set and
``-incoming`` of the template's memory image, then the guest resumed and given the
clone's own MACs and the host's time. ``qvm.ops.up`` asks here when it plans and starts
any VM, so this module sits below the clone use case, which freezes snapshots by starting
a helper QEMU.
"""

from __future__ import annotations

import shlex
import time
from pathlib import Path

from qvm.cmdline.argv import StartFrom
from qvm.control.kinds import device_set_start
from qvm.control.session import ControlSession
from qvm.control.snapshot import set_guest_macs, set_guest_time
from qvm.definition.naming import nic_id, stable_mac
from qvm.definition.schema import Machine
from qvm.errors import ControlError
from qvm.layout.rundir import RunDir
from qvm.ops.netguest import set_links
from qvm.store.snapshots import read_clone, write_clone
from qvm.supervisor.qmp_replies import runstate

MIGRATE_TIMEOUT = 600.0


def clone_start(run: RunDir) -> StartFrom | None:
    """A clone that never ran starts from its template's memory image; None otherwise."""
    if run.state_file.exists() or not run.clone_file.exists():
        return None
    record = read_clone(run)
    if record is None or not Path(record.memory).exists():
        return None
    incoming = f"exec:cat {shlex.quote(record.memory)}"
    return device_set_start(record.devices)._replace(incoming=incoming)


def resume_incoming(
    run: RunDir, cut_links: tuple[str, ...] = (), timeout: float = MIGRATE_TIMEOUT
) -> None:
    """Wait until QEMU has read the memory image, then run the guest: the stream carries
    the helper's paused state, so QEMU does not start it by itself. The NICs ``cut_links``
    names are cut first (``qvm.ops.netguest``): the stream set their links as they were."""
    deadline = time.monotonic() + timeout
    with ControlSession(run) as session:
        while True:
            status = runstate(session.execute("query-status"))
            if status == "running":
                return
            if status in ("paused", "postmigrate", "prelaunch"):
                set_links(session, cut_links, False)
                session.execute("cont")
                return
            if status != "inmigrate":
                raise ControlError(f"{run.name}: QEMU is {status} after reading its memory image")
            if time.monotonic() > deadline:
                raise ControlError(f"{run.name}: the memory image took over {timeout:g} s to load")
            time.sleep(0.02)


def nic_macs(machine: Machine) -> dict[str, str]:
    """NIC id -> the MAC QEMU's command line gives it."""
    return {
        nic_id(index, nic): nic.mac or stable_mac(machine.name, index)
        for index, nic in enumerate(machine.nics)
    }


def adopt_own_macs(run: RunDir, machine: Machine) -> str | None:
    """After the first start: the guest's NICs take the clone's MACs (see the module's
    docstring); what happened is kept in ``clone.json`` and returned. None: no NIC."""
    record = read_clone(run)
    if record is None or not machine.nics:
        return None
    changes = {
        nic: (old, new)
        for nic, new in nic_macs(machine).items()
        if (old := record.template_macs.get(nic)) is not None and old.lower() != new.lower()
    }
    if changes:
        note = set_guest_macs(run, changes)
    elif record.template_macs:
        note = "the template's: the clone's machine file gives its NICs the same MACs"
    else:
        note = "not set: the clone record names no template MACs (made by an older qvm)"
    write_clone(run, record._replace(mac_note=note))
    return note


def note_macs(run: RunDir, problem: str) -> None:
    """Add ``problem`` (a clone's links left cut, ``qvm.ops.netguest``) to what
    ``clone.json`` says of its MACs."""
    record = read_clone(run)
    if record is not None:
        said = f"{record.mac_note}; {problem}" if record.mac_note else problem
        write_clone(run, record._replace(mac_note=said))


def set_clock(run: RunDir) -> str | None:
    """After the first start: the guest's clock stood still since the template's save, so
    it is set to the host's, as a restore sets it; what happened is kept in ``clone.json``
    and returned. None: not a clone."""
    record = read_clone(run)
    if record is None:
        return None
    if record.guest_time_ns is None:
        note = "not set: no guest agent answered at the template's save"
    else:
        note = set_guest_time(run)
    write_clone(run, record._replace(clock_note=note))
    return note
