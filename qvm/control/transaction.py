"""The one hotplug transaction every kind of device goes through (vCPUs, memory, disks,
NICs); the kinds supply only what differs.

Adding (``plug``, with a ``Plug`` the kind planned)::

    plan     the kind picks ids, slots, buses, and checks what it can before QEMU is asked
    steps    QMP commands, each with its undo: when QEMU refuses one, those done are
             undone, last first, and one line says what failed and how the VM is left
    record   ``devices.json``: what QMP cannot say later (image file, forwards, cleanup)
    wait     for the guest's answer (``_OST``, a size change), through a listener opened
             before the first step: the guest is quick

Removing (``unplug``, with a ``DeviceKind``)::

    steps    ``device_del`` of each id (a refusal at once is the kind's line)
    wait     until ``DEVICE_DELETED`` or a refusal of each, or the deadline
    record   pending marks for what the guest has not released, with the backend's
             cleanup for the supervisor (``qvm.store.pending``); the cleanup itself and
             the device's record dropped for what went

Nothing here prints.
"""

from __future__ import annotations

import contextlib
import re
import time
from collections.abc import Callable, Collection, Iterable, Iterator, Mapping, Sequence
from typing import Any, Generic, Protocol, TypeVar

from qvm.base.record import Record
from qvm.base.text import display_path
from qvm.control.events import UNPLUG_EVENTS, match_unplug_event
from qvm.control.qmp_session import Events, QmpSession
from qvm.control.session import ControlSession
from qvm.definition.naming import generated_id_kind
from qvm.definition.schema import ID_PATTERN
from qvm.errors import ControlError, HotplugError, NotRunningError
from qvm.layout.kinds import group_kinds
from qvm.layout.rundir import RunDir
from qvm.store.devices import (
    Command,
    DeviceRecord,
    add_device_record,
    device_records,
    drop_device_record,
    save_devices,
)
from qvm.store.launch import LaunchRecord, read_launch
from qvm.store.pending import (
    PERIPHERAL,
    device_state,
    mark_pending,
    pending_ids,
    pending_marks,
    unmark_pending,
)

_T = TypeVar("_T")


# --- the launch ------------------------------------------------------------------------


def launch_of(run: RunDir) -> LaunchRecord:
    launch = read_launch(run.launch_file)
    if launch is None:
        raise NotRunningError(run.name)
    return launch


@contextlib.contextmanager
def opened(
    run: RunDir, launch: LaunchRecord | None = None
) -> Iterator[tuple[QmpSession, LaunchRecord]]:
    """The control session of a running VM, and the facts of its QEMU run (``launch``,
    when the caller read them first: "not running" comes before any other complaint)."""
    launch = launch or launch_of(run)
    with ControlSession(run) as session:
        yield session, launch


def restart_hint(run: RunDir, launch: LaunchRecord, key: str) -> str:
    """``raise KEY in machines/vm1.toml, then qvm restart vm1``."""
    file = launch.machine_file
    where = f" in {display_path(file)}" if file else ""
    return f"raise {key}{where}, then qvm restart {run.name}"


def since(started: float) -> float:
    return round(time.monotonic() - started, 3)


# --- what QEMU has ---------------------------------------------------------------------


def peripheral_types(session: QmpSession) -> dict[str, str]:
    """Device id -> QOM type, for every device with an id (``/machine/peripheral``)."""
    children = session.execute("qom-list", {"path": PERIPHERAL.rstrip("/")})
    found = {}
    for child in children:
        kind = str(child.get("type", ""))
        if kind.startswith("child<") and kind.endswith(">"):
            found[child["name"]] = kind[len("child<") : -1]
    return found


def peripheral_ids(session: QmpSession) -> set[str]:
    """Ids of the devices QEMU has now."""
    return set(peripheral_types(session))


