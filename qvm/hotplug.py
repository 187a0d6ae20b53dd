"""What hotplug of every kind shares (vCPUs, memory, disks, NICs), in the control layer.

- ``launch_of``: the facts of the running QEMU (``launch.json``), or NotRunningError.
- Pending marks (``qvm.pending``): unplug requests the guest has not completed, each
  with the commands that delete the device's backend; the supervisor runs them when
  ``DEVICE_DELETED`` arrives, so a backend never outlives its device.
- The TCG guard (``cpu-unplugged.json``): under TCG, after a vCPU unplug, QEMU 7.2
  crashes on the next vCPU ``device_add`` (double free, SIGABRT), and usually dies
  (SIGSEGV) within about 3 s of a ``device_add`` of a DIMM, disk or NIC that it had
  accepted (9 of 11 tries, pc and q35). Every ``device_add`` qvm sends goes through
  ``check_device_add``.
- ``devices.json``: what qvm hotplugged in this QEMU run (memory, disks, NICs), so that
  ``list`` can show files and forwards QMP cannot, and ``--persist`` knows what to write.
  QEMU stays the truth for what is present: a record whose device is gone is dropped.
- ``unplug_device``: ``device_del``, waiting for ``DEVICE_DELETED`` (listened for before
  the request), then the cleanup; pending when the guest has not released it in time.
- ``PciPlaces``: where a PCI device can go: a free ``pcie-root-port`` (``hp0``...) on
  q35, whose ``pcie.0`` takes no hotplug; the bus ``pci.0`` itself on pc.
- Who holds a file: any process, by /proc (QEMU only says it could not lock it).

Nothing here prints.
"""

from __future__ import annotations

import os
import re
import time
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import Any, NamedTuple

from qvm.errors import ControlError, HotplugError, NotRunningError
from qvm.pending import (
    PERIPHERAL,
    Command,
    commands_of,
    mark_pending,
    own_path,
    pending_marks,
    unmark_pending,
)
from qvm.rundir import (
    RunDir,
    hotplugged,
    list_run_dirs,
    qemu_run,
    read_json,
    same_run,
    save_hotplugged,
    write_json_atomic,
)

PERIPHERAL_ANON = "/machine/peripheral-anon/"
# ACPI _OST source codes and the statuses of an eject request (ACPI 6.x, 6.3.5)
OST_INSERT = 1
OST_EJECT = 3
OST_EJECT_IN_PROGRESS = 0x84
OST_STATUS_TEXT = {
    1: "non-specific failure",
    2: "unrecognized notify code",
    3: "notification not supported",
    0x80: "device ejection not supported by the guest OS",
    0x81: "device in use by an application",
    0x82: "device busy",
    0x83: "ejection dependency is busy or not supported",
}
UNPLUG_EVENTS = ("DEVICE_DELETED", "DEVICE_UNPLUG_GUEST_ERROR", "ACPI_DEVICE_OST")
PC_BUS_SLOTS = 32  # slots on pc's pci.0, the host bridge's included


# --- the launch ------------------------------------------------------------------------


def launch_of(run: RunDir) -> dict[str, Any]:
    launch = read_json(run.launch_file)
    if launch is None:
        raise NotRunningError(run.name)
    return launch


def display_path(path: str | Path) -> str:
    """A path as the user would type it: relative to the current folder when inside it."""
    p = Path(path)
    try:
        return str(p.resolve().relative_to(Path.cwd().resolve()))
    except (ValueError, OSError):
        return str(p)


def restart_hint(run: RunDir, launch: dict[str, Any], key: str) -> str:
    """``raise KEY in machines/vm1.toml, then qvm restart vm1``."""
    file = launch.get("machine_file")
    where = f" in {display_path(file)}" if file else ""
    return f"raise {key}{where}, then qvm restart {run.name}"


def since(started: float) -> float:
    return round(time.monotonic() - started, 3)


# --- the TCG guard ---------------------------------------------------------------------


def unplug_requested_this_run(run: RunDir) -> bool:
    """True if a vCPU unplug was requested in the current QEMU run (see the TCG crash)."""
    record = read_json(run.cpu_unplugged_file)
    return record is not None and same_run(record, qemu_run(run))


