"""vCPU hotplug on a running VM: list the slots, add, remove, set a count, through the
shared transaction (``qvm.control.transaction``); the slots are ``qvm.control.cpu_slots``,
the guest's answer ``qvm.control.cpu_online``.

What QEMU 7.2 does here, measured (see the project's qemu-facts):

- ``DEVICE_DELETED`` for a vCPU comes only with ``path = /machine/peripheral/<id>/lapic``
  (no ``device``), about 65 ms after ``device_del``, when the slot is already free: an
  unplug is matched by path prefix and confirmed with ``query-hotpluggable-cpus``.
- A guest refuses an eject with an ``ACPI_DEVICE_OST`` (source 3, a failure status);
  ``DEVICE_UNPLUG_GUEST_ERROR`` is honoured too.
- Before a guest OS enabled ACPI CPU hotplug, QEMU refuses ``device_del`` at once
  ("acpi: device unplug request for not supported device type"): nothing changed.
- Under TCG, a vCPU ``device_add`` after any vCPU unplug crashes QEMU 7.2 (and so,
  usually a moment later, does one of any other device). qvm records an unplug request
  in ``cpu-unplugged.json`` and refuses later adds in that QEMU run unless forced
  (``qvm.control.guard.check_device_add``).

When the guest agent answers (``qvm.control.guest_agent_facts``), the guest's own word
joins QEMU's: ``cpu add --wait-guest`` reads ``guest-get-vcpus`` (and onlines a vCPU the
guest leaves offline), ``cpu del`` offlines the vCPU in the guest before ``device_del``,
``cpu list`` shows each vCPU's guest CPU. Without it, every result says so (``source``).

Nothing here prints: every operation returns a record (a ``qvm.base.record.Record``) for
the CLI to render.
"""

from __future__ import annotations

import contextlib
import re
import time
from collections.abc import Collection, Iterator, Sequence
from typing import Any

from qvm.base.record import Record
from qvm.control.cpu_online import (
    GuestOffline,
    GuestOnline,
    Online,
    SerialWait,
    agent_offline,
    agent_wait_online,
    apic_ids,
    serial_size,
    wait_acks,
    wait_online,
    wait_serial,
)
from qvm.control.cpu_record import with_matches
from qvm.control.cpu_slots import (
    CpuList,
    CpuSlot,
    check_count,
    choose_free_slots,
    choose_removals,
    merge_slots,
    topology_from_launch,
)
from qvm.control.events import OST_EVENT
from qvm.control.guard import check_device_add, record_cpu_unplug_request
from qvm.control.guest_agent_facts import (
    CPU_VIEW,
    SOURCE_AGENT,
    SOURCE_QEMU,
    STATUS_SYNC_TIMEOUT,
    AgentLink,
    agent_link,
    drop_cpu_view,
    guest_cpu_view,
    guest_vcpus,
    match_vcpus,
    set_vcpus,
)
from qvm.control.qmp_session import Events, QmpSession
from qvm.control.transaction import Plug, Step, opened, plug, restart_hint, since, unplug
from qvm.definition.topology import cpu_device_id
from qvm.errors import AgentError, HotplugError
from qvm.layout.rundir import RunDir
from qvm.store.launch import LaunchRecord
from qvm.store.pending import pending_ids

DEFAULT_UNPLUG_TIMEOUT = 5.0
DEFAULT_GUEST_TIMEOUT = 10.0
# QEMU's immediate refusal while the chipset is still in legacy CPU-hotplug mode
LEGACY_REFUSAL = "device unplug request for not supported device type"


# --- reading the live slots --------------------------------------------------------------


def _query(session: QmpSession, run: RunDir, launch: LaunchRecord) -> CpuList:
    hotpluggable = session.execute("query-hotpluggable-cpus")
    cpus_fast = session.execute("query-cpus-fast")
    slots = merge_slots(hotpluggable, cpus_fast, pending_ids(run), topology_from_launch(launch))
    return CpuList(run.name, slots)