def boot_device_ids(argv: Iterable[str]) -> set[str]:
    """The ids of the ``-device`` options QEMU was started with."""
    args = list(argv)
    ids = set()
    for option, value in zip(args, args[1:], strict=False):
        if option == "-device":
            for part in value.split(","):
                if part.startswith("id="):
                    ids.add(part[3:])
    return ids


def origin_of(dev_id: str, record: DeviceRecord | None, boot_ids: Collection[str]) -> str:
    """ "qvm" (hotplugged by qvm), "boot" (the machine file) or "other" (qvm qmp)."""
    return "qvm" if record else ("boot" if dev_id in boot_ids else "other")


def listed_json(device: Any) -> dict[str, Any]:
    """A listed device (a record with ``pending``) as JSON: ``pending`` is said by
    its ``state``, in the one vocabulary of every list."""
    data = device._asdict()
    return {**data, "state": device_state(data.pop("pending"))}


class ListedDevice:
    """What a listed device record (with a ``pending`` field) says the way every list
    does: ``class DiskInfo(Record, ListedDevice)``."""

    __slots__ = ()
    id: str
    pending: bool

    @property
    def state(self) -> str:
        return device_state(self.pending)

    def as_json(self) -> dict[str, Any]:
        return listed_json(self)


_Listed = TypeVar("_Listed", bound=ListedDevice)


def find_listed(devices: Iterable[_Listed], dev_id: str) -> _Listed | None:
    """The device of a listing with this id, if it lists one."""
    return next((device for device in devices if device.id == dev_id), None)


def guest_names(guest: dict[str, str] | None, key: str) -> list[str] | None:
    """A list the guest's ``QVM-STATE`` line gives as ``key=a,b`` (``-``: none); None when
    the guest did not say."""
    if not guest or guest.get(key) is None:
        return None
    return [] if guest[key] == "-" else guest[key].split(",")


def reconcile_devices(
    session: QmpSession, run: RunDir, present: set[str], kinds: Collection[str] = ()
) -> dict[str, DeviceRecord]:
    """Id -> record, of the records whose device QEMU still has (of ``kinds``, if given).
    A record whose device went away (a pending unplug the guest completed later) is
    dropped, after its cleanup ran: the supervisor has normally done it; deleting twice
    is harmless."""
    devices = device_records(run)
    marks = pending_marks(run)
    kept = [d for d in devices if d.id in present or d.id in marks]
    for device in devices:
        if device not in kept:
            run_cleanup(session, device.cleanup)
    if len(kept) != len(devices):
        save_devices(run, kept)
    return {d.id: d for d in kept if not kinds or d.kind in kinds}


def taken_ids(session: QmpSession, run: RunDir, listed: Iterable[str]) -> set[str]:
    """Ids a new device must not take: QEMU's, the listed ones, those unplug-pending."""
    return peripheral_ids(session) | pending_ids(run) | set(listed)


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
    """A user-chosen id must match the definition's id rule, not be another kind's
    generated id, and be free. ``what``: the command ("mem add"), whose group's kinds
    may take their own generated form."""
    if not re.fullmatch(ID_PATTERN, dev_id):
        shown = dev_id if len(dev_id) <= 40 else dev_id[:37] + "..."
        raise HotplugError(
            f"{run.name}: {what}: --id must be a letter then up to 31 letters, digits, '_' or "
            f"'-', got {shown!r}"
        )
    owner = generated_id_kind(dev_id)
    if owner is not None and owner not in {k.family for k in group_kinds(what.split(" ")[0])}:
        # ids are unique across kinds: see qvm.definition.naming.generated_id_kind
        raise HotplugError(
            f"{run.name}: {what}: id {dev_id!r} has the form of a {owner} id, which qvm "
            f"keeps for {owner} devices (hint: pick another --id, or leave it out)"
        )
    if dev_id in set(taken):
        raise HotplugError(
            f"{run.name}: {what}: id {dev_id!r} is already used in this VM "
            "(hint: pick another --id, or leave it out for a fresh one)"
        )