def record_cpu_unplug_request(run: RunDir, ids: Sequence[str]) -> None:
    record = read_json(run.cpu_unplugged_file)
    current = qemu_run(run)
    if record is None or not same_run(record, current):
        record = {**current, "ids": []}
    record["ids"] = sorted(set(record.get("ids", [])) | set(ids))
    record["at"] = time.time()
    write_json_atomic(run.cpu_unplugged_file, record)


def tcg_unplug_refusal(run: RunDir, launch: dict[str, Any], action: str = "cpu add") -> str | None:
    """Why a ``device_add`` for ``action`` must not be tried now, or None."""
    if launch.get("accel") != "tcg" or not unplug_requested_this_run(run):
        return None
    crash = (
        "crashes (double free) on the next vCPU device_add"
        if action.startswith("cpu ")
        # measured: the device_add returns, then QEMU dies (SIGSEGV) within about 3 s, in 9
        # of 11 tries with a DIMM, disk or NIC on pc and q35
        else "usually crashes soon after the next device_add of any device, not only of a vCPU"
    )
    return (
        f"{run.name}: {action} refused: a vCPU was unplugged earlier in this QEMU run, and "
        f"under TCG QEMU 7.2 {crash} "
        f"(hint: qvm restart {run.name} first, or pass --force to try anyway)"
    )


def check_device_add(run: RunDir, launch: dict[str, Any], action: str, force: bool) -> bool:
    """Raise unless a ``device_add`` is safe (or forced); True when it was forced."""
    refusal = tcg_unplug_refusal(run, launch, action)
    if refusal and not force:
        raise HotplugError(refusal)
    return bool(refusal)


# --- what qvm hotplugged in this QEMU run ---------------------------------------------


def add_device_record(run: RunDir, entry: dict[str, Any]) -> None:
    save_hotplugged(run, [*hotplugged(run), entry])


def drop_device_record(run: RunDir, dev_id: str) -> None:
    devices = hotplugged(run)
    kept = [d for d in devices if d.get("id") != dev_id]
    if kept != devices:
        save_hotplugged(run, kept)


def peripheral_ids(session: Any) -> set[str]:
    """Ids of the devices QEMU has now (``/machine/peripheral``'s children)."""
    children = session.execute("qom-list", {"path": PERIPHERAL.rstrip("/")})
    return {c["name"] for c in children if str(c.get("type", "")).startswith("child<")}


def reconcile_devices(
    session: Any, run: RunDir, present: set[str], kind: str | None = None
) -> list[dict[str, Any]]:
    """The records whose device QEMU still has (of ``kind``, if given). A record whose
    device went away (a pending unplug the guest completed later) is dropped, after
    its cleanup ran: the supervisor has normally done it; deleting twice is harmless."""
    devices = hotplugged(run)
    marks = pending_marks(run)
    kept, gone = [], []
    for device in devices:
        (kept if device["id"] in present or device["id"] in marks else gone).append(device)
    for device in gone:
        run_cleanup(session, commands_of(device))
    if gone:
        save_hotplugged(run, kept)
    return [d for d in kept if kind is None or d.get("kind") == kind]


def run_cleanup(session: Any, cleanup: Sequence[Command]) -> list[str]:
    """Run the commands that delete a device's backend; QEMU's complaints, if any."""
    errors = []
    for command, arguments in cleanup:
        try:
            session.execute(command, arguments)
        except ControlError as error:
            if error.qemu_exited:
                raise
            errors.append(f"{command} {_args_text(arguments)}: {error.qemu_desc or error}")
    return errors


class Step(NamedTuple):
    """One QMP command of a hotplug, and the command that undoes it (None: the last)."""

    command: str
    arguments: dict[str, Any]
    undo: Command | None = None

    @property
    def what(self) -> str:
        args = self.arguments
        return str(args.get("node-name") or args.get("id") or self.command)


# QEMU's error text -> (the problem, a hint or None) in qvm's words; None: QEMU's words
Translate = Callable[[str], "tuple[str, str | None] | None"]