def list_cpus(run: RunDir) -> CpuList:
    """The slots, each present one with the guest's word on it when the agent answers."""
    with opened(run) as (session, launch):
        cpus = _query(session, run, launch)
        with agent_link(run, STATUS_SYNC_TIMEOUT, STATUS_SYNC_TIMEOUT, CPU_VIEW) as link:
            return _with_guest_view(session, cpus, link)


def _with_guest_view(session: QmpSession, cpus: CpuList, link: AgentLink) -> CpuList:
    """``cpus`` with each present vCPU's guest CPU number and online state."""
    client = link.client
    if client is None:
        return cpus._replace(guest_source=SOURCE_QEMU, guest_detail=link.why_not())
    present = {s.label: s.qom_path for s in cpus.slots if s.present}
    try:
        view = guest_cpu_view(client, link.first)
        matches = match_vcpus(apic_ids(session, present), view.apicids, view.vcpus)
    except AgentError as error:
        return cpus._replace(guest_source=SOURCE_QEMU, guest_detail=str(error))
    return with_matches(cpus, matches)


# --- add -------------------------------------------------------------------------------


class AddedCpu(Record):
    id: str
    driver: str
    props: dict[str, int]
    # the guest's ACPI acknowledgement (_OST for the insert): None when not waited for
    acknowledged: bool | None = None
    ack_seconds: float | None = None
    ack_detail: str | None = None
    # the guest started running on it (CR0.PG set): None when not waited for, or when
    # qvm could not read its registers (then online_detail says why)
    online: bool | None = None
    online_seconds: float | None = None
    online_detail: str | None = None
    # from the guest agent: the guest's CPU number, and whether qvm onlined it
    guest_cpu: int | None = None
    onlined_by_qvm: bool = False

    def as_json(self) -> dict[str, Any]:
        return {**self._asdict(), "props": dict(self.props)}


class AddResult(Record):
    name: str
    added: list[AddedCpu]
    present: int
    max: int
    waited_guest: bool = False
    guest_timeout: float | None = None
    serial: SerialWait | None = None
    forced_after_unplug: bool = False
    # where "online" came from: "agent" (guest-get-vcpus) or "QEMU only" (the registers)
    source: str | None = None
    source_detail: str | None = None  # why not the agent
    no_online: bool = False  # --no-online: qvm leaves a vCPU the guest left offline

    @property
    def complete(self) -> bool:
        """The CPUs were added and every wait that was asked for was satisfied."""
        online = all(a.online for a in self.added) if self.waited_guest else True
        return online and (self.serial is None or self.serial.matched is not None)

    def as_json(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "added": [a.as_json() for a in self.added],
            "present": self.present,
            "max": self.max,
            "waited_guest": self.waited_guest,
            "guest_timeout": self.guest_timeout,
            "serial": self.serial.as_json() if self.serial else None,
            "source": self.source,
            "source_detail": self.source_detail,
            "complete": self.complete,
        }