def new_device_id(run: RunDir, asked: str | None, prefix: str, taken: set[str], action: str) -> str:
    """The id the user asked for (checked), or a fresh ``prefix<N>``."""
    if asked is None:
        return fresh_id(prefix, taken)[1]
    check_new_id(run, asked, taken, action)
    return asked


# --- steps ----------------------------------------------------------------------------


class Step(Record):
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


class Plug(Record):
    """A planned hotplug: the steps, and what to record once QEMU has the device."""

    action: str  # "disk attach": how every message about it begins
    steps: Sequence[Step]
    record: DeviceRecord | None = None
    translate: Translate | None = None
    # each step plugs a device of its own (vCPUs): a refusal keeps those plugged
    independent: bool = False
    # the events the guest answers with, listened for from before the first step
    events: tuple[str, ...] = ()


def plug(
    session: QmpSession,
    run: RunDir,
    plan: Plug,
    wait: Callable[[Events | None], _T] | None = None,
) -> _T | None:
    """Run the plan's steps, record the device, then ``wait`` (given the listener of
    ``plan.events``, None without) for the guest's answer."""
    listening = session.listen(plan.events) if plan.events else contextlib.nullcontext()
    with listening as events:
        run_steps(session, run, plan)
        if plan.record is not None:
            # before the wait: QEMU has the device whatever the guest answers
            add_device_record(run, plan.record)
        return wait(events) if wait is not None else None


def run_steps(session: QmpSession, run: RunDir, plan: Plug) -> None:
    """Run the steps in order. When QEMU refuses one, undo those done (last first) and
    raise one line: what failed, QEMU's reason, and whether the VM is as it was."""
    done: list[Step] = []
    for step in plan.steps:
        try:
            session.execute(step.command, step.arguments)
        except ControlError as error:
            if plan.independent:
                if not done or error.qemu_exited:
                    raise
                plugged = ", ".join(s.what for s in done)
                raise HotplugError(
                    f"{run.name}: added {plugged}, then {step.command} {step.what} failed: "
                    f"{error.qemu_desc or error}"
                ) from error
            if error.qemu_exited or error.qemu_desc is None:
                raise
            undo = [s.undo for s in reversed(done) if s.undo is not None]
            left = run_cleanup(session, undo)
            after = (
                f"undoing the earlier steps failed: {'; '.join(left)}"
                if left
                else "the VM is unchanged"
            )
            said = plan.translate(error.qemu_desc) if plan.translate else None
            problem, hint = said or (f"{step.command} {step.what}: {error.qemu_desc}", None)
            hint_text = f" (hint: {hint})" if hint else ""
            raise HotplugError(
                f"{run.name}: {plan.action}: {problem}; {after}{hint_text}"
            ) from error
        done.append(step)


def run_cleanup(session: QmpSession, cleanup: Sequence[Command]) -> list[str]:
    """Run the commands that delete a device's backend; QEMU's complaints, if any."""
    errors = []
    for command, arguments in cleanup:
        try:
            session.execute(command, arguments)
        except ControlError as error:
            if error.qemu_exited:
                raise
            errors.append(f"{command_text(command, arguments)}: {error.qemu_desc or error}")
    return errors


def command_text(command: str, arguments: dict[str, Any]) -> str:
    return f"{command} " + ",".join(f"{k}={v}" for k, v in arguments.items())


# --- unplugging --------------------------------------------------------------------------


