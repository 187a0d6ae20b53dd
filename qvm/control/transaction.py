"""What hotplug of every kind shares (vCPUs, memory, disks, NICs).

- ``launch_of``: the facts of the running QEMU (``launch.json``), or NotRunningError.
- ``run_steps``: a plug as steps, each with its undo, rolled back when one fails.
- ``unplug_device``: ``device_del``, waiting for ``DEVICE_DELETED`` (listened for before
  the request), then the cleanup; pending when the guest has not released it in time,
  with the backend's cleanup left to the supervisor (``qvm.store.pending``).
- Device ids: fresh, and unique in the VM.

Nothing here prints.
"""

from __future__ import annotations

import re
import time
from collections.abc import Callable, Iterable, Sequence
from typing import Any, NamedTuple

from qvm.base.jsonfile import read_json
from qvm.base.text import display_path
from qvm.errors import ControlError, HotplugError, NotRunningError
from qvm.layout.rundir import RunDir
from qvm.store.devices import drop_device_record, hotplugged, save_hotplugged
from qvm.store.pending import (
    PERIPHERAL,
    Command,
    commands_of,
    mark_pending,
    own_path,
    pending_marks,
    unmark_pending,
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


# --- the launch ------------------------------------------------------------------------


def launch_of(run: RunDir) -> dict[str, Any]:
    launch = read_json(run.launch_file)
    if launch is None:
        raise NotRunningError(run.name)
    return launch


def restart_hint(run: RunDir, launch: dict[str, Any], key: str) -> str:
    """``raise KEY in machines/vm1.toml, then qvm restart vm1``."""
    file = launch.get("machine_file")
    where = f" in {display_path(file)}" if file else ""
    return f"raise {key}{where}, then qvm restart {run.name}"


def since(started: float) -> float:
    return round(time.monotonic() - started, 3)


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
    from qvm.definition.schema import ID_PATTERN

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