def _add(
    session: QmpSession,
    run: RunDir,
    launch: LaunchRecord,
    count: int,
    slot: dict[str, int] | None,
    wait_guest: bool,
    serial_pattern: re.Pattern[str] | None,
    guest_timeout: float,
    force: bool,
    link: AgentLink | None = None,
    online_them: bool = True,
) -> AddResult:
    forced = check_device_add(run, launch, "cpu add", force)
    client = link.client if link is not None and wait_guest else None
    source_detail = link.why_not() if link is not None and client is None else None
    before: set[int] = set()
    if client is not None:
        try:
            before = set(guest_vcpus(client))
        except AgentError as error:
            client, source_detail = None, str(error)
    cpus = _query(session, run, launch)
    targets = choose_free_slots(cpus, count, slot, launch, run)
    ids = [cpu_device_id(t.index) for t in targets]
    steps = [
        Step("device_add", {"driver": t.type, "id": dev_id, **t.props})
        for t, dev_id in zip(targets, ids, strict=True)
    ]
    events = (OST_EVENT,) if wait_guest else ()
    serial_offset = serial_size(run)
    started = time.monotonic()

    def acknowledged(listener: Events | None) -> dict[str, tuple[bool, float, str | None]]:
        return wait_acks(listener, ids, guest_timeout, started) if listener else {}

    acks = plug(session, run, Plug("cpu add", steps, independent=True, events=events), acknowledged)
    assert acks is not None
    online: Online = {}
    by_agent: dict[str, GuestOnline] = {}
    if wait_guest:
        # a vCPU the guest rejected will not come up: looked at once, not waited for
        rejected = {d for d in ids if d in acks and not acks[d][0]}
        if client is not None:
            try:
                by_agent = agent_wait_online(
                    client, session, ids, rejected, before, guest_timeout, started, online_them
                )
            except AgentError as error:  # the agent went away: the registers still tell
                client, source_detail = None, str(error)
        if client is None:
            online = wait_online(session, ids, rejected, guest_timeout, started)
        else:
            online = {d: (g.online, g.seconds, g.detail) for d, g in by_agent.items()}
    serial = None
    if serial_pattern is not None:
        remaining = max(guest_timeout - (time.monotonic() - started), 0.0)
        matched = wait_serial(run, serial_pattern, serial_offset, remaining)
        serial = SerialWait(serial_pattern.pattern, matched, since(started))
    added = [
        _added(t, d, acks.get(d), online.get(d), wait_guest, by_agent.get(d))
        for t, d in zip(targets, ids, strict=True)
    ]
    return AddResult(
        name=run.name,
        added=added,
        present=cpus.present + sum(t.vcpus_count for t in targets),
        max=cpus.max,
        waited_guest=wait_guest,
        guest_timeout=guest_timeout if wait_guest or serial_pattern else None,
        serial=serial,
        forced_after_unplug=forced,
        source=(SOURCE_AGENT if client is not None else SOURCE_QEMU) if wait_guest else None,
        source_detail=source_detail if wait_guest else None,
        no_online=not online_them,
    )


def _added(
    target: CpuSlot,
    dev_id: str,
    ack: tuple[bool, float, str | None] | None,
    online: tuple[bool | None, float | None, str | None] | None,
    waited: bool,
    guest: GuestOnline | None = None,
) -> AddedCpu:
    if not waited or online is None:
        return AddedCpu(dev_id, target.type, dict(target.props))
    return AddedCpu(
        id=dev_id,
        driver=target.type,
        props=dict(target.props),
        acknowledged=bool(ack and ack[0]),
        ack_seconds=ack[1] if ack else None,
        ack_detail=ack[2] if ack else None,
        online=online[0],
        online_seconds=online[1],
        online_detail=online[2],
        guest_cpu=guest.logical_id if guest else None,
        onlined_by_qvm=guest.onlined_by_qvm if guest else False,
    )


def add_cpus(
    run: RunDir,
    count: int = 1,
    slot: dict[str, int] | None = None,
    wait_guest: bool = False,
    serial_pattern: re.Pattern[str] | None = None,
    guest_timeout: float = DEFAULT_GUEST_TIMEOUT,
    force: bool = False,
    online_them: bool = True,
) -> AddResult:
    """Plug ``count`` vCPUs into the lowest free slots (or into ``slot``).

    ``wait_guest`` waits for the guest's ACPI acknowledgement of each new vCPU (which
    tells a refusal), then until the guest has it online: the guest agent's word when it
    answers (a vCPU the guest leaves offline is onlined, unless not ``online_them``),
    else the vCPU's registers; ``serial_pattern`` waits for a line the guest prints on
    its serial console.
    """
    check_count(run.name, count)  # said first, running or not
    with opened(run) as (session, launch), _maybe_agent(run, wait_guest) as link:
        return _add(
            session,
            run,
            launch,
            count,
            slot,
            wait_guest,
            serial_pattern,
            guest_timeout,
            force,
            link,
            online_them,
        )


@contextlib.contextmanager
def _maybe_agent(run: RunDir, wanted: bool) -> Iterator[AgentLink | None]:
    if not wanted:
        yield None
        return
    with agent_link(run) as link:
        yield link


# --- remove ------------------------------------------------------------------------------


class Unplug(Record):
    id: str
    props: dict[str, int]
    outcome: str  # "removed", "refused" or "pending"
    seconds: float
    detail: str | None = None
    # the guest agent offlined it first: the guest's CPU number (None: not told)
    guest_cpu: int | None = None
    guest_offlined: bool = False

    def as_json(self) -> dict[str, Any]:
        return {**self._asdict(), "props": dict(self.props)}