class DeviceKind(Protocol):
    """What differs between the kinds of device when one goes."""

    # how messages name the device: "vCPU", "DIMM", "disk", "NIC"
    @property
    def noun(self) -> str: ...

    # only DEVICE_DELETED of the device itself ends its unplug (PCI devices and DIMMs);
    # else that of any child does (QEMU 7.2 names only a vCPU's lapic)
    @property
    def exact(self) -> bool: ...

    def refusal(self, run: RunDir, dev_id: str, desc: str) -> str:
        """The line for a ``device_del`` QEMU refused at once."""
        ...

    def accepted(self, run: RunDir, dev_id: str) -> None:
        """QEMU took the ``device_del`` of ``dev_id``."""
        ...

    def still_present(
        self, session: QmpSession, ids: Sequence[str], deleted: Collection[str]
    ) -> set[str]:
        """After the wait: which of ``ids`` QEMU still has (``deleted``: those whose
        ``DEVICE_DELETED`` came)."""
        ...

    def present(self, session: QmpSession, ids: Sequence[str]) -> set[str]:
        """Which of ``ids`` QEMU has now: one look."""
        ...


class Peripheral(Record):
    """The kind of every device in ``/machine/peripheral`` (DIMMs, disks, NICs):
    ``DEVICE_DELETED`` of the device itself is the end of it."""

    noun: str
    exact: bool = True

    def refusal(self, run: RunDir, dev_id: str, desc: str) -> str:
        return f"{run.name}: device_del {dev_id}: {desc}; the VM is unchanged"

    def accepted(self, run: RunDir, dev_id: str) -> None:
        pass

    def still_present(
        self, session: QmpSession, ids: Sequence[str], deleted: Collection[str]
    ) -> set[str]:
        return {i for i in ids if i not in deleted}

    def present(self, session: QmpSession, ids: Sequence[str]) -> set[str]:
        return set(ids) & peripheral_ids(session)


class DeviceUnplug(Record):
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
            **self._asdict(),
            "cleaned": list(self.cleaned),
            "cleanup_errors": list(self.cleanup_errors),
        }


def unplug(
    session: QmpSession,
    run: RunDir,
    kind: DeviceKind,
    cleanups: Mapping[str, Sequence[Command]],
    timeout: float,
) -> list[DeviceUnplug]:
    """``device_del`` of each id (the keys of ``cleanups``, each with the commands that
    delete its backend), wait up to ``timeout`` s for the guest to release them, then
    delete the backends of those gone and mark the others pending.

    A pending mark carries the cleanup for the supervisor, which finishes the job when
    ``DEVICE_DELETED`` comes. The first ``device_del`` QEMU refuses at once raises; a
    later one is that device's outcome.
    """
    ids = list(cleanups)
    started = time.monotonic()
    refused: dict[str, tuple[float, str | None]] = {}
    deleted: dict[str, float] = {}
    with session.listen(UNPLUG_EVENTS) as events:  # before device_del: nothing can be missed
        accepted: list[str] = []
        for dev_id in ids:
            try:
                session.execute("device_del", {"id": dev_id})
            except ControlError as error:
                if error.qemu_desc is None or error.qemu_exited:
                    raise
                message = kind.refusal(run, dev_id, error.qemu_desc)
                if not accepted:
                    raise HotplugError(message) from error
                refused[dev_id] = (since(started), message)
                continue
            accepted.append(dev_id)
            kind.accepted(run, dev_id)
        waiting = set(accepted)

        def settles(event: dict[str, Any]) -> bool:
            dev_id, what, detail = match_unplug_event(event, waiting, children=not kind.exact)
            if what == "deleted":
                deleted[dev_id] = since(started)
            elif what == "refused":
                refused[dev_id] = (since(started), detail)
            else:
                return False
            waiting.discard(dev_id)
            return not waiting

        events.wait(settles, started + timeout)
    seconds = since(started)
    # the event is a hint; what QEMU lists is the fact
    present = kind.still_present(session, [i for i in accepted if i not in refused], deleted)
    outcomes: dict[str, DeviceUnplug] = {}
    for dev_id in ids:
        if dev_id in refused:
            outcomes[dev_id] = DeviceUnplug(dev_id, "refused", *refused[dev_id])
        elif dev_id not in present:
            outcomes[dev_id] = DeviceUnplug(dev_id, "removed", deleted.get(dev_id, seconds))
        else:
            detail = (
                f"QEMU sent DEVICE_DELETED but still lists the {kind.noun}"
                if dev_id in deleted
                else f"the guest has not released it within {timeout:g} s"
            )
            outcomes[dev_id] = DeviceUnplug(dev_id, "pending", seconds, detail)
    pending = [i for i in ids if outcomes[i].outcome == "pending"]
    if pending:
        for dev_id in pending:
            mark_pending(run, [dev_id], exact=kind.exact, cleanup=cleanups[dev_id])
        # DEVICE_DELETED may have come between the last look and the mark (and the
        # supervisor then had no mark to clear): look once more
        late = set(pending) - kind.present(session, pending)
        if late:
            unmark_pending(run, late)
            for dev_id in late:
                outcomes[dev_id] = outcomes[dev_id]._replace(outcome="removed", detail=None)
    for dev_id in ids:
        if outcomes[dev_id].outcome == "removed":
            outcomes[dev_id] = _clean_up(session, run, outcomes[dev_id], cleanups[dev_id])
    return [outcomes[i] for i in ids]