def run_steps(
    session: Any,
    run: RunDir,
    action: str,
    steps: Sequence[Step],
    translate: Translate | None = None,
) -> None:
    """Run the steps in order. When QEMU refuses one, undo those done (last first) and
    raise one line: what failed, QEMU's reason, and whether the VM is as it was."""
    done: list[Command] = []
    for step in steps:
        try:
            session.execute(step.command, step.arguments)
        except ControlError as error:
            if error.qemu_exited or error.qemu_desc is None:
                raise
            left = run_cleanup(session, list(reversed(done)))
            after = (
                f"undoing the earlier steps failed: {'; '.join(left)}"
                if left
                else "the VM is unchanged"
            )
            said = translate(error.qemu_desc) if translate else None
            problem, hint = said or (f"{step.command} {step.what}: {error.qemu_desc}", None)
            hint_text = f" (hint: {hint})" if hint else ""
            raise HotplugError(f"{run.name}: {action}: {problem}; {after}{hint_text}") from error
        if step.undo is not None:
            done.append(step.undo)


def _args_text(arguments: dict[str, Any]) -> str:
    return ",".join(f"{k}={v}" for k, v in arguments.items())


def fresh_id(
    prefix: str, taken: Iterable[str], start: int = 0, ok: Callable[[str], bool] | None = None
) -> tuple[int, str]:
    """The lowest ``prefix<N>`` (N >= start) not in ``taken`` (and that ``ok`` accepts)."""
    used = set(taken)
    index = start
    while f"{prefix}{index}" in used or (ok is not None and not ok(f"{prefix}{index}")):
        index += 1
    return index, f"{prefix}{index}"


def check_new_id(run: RunDir, dev_id: str, taken: Iterable[str], what: str) -> None:
    """A user-chosen id must match the definition's id rule and be free."""
    from qvm.definition import ID_PATTERN

    if not re.fullmatch(ID_PATTERN, dev_id):
        raise HotplugError(
            f"{run.name}: --id must be a letter then up to 31 letters, digits, '_' or '-', "
            f"got {dev_id!r}"
        )
    if dev_id in set(taken):
        raise HotplugError(
            f"{run.name}: {what}: id {dev_id!r} is already used in this VM "
            "(hint: pick another --id, or leave it out for a fresh one)"
        )


# --- events of an unplug ---------------------------------------------------------------


def ost_status_text(status: int) -> str:
    text = OST_STATUS_TEXT.get(status, "failure")
    return f"ACPI _OST status {status:#x}: {text}"


def match_unplug_event(
    event: dict[str, Any], ids: Iterable[str], children: bool = True
) -> tuple[str, str, str | None]:
    """(id, "deleted" | "refused", detail) for an event about one of ``ids``, else ("", "", None).

    QEMU 7.2 reports a vCPU's removal as ``DEVICE_DELETED`` of its lapic child only
    (``path = /machine/peripheral/<id>/lapic``): with ``children``, a child's path counts.
    Without it only the device itself does: a virtio PCI device's ``virtio-backend``
    child is deleted about 50 ms before the device.
    """
    name = event.get("event")
    data = event.get("data") or {}
    for dev_id in ids:
        path = data.get("path") or ""
        own = own_path(dev_id)
        about = (
            data.get("device") == dev_id or path == own or (children and path.startswith(own + "/"))
        )
        if name == "DEVICE_DELETED" and about:
            return dev_id, "deleted", None
        if name == "DEVICE_UNPLUG_GUEST_ERROR" and about:
            return dev_id, "refused", "the guest reported an error unplugging it"
        if name == "ACPI_DEVICE_OST":
            info = data.get("info") or {}
            status = info.get("status", 0)
            if (
                info.get("device") == dev_id
                and info.get("source") == OST_EJECT
                and status not in (0, OST_EJECT_IN_PROGRESS)
            ):
                return dev_id, "refused", f"the guest refused the eject ({ost_status_text(status)})"
    return "", "", None


# --- unplugging one device -------------------------------------------------------------