class RemoveResult(Record):
    name: str
    unplugs: list[Unplug]
    present: int
    max: int
    timeout: float
    source: str = SOURCE_QEMU  # "agent" when the guest offlined the vCPUs first
    source_detail: str | None = None  # why not the agent

    def ids(self, outcome: str) -> list[str]:
        return [u.id for u in self.unplugs if u.outcome == outcome]

    @property
    def complete(self) -> bool:
        return all(u.outcome == "removed" for u in self.unplugs)

    def as_json(self) -> dict[str, Any]:
        unplugs = [u.as_json() for u in self.unplugs]
        return {**self._asdict(), "unplugs": unplugs, "complete": self.complete}


def legacy_refusal_message(name: str, dev_id: str, desc: str) -> str:
    return (
        f"{name}: {dev_id}: QEMU refused the unplug at once ({desc}): no guest OS has "
        "enabled ACPI CPU hotplug (none runs, or it is still booting), so nothing could "
        "release the vCPU; the VM is unchanged (hint: unplugging needs a guest kernel with "
        "ACPI CPU hotplug, e.g. Linux with CONFIG_ACPI_HOTPLUG_CPU; retry once it has booted)"
    )


class VcpuKind:
    """The vCPU as a device kind of the shared unplug: gone when QEMU lists its slot free
    (its DEVICE_DELETED names only its lapic child)."""

    noun = "vCPU"
    exact = False

    def __init__(self, run: RunDir, launch: LaunchRecord, targets: Sequence[CpuSlot]) -> None:
        self.run = run
        self.launch = launch
        self.props = {t.label: t.props for t in targets}
        self.last: CpuList | None = None  # what QEMU listed at the last look

    def refusal(self, run: RunDir, dev_id: str, desc: str) -> str:
        if LEGACY_REFUSAL in desc:
            return legacy_refusal_message(run.name, dev_id, desc)
        return f"{run.name}: device_del {dev_id}: {desc}"

    def accepted(self, run: RunDir, dev_id: str) -> None:
        if self.launch.accel == "tcg":
            record_cpu_unplug_request(run, [dev_id])

    def still_present(
        self, session: QmpSession, ids: Sequence[str], deleted: Collection[str]
    ) -> set[str]:
        """Query the slots; if a deleted vCPU is still listed, ask again for up to 1 s."""
        deadline = time.monotonic() + 1.0
        while True:
            present = self.present(session, ids)
            if not present & set(deleted) or time.monotonic() > deadline:
                return present
            time.sleep(0.02)

    def present(self, session: QmpSession, ids: Sequence[str]) -> set[str]:
        self.last = _query(session, self.run, self.launch)
        free = [s.props for s in self.last.slots if not s.present]
        return {i for i in ids if self.props[i] not in free}


def _remove(
    session: QmpSession,
    run: RunDir,
    launch: LaunchRecord,
    ids: Sequence[str] | None,
    count: int | None,
    timeout: float,
    link: AgentLink | None = None,
) -> RemoveResult:
    cpus = _query(session, run, launch)
    targets = choose_removals(cpus, ids, count, run.name)
    guest, source_detail = _offline_first(session, run, targets, link)
    kind = VcpuKind(run, launch, targets)
    # a vCPU's backend is QEMU's own: nothing to clean up after it
    unplugs = unplug(session, run, kind, {t.label: () for t in targets}, timeout)
    after = kind.last or cpus
    results = []
    for u in unplugs:
        offline = guest.get(u.id) if guest else None
        detail = u.detail
        if u.outcome == "refused" and offline is not None and offline.offlined:
            detail = _back_online(link, offline, detail)
        results.append(
            Unplug(
                u.id,
                dict(kind.props[u.id]),
                u.outcome,
                u.seconds,
                detail,
                offline.logical_id if offline else None,
                bool(offline and offline.offlined),
            )
        )
    source = SOURCE_AGENT if guest is not None else SOURCE_QEMU
    return RemoveResult(run.name, results, after.present, after.max, timeout, source, source_detail)