def _clean_up(
    session: QmpSession, run: RunDir, gone: DeviceUnplug, cleanup: Sequence[Command]
) -> DeviceUnplug:
    errors = run_cleanup(session, cleanup)
    drop_device_record(run, gone.id)
    cleaned = tuple(command_text(c, a) for c, a in cleanup)
    return gone._replace(cleaned=cleaned, cleanup_errors=tuple(errors))


def recorded_cleanup(run: RunDir, dev_id: str) -> tuple[Command, ...]:
    """The commands that delete the backend of a device qvm hotplugged."""
    return next((r.cleanup for r in device_records(run) if r.id == dev_id), ())


def unplug_one(
    session: QmpSession,
    run: RunDir,
    kind: DeviceKind,
    dev_id: str,
    timeout: float,
    cleanup: Sequence[Command] | None = None,
) -> DeviceUnplug:
    """``unplug`` of one device, its cleanup from its ``devices.json`` record unless given."""
    commands = recorded_cleanup(run, dev_id) if cleanup is None else cleanup
    return unplug(session, run, kind, {dev_id: commands}, timeout)[0]


class Removal(Record, Generic[_Listed]):
    """A device qvm unplugged (or asked to): ``key`` names it in JSON ("disk", "nic")."""

    name: str
    key: str
    device: _Listed  # as listed before the unplug
    unplug: DeviceUnplug

    def as_json(self) -> dict[str, Any]:
        return {"name": self.name, self.key: self.device.as_json(), **self.unplug.as_json()}


def remove_hotplugged(
    session: QmpSession,
    run: RunDir,
    launch: LaunchRecord,
    kind: Peripheral,
    dev_id: str,
    listed: Sequence[_Listed],
    timeout: float,
) -> Removal[_Listed]:
    """Unplug a device qvm hotplugged, one of ``listed`` (its kind's listing), with its
    recorded cleanup."""
    found = find_listed(listed, dev_id)
    check_removable(run, launch, dev_id, found, kind.noun, [device.id for device in listed])
    assert found is not None  # check_removable refuses a device not listed
    unplugged = unplug_one(session, run, kind, dev_id, timeout)
    return Removal(run.name, kind.noun.lower(), found, unplugged)


def check_removable(
    run: RunDir, launch: LaunchRecord, dev_id: str, found: Any, what: str, known: list[str]
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
        file = launch.machine_file
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


def pending_text(name: str, dev_id: str, detail: str | None, what: str) -> str:
    """The one line for an unplug the guest has not completed."""
    return (
        f"{name}: unplug of {dev_id} pending: {detail}. The request stands: the {what} "
        f"stays in the VM until the guest releases it, and its backend is deleted then "
        f"(hint: check that the guest handles ACPI hotplug; qvm restart {name} ends it)"
    )