class DeviceUnplug(NamedTuple):
    id: str
    outcome: str  # "removed", "refused" or "pending"
    seconds: float
    detail: str | None = None
    # what was deleted with the device (backend object, block nodes, netdev)
    cleaned: tuple[str, ...] = ()
    # QEMU's complaints about deleting them
    cleanup_errors: tuple[str, ...] = ()

    @property
    def complete(self) -> bool:
        return self.outcome == "removed" and not self.cleanup_errors

    def as_json(self) -> dict[str, Any]:
        return {
            "id": self.id,
            "outcome": self.outcome,
            "seconds": self.seconds,
            "detail": self.detail,
            "cleaned": list(self.cleaned),
            "cleanup_errors": list(self.cleanup_errors),
        }


def unplug_device(
    session: Any, run: RunDir, dev_id: str, cleanup: Sequence[Command], timeout: float
) -> DeviceUnplug:
    """``device_del``, wait for the guest to release the device, delete its backend.

    Pending (the guest has not released it within ``timeout``) leaves a mark with the
    cleanup for the supervisor, which finishes the job when ``DEVICE_DELETED`` comes.
    """
    started = time.monotonic()
    outcome, detail = "pending", None
    events = session.listen(UNPLUG_EVENTS)  # before device_del: nothing can be missed
    try:
        try:
            session.execute("device_del", {"id": dev_id})
        except ControlError as error:
            if error.qemu_desc is None or error.qemu_exited:
                raise
            raise HotplugError(
                f"{run.name}: device_del {dev_id}: {error.qemu_desc}; the VM is unchanged"
            ) from error
        deadline = started + timeout
        while True:
            event = events.get(max(deadline - time.monotonic(), 0.0))
            if event is None:
                if time.monotonic() >= deadline:
                    break
                continue
            _, what, why = match_unplug_event(event, [dev_id], children=False)
            if what == "deleted":
                outcome = "removed"
                break
            if what == "refused":
                outcome, detail = "refused", why
                break
    finally:
        events.close()
    seconds = since(started)
    if outcome == "pending":
        mark_pending(run, [dev_id], exact=True, cleanup=cleanup)
        # DEVICE_DELETED may have come just after the wait (the supervisor then had no
        # mark to clear): look once more
        if dev_id in peripheral_ids(session):
            detail = f"the guest has not released it within {timeout:g} s"
        else:
            unmark_pending(run, [dev_id])
            outcome = "removed"
    if outcome != "removed":
        return DeviceUnplug(dev_id, outcome, seconds, detail)
    errors = run_cleanup(session, cleanup)
    cleaned = tuple(f"{c} {_args_text(a)}" for c, a in cleanup)
    return DeviceUnplug(dev_id, outcome, seconds, None, cleaned, tuple(errors))


class Removal(NamedTuple):
    """A device qvm unplugged (or asked to): ``key`` names it in JSON ("disk", "nic")."""

    name: str
    key: str
    device: Any  # the listed device, with ``as_json``
    unplug: DeviceUnplug

    def as_json(self) -> dict[str, Any]:
        return {"name": self.name, self.key: self.device.as_json(), **self.unplug.as_json()}


def check_removable(
    run: RunDir, launch: dict[str, Any], dev_id: str, found: Any, what: str, known: list[str]
) -> None:
    """Refuse to unplug what qvm did not hotplug, or what is already going.

    ``found``: the listed device (``origin`` "boot", "qvm" or "other", ``pending``), or
    None; ``what``: "disk", "NIC", ...; ``known``: the ids there are.
    """
    name = run.name
    group = what.lower()
    if found is None:
        ids = ", ".join(known) or "none"
        raise HotplugError(
            f"{name}: no {what} {dev_id!r} ({what}s: {ids}) (hint: qvm {group} list {name})"
        )
    if found.origin == "boot":
        file = launch.get("machine_file")
        where = f" (from {display_path(file)})" if file else ""
        raise HotplugError(
            f"{name}: {dev_id} is a boot {what}{where}: qvm unplugs only what it hotplugged "
            f"(hint: remove it from the machine file, then qvm restart {name})"
        )
    if found.origin == "other":
        raise HotplugError(
            f"{name}: {dev_id} was not hotplugged by qvm, which does not know its backend "
            f"(hint: qvm qmp {name} device_del id={dev_id}, then delete its backend)"
        )
    if found.pending:
        raise already_pending(name, dev_id, group)