def _offline_first(
    session: QmpSession, run: RunDir, targets: Sequence[CpuSlot], link: AgentLink | None
) -> tuple[dict[str, GuestOffline] | None, str | None]:
    """Offline the vCPUs in the guest through its agent; (what was done, or None and why
    the agent could not)."""
    if link is None or link.client is None:
        return None, link.why_not() if link is not None else None
    try:
        guest = agent_offline(
            link.client, session, run.name, {t.label: t.qom_path for t in targets}, link.first
        )
    except AgentError as error:
        return None, str(error)
    if guest is None:
        return None, "the guest agent cannot read /proc/cpuinfo (guest-file-* blocked)"
    return guest, None


def _back_online(link: AgentLink | None, offline: GuestOffline, detail: str | None) -> str | None:
    """QEMU refused the unplug of a vCPU qvm offlined in the guest: put it back."""
    if link is None or link.client is None or offline.logical_id is None:
        return detail
    try:
        set_vcpus(link.client, {offline.logical_id: True})
    except AgentError as error:
        return f"{detail}; guest CPU {offline.logical_id} stays offline ({error})"
    return f"{detail}; guest CPU {offline.logical_id} is online again"


def remove_cpus(
    run: RunDir,
    ids: Sequence[str] | None = None,
    count: int | None = None,
    timeout: float = DEFAULT_UNPLUG_TIMEOUT,
) -> RemoveResult:
    """Unplug the vCPUs named by ``ids`` (or the ``count`` newest) and wait for the guest;
    when the guest agent answers, the guest offlines them first (``agent_offline``)."""
    with opened(run) as (session, launch), agent_link(run, first=CPU_VIEW) as link:
        try:
            return _remove(session, run, launch, ids, count, timeout, link)
        except BaseException:
            drop_cpu_view(link)  # in case it failed before reading it
            raise


# --- set -------------------------------------------------------------------------------


class SetResult(Record):
    name: str
    target: int
    before: int
    present: int
    max: int
    added: AddResult | None = None
    removed: RemoveResult | None = None

    @property
    def complete(self) -> bool:
        parts = [p for p in (self.added, self.removed) if p is not None]
        return self.present == self.target and all(p.complete for p in parts)

    def as_json(self) -> dict[str, Any]:
        return {
            **self._asdict(),
            "added": self.added.as_json() if self.added else None,
            "removed": self.removed.as_json() if self.removed else None,
            "complete": self.complete,
        }


def set_cpus(
    run: RunDir,
    target: int,
    timeout: float = DEFAULT_UNPLUG_TIMEOUT,
    wait_guest: bool = False,
    guest_timeout: float = DEFAULT_GUEST_TIMEOUT,
    force: bool = False,
    online_them: bool = True,
) -> SetResult:
    """Add or remove vCPUs until ``target`` are present."""
    name = run.name
    with opened(run) as (session, launch), agent_link(run) as link:
        cpus = _query(session, run, launch)
        fixed = sum(s.vcpus_count for s in cpus.slots if s.boot)
        if target > cpus.max:
            raise HotplugError(
                f"{name}: cannot set {target} vCPUs: maxcpus={cpus.max} "
                f"(hint: {restart_hint(run, launch, 'cpu.max')})"
            )
        if target < max(fixed, 1):
            raise HotplugError(
                f"{name}: cannot set {target} vCPUs: {fixed} boot vCPU"
                f"{'s' if fixed != 1 else ''} (started by -smp) cannot be unplugged"
            )
        before = cpus.present
        if target > before:
            added = _add(
                session,
                run,
                launch,
                target - before,
                None,
                wait_guest,
                None,
                guest_timeout,
                force,
                link,
                online_them,
            )
            return SetResult(name, target, before, added.present, cpus.max, added=added)
        if target < before:
            # unplug-pending vCPUs still count as present: only the others are asked
            removed = _remove(session, run, launch, None, before - target, timeout, link)
            return SetResult(name, target, before, removed.present, cpus.max, removed=removed)
        return SetResult(name, target, before, before, cpus.max)