def already_pending(name: str, dev_id: str, group: str) -> HotplugError:
    return HotplugError(
        f"{name}: {dev_id}: its unplug is already pending: the guest has not released it "
        f"yet (hint: qvm {group} list {name}; qvm restart {name} ends it)"
    )


def unplug_recorded(
    session: Any,
    run: RunDir,
    dev_id: str,
    timeout: float,
    cleanup: Sequence[Command] | None = None,
) -> DeviceUnplug:
    """``unplug_device`` with the backend's deletion from the device's ``devices.json``
    record (unless given), and the record dropped once the device is gone."""
    if cleanup is None:
        record = next((r for r in hotplugged(run) if r.get("id") == dev_id), {})
        cleanup = commands_of(record)
    unplug = unplug_device(session, run, dev_id, cleanup, timeout)
    if unplug.outcome == "removed":
        drop_device_record(run, dev_id)
    return unplug


def pending_text(name: str, dev_id: str, detail: str | None, what: str) -> str:
    """The one line for an unplug the guest has not completed."""
    return (
        f"{name}: unplug of {dev_id} pending: {detail}. The request stands: the {what} "
        f"stays in the VM until the guest releases it, and its backend is deleted then "
        f"(hint: check that the guest handles ACPI hotplug; qvm restart {name} ends it)"
    )


# --- PCI places ------------------------------------------------------------------------


class PciPlaces(NamedTuple):
    """Where a hotplugged PCI device can go in this VM."""

    machine_type: str
    # q35: qvm's spare root ports in order, each with the id of the device on it (or None)
    ports: tuple[tuple[str, str | None], ...] = ()
    # pc: slots in use on pci.0
    bus_slots_used: int = 0

    def free_ports(self) -> list[str]:
        return [port for port, device in self.ports if device is None]

    @property
    def free(self) -> int:
        if self.machine_type == "q35":
            return len(self.free_ports())
        if self.machine_type == "pc":
            return PC_BUS_SLOTS - self.bus_slots_used
        return 0

    def summary(self) -> str:
        if self.machine_type == "q35":
            total = len(self.ports)
            used = total - self.free
            text = f"PCIe root ports for hotplug: {self.free} of {total} free"
            taken = [f"{p} {d}" for p, d in self.ports if d is not None]
            return text + (f" ({', '.join(taken)})" if used else "")
        if self.machine_type == "pc":
            return f"PCI slots on pci.0: {self.free} of {PC_BUS_SLOTS} free"
        return f"{self.machine_type} has no PCI bus to hotplug into"

    def as_json(self) -> dict[str, Any]:
        return {
            "machine_type": self.machine_type,
            "ports": [{"id": p, "device": d} for p, d in self.ports],
            "free": self.free,
            "bus_slots_used": self.bus_slots_used if self.machine_type == "pc" else None,
        }


PORT_ID = re.compile(r"hp(?P<index>[0-9]+)")


def pci_places_from(machine_type: str, pci: Any) -> PciPlaces:
    """``PciPlaces`` from ``query-pci``'s reply. qvm's spare root ports are the bridges
    on pcie.0 named ``hp<N>`` (``-device pcie-root-port,id=hp0,...``, see cmdline)."""
    buses = pci if isinstance(pci, list) else []
    root = next((b for b in buses if b.get("bus") == 0), {"devices": []})
    if machine_type == "q35":
        ports = []
        for device in root.get("devices", []):
            qdev = device.get("qdev_id") or ""
            match = PORT_ID.fullmatch(qdev)
            if match is None or "pci_bridge" not in device:
                continue
            below = (device.get("pci_bridge") or {}).get("devices") or []
            user = (below[0].get("qdev_id") or "(a device without id)") if below else None
            ports.append((int(match["index"]), qdev, user))
        return PciPlaces(machine_type, ports=tuple((p, u) for _, p, u in sorted(ports)))
    slots = {d.get("slot") for d in root.get("devices", [])}
    return PciPlaces(machine_type, bus_slots_used=len(slots))


def pci_places(session: Any, launch: dict[str, Any]) -> PciPlaces:
    machine_type = launch.get("machine_type", "q35")
    if machine_type not in ("q35", "pc"):
        return PciPlaces(machine_type)
    return pci_places_from(machine_type, session.execute("query-pci"))


def choose_pci_bus(places: PciPlaces, run: RunDir, launch: dict[str, Any], what: str) -> str | None:
    """The bus for a new PCI device (``None``: QEMU picks a slot on pc's ``pci.0``)."""
    name = run.name
    if places.machine_type == "q35":
        free = places.free_ports()
        if free:
            return free[0]
        total = len(places.ports)
        hint = restart_hint(run, launch, "hotplug.pci_slots")
        if total == 0:
            raise HotplugError(
                f"{name}: {what}: no PCIe root port for hotplug: q35's pcie.0 takes no "
                f"hotplugged devices, and this VM was started with hotplug.pci_slots = 0 "
                f"(hint: {hint.replace('raise', 'set', 1)})"
            )
        raise HotplugError(
            f"{name}: {what}: no free PCIe root port: {total} of {total} used "
            f"(hint: remove a hotplugged device, or {hint})"
        )
    if places.machine_type == "pc":
        if places.free <= 0:
            raise HotplugError(
                f"{name}: {what}: no free PCI slot: {PC_BUS_SLOTS} of {PC_BUS_SLOTS} used on "
                "pci.0 (hint: remove a hotplugged device first)"
            )
        return None
    raise HotplugError(
        f"{name}: {what}: {places.machine_type} has no PCI bus to hotplug into "
        "(hint: use machine.type q35 or pc)"
    )


# --- who holds a file --------------------------------------------------------------------


def _real(path: str | Path) -> str:
    return os.path.realpath(path)


def file_holders(path: Path) -> list[tuple[int, str]]:
    """(pid, command name) of every process with ``path`` open (that this user may see)."""
    wanted = _real(path)
    holders = []
    for entry in os.scandir("/proc"):
        if not entry.name.isdigit():
            continue
        try:
            fds = os.scandir(f"/proc/{entry.name}/fd")
        except OSError:
            continue
        with fds:
            for fd in fds:
                try:
                    target = os.readlink(fd.path)
                except OSError:
                    continue
                if target == wanted:
                    holders.append((int(entry.name), _comm(int(entry.name))))
                    break
    return holders


def _comm(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/comm").read_text().strip()
    except OSError:
        return "?"


def vm_of_qemu_pid(state_root: Path, pid: int) -> str | None:
    """The qvm VM whose QEMU has this pid, if any."""
    for other in list_run_dirs(state_root):
        state = read_json(other.state_file) or {}
        if state.get("qemu_pid") == pid:
            return other.name
    return None


def describe_holders(state_root: Path, path: Path, exclude_pid: int | None) -> str | None:
    """``VM vm2 (pid 123)`` or ``pid 123 (qemu-io)``: who else has ``path`` open."""
    found = []
    for pid, comm in file_holders(path):
        if pid == exclude_pid:
            continue
        vm = vm_of_qemu_pid(state_root, pid)
        found.append(f"VM {vm} (pid {pid})" if vm else f"pid {pid} ({comm})")
    return ", ".join(found) or None


# --- the guest's own report ------------------------------------------------------------

# complete lines only: the last one may still be being written
GUEST_STATE_LINE = re.compile(r"^QVM-STATE (?P<fields>[^\r\n]*\S)[ \t]*\r?\n", re.M)
SERIAL_TAIL = 256 * 1024


def guest_report_from(text: str) -> dict[str, str] | None:
    """The key=value fields of the last ``QVM-STATE`` line in ``text``."""
    matches = list(GUEST_STATE_LINE.finditer(text))
    if not matches:
        return None
    fields = {}
    for part in matches[-1]["fields"].split():
        key, sep, value = part.partition("=")
        if sep:
            fields[key] = value
    return fields


def guest_report(run: RunDir) -> dict[str, str] | None:
    """What the guest last said about itself on its serial console, if it says it the
    way qvm's test guest does (``QVM-STATE cpus=0 ncpus=1 mem_kb=.. blk=vda net=eth0,lo``)."""
    try:
        with open(run.serial_log, "rb") as handle:
            handle.seek(0, os.SEEK_END)
            handle.seek(max(handle.tell() - SERIAL_TAIL, 0))
            text = handle.read().decode(errors="replace")
    except OSError:
        return None
    return guest_report_from(text)
