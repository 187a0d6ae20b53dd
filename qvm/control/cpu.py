"""vCPU hotplug on a running VM: list the slots, add, remove, set a count.

Slots come from QEMU (``query-hotpluggable-cpus``), never from arithmetic: this module
only orders them (QEMU lists free slots highest first; qvm fills the lowest first) and
names the devices it plugs with the stable ids of ``qvm.definition.topology`` (``cpu<slot index>``,
the same ids the boot-time ``-device`` vCPUs get).

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
- A guest acknowledges a new vCPU (``ACPI_DEVICE_OST``, source 1) in about 25 ms; that
  is its ACPI code taking the device, not the vCPU running. The vCPU stays at its reset
  state (HMP ``info registers N``: ``CR0=60000010``, paging off) until the guest starts it
  (INIT/SIPI), which Linux does only when it onlines the CPU (udev rule or equivalent),
  450-600 ms later under TCG; then CR0 has paging on (e.g. ``80050033``). HMP syncs the
  vCPU state first, so this reads the same under TCG and KVM, with no guest agent.

Nothing here prints: every operation returns a record (a ``typing.NamedTuple``) for
the CLI to render.
"""

from __future__ import annotations

import re
import time
from collections.abc import Iterable, Sequence
from typing import Any, NamedTuple

from qvm.control.guard import check_device_add, record_cpu_unplug_request
from qvm.control.session import ControlSession
from qvm.control.transaction import (
    OST_INSERT,
    PERIPHERAL_ANON,
    UNPLUG_EVENTS,
    launch_of,
    match_unplug_event,
    ost_status_text,
    restart_hint,
    since,
)
from qvm.definition.topology import Topology, cpu_device_id, slot_index
from qvm.errors import ControlError, HotplugError
from qvm.layout.rundir import RunDir
from qvm.store.pending import PERIPHERAL, device_state, mark_pending, pending_ids, unmark_pending

DEFAULT_UNPLUG_TIMEOUT = 5.0
DEFAULT_GUEST_TIMEOUT = 10.0
# how often --wait-guest reads the registers of a new vCPU
ONLINE_POLL = 0.015
CR0_PG = 1 << 31  # paging: set by any guest kernel that started the vCPU
# HMP `info registers`: a vCPU's block starts with `CPU#N`; CR0 is one of its fields
CPU_HEADER = re.compile(r"^CPU#(\d+)[ \t\r]*$", re.M)
CR0_FIELD = re.compile(r"\bCR0=([0-9a-fA-F]+)\b")
# QEMU's immediate refusal while the chipset is still in legacy CPU-hotplug mode
LEGACY_REFUSAL = "device unplug request for not supported device type"
SLOT_KEYS = ("node-id", "drawer-id", "book-id", "socket-id", "die-id", "cluster-id", "core-id")


# --- the slots -----------------------------------------------------------------------


class CpuSlot(NamedTuple):
    """One vCPU slot of the VM, present or free."""

    index: int  # position in topology order: slot 0 is the boot vCPU
    props: dict[str, int]  # QEMU's dict, as device_add wants it
    type: str  # the device driver for this slot
    vcpus_count: int = 1
    qom_path: str | None = None  # None: the slot is free
    cpu_index: int | None = None
    thread_id: int | None = None
    id: str | None = None  # the device id; None for a vCPU from -smp
    removable: bool = False
    pending: bool = False  # device_del was requested, the guest has not released it

    @property
    def present(self) -> bool:
        return self.qom_path is not None

    @property
    def state(self) -> str:
        if not self.present:
            return "free"
        return device_state(self.pending)

    @property
    def boot(self) -> bool:
        """Started by -smp (not a device): it can never be unplugged."""
        return self.present and not self.removable

    @property
    def label(self) -> str:
        """How the CLI names the vCPU: its id (a QOM path for a device added without
        one), or for a -smp vCPU and a free slot the qvm id the slot would get."""
        if self.id:
            return self.id
        if self.removable and self.qom_path:
            return self.qom_path
        return cpu_device_id(self.index)

    def props_text(self) -> str:
        return props_text(self.props)

    def as_json(self) -> dict[str, Any]:
        return {
            "index": self.index,
            "props": dict(self.props),
            "type": self.type,
            "vcpus_count": self.vcpus_count,
            "present": self.present,
            "state": self.state,
            "qom_path": self.qom_path,
            "cpu_index": self.cpu_index,
            "thread_id": self.thread_id,
            "id": self.id,
            "removable": self.removable,
            "boot": self.boot,
        }


class CpuList(NamedTuple):
    name: str
    slots: list[CpuSlot]

    @property
    def max(self) -> int:
        return sum(s.vcpus_count for s in self.slots)

    @property
    def present(self) -> int:
        return sum(s.vcpus_count for s in self.slots if s.present)

    @property
    def pending(self) -> int:
        return sum(1 for s in self.slots if s.pending and s.present)

    def free(self) -> list[CpuSlot]:
        """Free slots, lowest first: the order ``cpu add`` fills them in."""
        return [s for s in self.slots if not s.present]

    def summary(self) -> str:
        text = f"{self.present} of {self.max} vCPUs present"
        if self.pending:
            text += f", {self.pending} unplug pending"
        return text


def props_text(props: dict[str, int]) -> str:
    """``socket-id=0,core-id=1,thread-id=0``: outermost level first, as --slot takes it."""
    order = {k: i for i, k in enumerate((*SLOT_KEYS, "thread-id"))}
    keys = sorted(props, key=lambda k: order.get(k, len(order)))
    return ",".join(f"{k}={props[k]}" for k in keys)


def peripheral_id(qom_path: str | None) -> str | None:
    """``/machine/peripheral/cpu2`` -> ``cpu2``; anything else (a -smp vCPU) -> None."""
    if qom_path and qom_path.startswith(PERIPHERAL):
        rest = qom_path[len(PERIPHERAL) :]
        if rest and "/" not in rest:
            return rest
    return None


def slot_order_key(props: dict[str, int], topo: Topology | None) -> tuple[int, ...]:
    if topo is not None:
        return (slot_index(props, topo),)
    return tuple(props.get(k, 0) for k in (*SLOT_KEYS, "thread-id"))


def merge_slots(
    hotpluggable: Sequence[dict[str, Any]],
    cpus_fast: Sequence[dict[str, Any]],
    pending_ids: Iterable[str] = (),
    topo: Topology | None = None,
) -> list[CpuSlot]:
    """One ``CpuSlot`` per entry of ``query-hotpluggable-cpus``, in topology order,
    completed from ``query-cpus-fast`` (cpu index, host thread) and the pending marks."""
    pending = set(pending_ids)
    by_path = {c.get("qom-path"): c for c in cpus_fast}
    ordered = sorted(hotpluggable, key=lambda h: slot_order_key(h.get("props", {}), topo))
    slots = []
    for position, entry in enumerate(ordered):
        props = dict(entry.get("props", {}))
        qom_path = entry.get("qom-path")
        running = by_path.get(qom_path, {}) if qom_path else {}
        dev_id = peripheral_id(qom_path)
        index = slot_index(props, topo) if topo is not None else position
        slots.append(
            CpuSlot(
                index=index,
                props=props,
                type=entry.get("type", ""),
                vcpus_count=int(entry.get("vcpus-count", 1)),
                qom_path=qom_path,
                cpu_index=running.get("cpu-index"),
                thread_id=running.get("thread-id"),
                id=dev_id,
                removable=dev_id is not None or (qom_path or "").startswith(PERIPHERAL_ANON),
                pending=dev_id is not None and dev_id in pending,
            )
        )
    return slots


def parse_slot_spec(text: str) -> dict[str, int]:
    """``socket-id=0,core-id=1,thread-id=0`` -> props (integers, QEMU's key names)."""
    props: dict[str, int] = {}
    for part in text.split(","):
        key, sep, value = part.strip().partition("=")
        if not sep or not key:
            raise ValueError(f"expected key=value pairs like socket-id=0,core-id=1, got {text!r}")
        try:
            props[key.strip()] = int(value)
        except ValueError:
            raise ValueError(f"{key.strip()} must be an integer, got {value!r}") from None
    return props


def topology_from_launch(launch: dict[str, Any]) -> Topology | None:
    topo = launch.get("topology")
    if not isinstance(topo, dict):
        return None
    try:
        return Topology(
            sockets=int(topo["sockets"]),
            dies=int(topo.get("dies", 1)),
            cores=int(topo["cores"]),
            threads=int(topo["threads"]),
        )
    except (KeyError, TypeError, ValueError):
        return None


# --- reading the live slots --------------------------------------------------------------


def _query(session: ControlSession, run: RunDir, launch: dict[str, Any]) -> CpuList:
    hotpluggable = session.execute("query-hotpluggable-cpus")
    cpus_fast = session.execute("query-cpus-fast")
    slots = merge_slots(hotpluggable, cpus_fast, pending_ids(run), topology_from_launch(launch))
    return CpuList(run.name, slots)


def list_cpus(run: RunDir) -> CpuList:
    launch = launch_of(run)
    with ControlSession(run) as session:
        return _query(session, run, launch)


def _raise_max_hint(run: RunDir, launch: dict[str, Any]) -> str:
    return restart_hint(run, launch, "cpu.max")


# --- add -------------------------------------------------------------------------------


class AddedCpu(NamedTuple):
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

    def as_json(self) -> dict[str, Any]:
        return {
            "id": self.id,
            "driver": self.driver,
            "props": dict(self.props),
            "acknowledged": self.acknowledged,
            "ack_seconds": self.ack_seconds,
            "ack_detail": self.ack_detail,
            "online": self.online,
            "online_seconds": self.online_seconds,
            "online_detail": self.online_detail,
        }


class SerialWait(NamedTuple):
    pattern: str
    matched: str | None  # the matching line; None: not seen before the timeout
    seconds: float

    def as_json(self) -> dict[str, Any]:
        return {"pattern": self.pattern, "matched": self.matched, "seconds": self.seconds}


class AddResult(NamedTuple):
    name: str
    added: list[AddedCpu]
    present: int
    max: int
    waited_guest: bool = False
    guest_timeout: float | None = None
    serial: SerialWait | None = None
    forced_after_unplug: bool = False

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
            "complete": self.complete,
        }


def choose_free_slots(
    cpus: CpuList,
    count: int,
    slot: dict[str, int] | None,
    launch: dict[str, Any],
    run: RunDir,
) -> list[CpuSlot]:
    """The slots ``cpu add`` will fill: the lowest free ones, or the one asked for."""
    name = run.name
    if count < 1:
        raise HotplugError(f"{name}: --count must be at least 1, got {count}")
    if slot is not None:
        if count != 1:
            raise HotplugError(f"{name}: --slot names one slot; use it with --count 1")
        matches = [s for s in cpus.slots if all(s.props.get(k) == v for k, v in slot.items())]
        spec = props_text(slot)
        if len(matches) != 1:
            choices = " ".join(s.props_text() for s in cpus.free()) or "none"
            problem = "no vCPU slot" if not matches else f"{len(matches)} vCPU slots match"
            raise HotplugError(
                f"{name}: {problem} {spec} (hint: free slots: {choices}; see qvm cpu list {name})"
            )
        chosen = matches[0]
        if chosen.present:
            holder = chosen.id or "the boot vCPU"
            raise HotplugError(
                f"{name}: slot {chosen.props_text()} is already taken by {holder} "
                f"(hint: qvm cpu list {name} shows the free slots)"
            )
        return [chosen]
    free = cpus.free()
    if len(free) >= count:
        return free[:count]
    where = f"{cpus.present} of {cpus.max} present (maxcpus={cpus.max})"
    hint = _raise_max_hint(run, launch)
    if not free:
        boot, cpu_max = launch.get("vcpus_boot"), launch.get("vcpus_max")
        if boot is not None and boot == cpu_max and cpus.present == cpu_max:
            raise HotplugError(
                f"{name}: no free vCPU slot: {where}; it was started with cpu.count = "
                f"cpu.max = {cpu_max}, which leaves no slot to hotplug into (hint: {hint})"
            )
        raise HotplugError(f"{name}: no free vCPU slot: {where} (hint: {hint})")
    raise HotplugError(
        f"{name}: only {len(free)} free vCPU slot{'s' if len(free) != 1 else ''} for "
        f"{count} new vCPUs: {where} (hint: add fewer, or {hint})"
    )


def _serial_size(run: RunDir) -> int:
    try:
        return run.serial_log.stat().st_size
    except OSError:
        return 0


def wait_serial(run: RunDir, pattern: re.Pattern[str], offset: int, timeout: float) -> str | None:
    """The first line matching ``pattern`` that the guest wrote after ``offset``."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            with open(run.serial_log, "rb") as handle:
                handle.seek(offset)
                text = handle.read().decode(errors="replace")
        except OSError:
            text = ""
        for line in text.splitlines():
            if pattern.search(line):
                return line.strip()
        if time.monotonic() > deadline:
            return None
        time.sleep(0.01)


def _add(
    session: ControlSession,
    run: RunDir,
    launch: dict[str, Any],
    count: int,
    slot: dict[str, int] | None,
    wait_guest: bool,
    serial_pattern: re.Pattern[str] | None,
    guest_timeout: float,
    force: bool,
) -> AddResult:
    forced = check_device_add(run, launch, "cpu add", force)
    cpus = _query(session, run, launch)
    targets = choose_free_slots(cpus, count, slot, launch, run)
    events = session.listen(["ACPI_DEVICE_OST"]) if wait_guest else None
    serial_offset = _serial_size(run)
    started = time.monotonic()
    plugged: list[tuple[CpuSlot, str]] = []
    try:
        for target in targets:
            dev_id = cpu_device_id(target.index)
            arguments = {"driver": target.type, "id": dev_id, **target.props}
            try:
                session.execute("device_add", arguments)
            except ControlError as error:
                if not plugged or error.qemu_exited:
                    raise
                done = ", ".join(d for _, d in plugged)
                raise HotplugError(
                    f"{run.name}: added {done}, then device_add {dev_id} failed: "
                    f"{error.qemu_desc or error}"
                ) from error
            plugged.append((target, dev_id))
        acks = _wait_acks(events, [d for _, d in plugged], guest_timeout, started) if events else {}
    finally:
        if events is not None:
            events.close()
    online: dict[str, tuple[bool | None, float | None, str | None]] = {}
    if wait_guest:
        ids = [d for _, d in plugged]
        # a vCPU the guest rejected will not come up: looked at once, not waited for
        rejected = {d for d in ids if d in acks and not acks[d][0]}
        online = _wait_online(session, ids, rejected, guest_timeout, started)
    serial = None
    if serial_pattern is not None:
        remaining = max(guest_timeout - (time.monotonic() - started), 0.0)
        matched = wait_serial(run, serial_pattern, serial_offset, remaining)
        serial = SerialWait(serial_pattern.pattern, matched, round(time.monotonic() - started, 3))
    added = []
    for target, dev_id in plugged:
        ack = acks.get(dev_id) if wait_guest else None
        added.append(
            AddedCpu(
                id=dev_id,
                driver=target.type,
                props=dict(target.props),
                acknowledged=None if not wait_guest else bool(ack and ack[0]),
                ack_seconds=ack[1] if ack else None,
                ack_detail=ack[2] if ack else None,
                online=online[dev_id][0] if wait_guest else None,
                online_seconds=online[dev_id][1] if wait_guest else None,
                online_detail=online[dev_id][2] if wait_guest else None,
            )
        )
    return AddResult(
        name=run.name,
        added=added,
        present=cpus.present + sum(t.vcpus_count for t, _ in plugged),
        max=cpus.max,
        waited_guest=wait_guest,
        guest_timeout=guest_timeout if wait_guest or serial_pattern else None,
        serial=serial,
        forced_after_unplug=forced,
    )


def _wait_acks(
    events: Any, ids: list[str], timeout: float, started: float
) -> dict[str, tuple[bool, float, str | None]]:
    """id -> (acknowledged OK, seconds after the first device_add, failure text)."""
    acks: dict[str, tuple[bool, float, str | None]] = {}
    deadline = started + timeout
    while len(acks) < len(ids):
        event = events.get(max(deadline - time.monotonic(), 0.0))
        if event is None:
            if time.monotonic() >= deadline:
                break
            continue
        info = (event.get("data") or {}).get("info") or {}
        dev_id = info.get("device")
        if dev_id in ids and info.get("source") == OST_INSERT and dev_id not in acks:
            status = info.get("status", 0)
            detail = None if status == 0 else ost_status_text(status)
            acks[dev_id] = (status == 0, round(time.monotonic() - started, 3), detail)
    return acks


def cr0_by_cpu(text: str) -> dict[int, int]:
    """CR0 of each vCPU in HMP ``info registers`` output (one vCPU, or all with ``-a``).

    Each vCPU's block starts with a line ``CPU#N``; its CR0 is on the line
    ``CR0=80050033 CR2=... CR3=... CR4=...``. Text without such a block (``CPU#7 not
    available``) gives nothing.
    """
    headers = list(CPU_HEADER.finditer(text))
    found: dict[int, int] = {}
    for position, header in enumerate(headers):
        end = headers[position + 1].start() if position + 1 < len(headers) else len(text)
        cr0 = CR0_FIELD.search(text, header.end(), end)
        if cr0 is not None:
            found[int(header.group(1))] = int(cr0.group(1), 16)
    return found


def started_by_guest(cr0: int) -> bool:
    """A vCPU with paging on runs guest kernel code; a new one sits at its reset state
    (``CR0=60000010``) until the guest starts it."""
    return bool(cr0 & CR0_PG)


def _cpu_indexes(session: ControlSession, ids: list[str]) -> dict[str, int]:
    """device id -> QEMU's cpu-index, matched by QOM path in ``query-cpus-fast``."""
    by_path = {c.get("qom-path"): c.get("cpu-index") for c in session.execute("query-cpus-fast")}
    found = {dev_id: by_path.get(f"{PERIPHERAL}{dev_id}") for dev_id in ids}
    return {dev_id: index for dev_id, index in found.items() if isinstance(index, int)}


def _read_cr0(session: ControlSession, cpu_index: int) -> tuple[int | None, str | None]:
    """(CR0, None), or (None, why it could not be read)."""
    command = f"info registers {cpu_index}"
    try:
        text = session.execute("human-monitor-command", {"command-line": command})
    except ControlError as error:
        if error.qemu_exited:
            raise
        return None, f"HMP {command}: {error.qemu_desc or error}"
    cr0 = cr0_by_cpu(text if isinstance(text, str) else "").get(cpu_index)
    if cr0 is None:
        shown = " ".join(str(text).split())[:80] or "nothing"
        return None, f"HMP {command} printed no CR0 ({shown})"
    return cr0, None


def _wait_online(
    session: ControlSession, ids: list[str], rejected: set[str], timeout: float, started: float
) -> dict[str, tuple[bool | None, float | None, str | None]]:
    """id -> (started by the guest, seconds after the first device_add, why unknown).

    Reads each new vCPU's registers every ``ONLINE_POLL`` s until its CR0 has paging on,
    or ``timeout`` s after the first device_add. Every vCPU is looked at at least once.
    """
    indexes = _cpu_indexes(session, ids)
    results: dict[str, tuple[bool | None, float | None, str | None]] = {}
    for dev_id in ids:
        if dev_id not in indexes:
            results[dev_id] = (None, None, f"QEMU lists no {PERIPHERAL}{dev_id} in query-cpus-fast")
    deadline = started + timeout
    while True:
        for dev_id in ids:
            if dev_id in results:
                continue
            cr0, why = _read_cr0(session, indexes[dev_id])
            if cr0 is None:
                results[dev_id] = (None, None, why)
            elif started_by_guest(cr0):
                results[dev_id] = (True, since(started), None)
        waiting = [d for d in ids if d not in results and d not in rejected]
        if not waiting or time.monotonic() >= deadline:
            break
        time.sleep(ONLINE_POLL)
    return {d: results.get(d, (False, None, None)) for d in ids}


def add_cpus(
    run: RunDir,
    count: int = 1,
    slot: dict[str, int] | None = None,
    wait_guest: bool = False,
    serial_pattern: re.Pattern[str] | None = None,
    guest_timeout: float = DEFAULT_GUEST_TIMEOUT,
    force: bool = False,
) -> AddResult:
    """Plug ``count`` vCPUs into the lowest free slots (or into ``slot``).

    ``wait_guest`` waits for the guest's ACPI acknowledgement of each new vCPU (which
    tells a refusal), then until the guest has started running on it (online);
    ``serial_pattern`` waits for a line the guest prints on its serial console.
    """
    launch = launch_of(run)
    with ControlSession(run) as session:
        return _add(
            session, run, launch, count, slot, wait_guest, serial_pattern, guest_timeout, force
        )


# --- remove ------------------------------------------------------------------------------


class Unplug(NamedTuple):
    id: str
    props: dict[str, int]
    outcome: str  # "removed", "refused" or "pending"
    seconds: float
    detail: str | None = None

    def as_json(self) -> dict[str, Any]:
        return {
            "id": self.id,
            "props": dict(self.props),
            "outcome": self.outcome,
            "seconds": self.seconds,
            "detail": self.detail,
        }


class RemoveResult(NamedTuple):
    name: str
    unplugs: list[Unplug]
    present: int
    max: int
    timeout: float

    def ids(self, outcome: str) -> list[str]:
        return [u.id for u in self.unplugs if u.outcome == outcome]

    @property
    def complete(self) -> bool:
        return all(u.outcome == "removed" for u in self.unplugs)

    def as_json(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "unplugs": [u.as_json() for u in self.unplugs],
            "present": self.present,
            "max": self.max,
            "timeout": self.timeout,
            "complete": self.complete,
        }


def choose_removals(
    cpus: CpuList, ids: Sequence[str] | None, count: int | None, name: str
) -> list[CpuSlot]:
    """The vCPUs ``cpu del`` will unplug: those named, or the ``count`` newest
    (highest slot first: ``cpu add`` fills the lowest free slot, so that is the newest)."""
    removable = [s for s in cpus.slots if s.present and s.removable]
    if ids:
        chosen: list[CpuSlot] = []
        for wanted in ids:
            found = [s for s in cpus.slots if wanted in (s.id, s.qom_path)]
            if found and found[0].removable:
                if found[0] not in chosen:
                    chosen.append(found[0])
                continue
            boot = [s for s in cpus.slots if s.boot and wanted in (s.label, s.qom_path)]
            if found or boot:
                raise HotplugError(
                    f"{name}: {wanted} is a boot vCPU (started by -smp, not as a device): "
                    "it cannot be unplugged"
                )
            free = [s for s in cpus.slots if not s.present and s.label == wanted]
            if free:
                raise HotplugError(
                    f"{name}: {wanted} is not present (its slot {free[0].props_text()} is free)"
                )
            names = ", ".join(s.label for s in removable) or "none"
            raise HotplugError(
                f"{name}: no vCPU with id {wanted!r} (removable: {names}) "
                f"(hint: qvm cpu list {name})"
            )
        return chosen
    wanted_count = 1 if count is None else count
    if wanted_count < 1:
        raise HotplugError(f"{name}: --count must be at least 1, got {wanted_count}")
    candidates = [s for s in removable if not s.pending]
    if wanted_count > len(candidates):
        names = ", ".join(s.label for s in candidates)
        have = (
            f"only {len(candidates)} can be unplugged ({names})"
            if candidates
            else ("no vCPU can be unplugged")
        )
        pending = f", {cpus.pending} already unplug-pending" if cpus.pending else ""
        raise HotplugError(
            f"{name}: cannot remove {wanted_count} vCPU{'s' if wanted_count != 1 else ''}: "
            f"{have}{pending}; the boot vCPU stays"
        )
    return sorted(candidates, key=lambda s: s.index, reverse=True)[:wanted_count]


def legacy_refusal_message(name: str, dev_id: str, desc: str) -> str:
    return (
        f"{name}: {dev_id}: QEMU refused the unplug at once ({desc}): no guest OS has "
        "enabled ACPI CPU hotplug (none runs, or it is still booting), so nothing could "
        "release the vCPU; the VM is unchanged (hint: unplugging needs a guest kernel with "
        "ACPI CPU hotplug, e.g. Linux with CONFIG_ACPI_HOTPLUG_CPU; retry once it has booted)"
    )


def _remove(
    session: ControlSession,
    run: RunDir,
    launch: dict[str, Any],
    ids: Sequence[str] | None,
    count: int | None,
    timeout: float,
) -> RemoveResult:
    cpus = _query(session, run, launch)
    targets = choose_removals(cpus, ids, count, run.name)
    by_id = {t.label: t for t in targets}
    started = time.monotonic()
    outcomes: dict[str, tuple[str, float, str | None]] = {}
    deleted: dict[str, float] = {}
    accepted: list[str] = []
    events = session.listen(UNPLUG_EVENTS)  # before device_del: nothing can be missed
    try:
        for target in targets:
            try:
                session.execute("device_del", {"id": target.id or target.label})
            except ControlError as error:
                desc = error.qemu_desc
                if desc is None or error.qemu_exited:
                    raise
                message = (
                    legacy_refusal_message(run.name, target.label, desc)
                    if LEGACY_REFUSAL in desc
                    else f"{run.name}: device_del {target.label}: {desc}"
                )
                if not accepted:
                    raise HotplugError(message) from error
                outcomes[target.label] = ("refused", since(started), message)
                continue
            accepted.append(target.label)
            if launch.get("accel") == "tcg":
                record_cpu_unplug_request(run, [target.label])
        deadline = started + timeout
        waiting = set(accepted)
        while waiting:
            event = events.get(max(deadline - time.monotonic(), 0.0))
            if event is None:
                if time.monotonic() >= deadline:
                    break
                continue
            dev_id, what, detail = match_unplug_event(event, waiting)
            if what == "deleted":
                deleted[dev_id] = since(started)
                waiting.discard(dev_id)
            elif what == "refused":
                outcomes[dev_id] = ("refused", since(started), detail)
                waiting.discard(dev_id)
    finally:
        events.close()
    # the event is a hint, QEMU's own list of free slots is the fact
    after = _confirm_free(session, run, launch, list(deleted))
    unplugs = [_outcome(t, outcomes, deleted, after, started, timeout) for t in targets]
    pending = [u.id for u in unplugs if u.outcome == "pending"]
    if pending:
        mark_pending(run, pending)
        # DEVICE_DELETED may have come between the last look and the mark (and the
        # supervisor then had nothing to clear): look once more
        after = _query(session, run, launch)
        late = [i for i in pending if _slot_free(after, by_id[i])]
        if late:
            unmark_pending(run, late)
            unplugs = [
                u._replace(outcome="removed", detail=None) if u.id in late else u for u in unplugs
            ]
    return RemoveResult(run.name, unplugs, after.present, after.max, timeout)


def _outcome(
    target: CpuSlot,
    outcomes: dict[str, tuple[str, float, str | None]],
    deleted: dict[str, float],
    after: CpuList,
    started: float,
    timeout: float,
) -> Unplug:
    label = target.label
    if label in outcomes:
        outcome, seconds, detail = outcomes[label]
        return Unplug(label, dict(target.props), outcome, seconds, detail)
    if _slot_free(after, target):
        return Unplug(label, dict(target.props), "removed", deleted.get(label, since(started)))
    if label in deleted:
        detail = "QEMU sent DEVICE_DELETED but still lists the vCPU"
    else:
        detail = f"the guest has not released it within {timeout:g} s"
    return Unplug(label, dict(target.props), "pending", since(started), detail)


def _slot_free(cpus: CpuList, target: CpuSlot) -> bool:
    return any(s.props == target.props and not s.present for s in cpus.slots)


def _confirm_free(
    session: ControlSession, run: RunDir, launch: dict[str, Any], deleted: list[str]
) -> CpuList:
    """Query the slots; if a deleted vCPU is still listed, ask again for up to 1 s."""
    deadline = time.monotonic() + 1.0
    while True:
        cpus = _query(session, run, launch)
        still = [s for s in cpus.slots if s.present and s.id in deleted]
        if not still or time.monotonic() > deadline:
            return cpus
        time.sleep(0.02)


def remove_cpus(
    run: RunDir,
    ids: Sequence[str] | None = None,
    count: int | None = None,
    timeout: float = DEFAULT_UNPLUG_TIMEOUT,
) -> RemoveResult:
    """Unplug the vCPUs named by ``ids`` (or the ``count`` newest) and wait for the guest."""
    launch = launch_of(run)
    with ControlSession(run) as session:
        return _remove(session, run, launch, ids, count, timeout)


# --- set -------------------------------------------------------------------------------


class SetResult(NamedTuple):
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
            "name": self.name,
            "target": self.target,
            "before": self.before,
            "present": self.present,
            "max": self.max,
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
) -> SetResult:
    """Add or remove vCPUs until ``target`` are present."""
    launch = launch_of(run)
    name = run.name
    with ControlSession(run) as session:
        cpus = _query(session, run, launch)
        fixed = sum(s.vcpus_count for s in cpus.slots if s.boot)
        if target > cpus.max:
            raise HotplugError(
                f"{name}: cannot set {target} vCPUs: maxcpus={cpus.max} "
                f"(hint: {_raise_max_hint(run, launch)})"
            )
        if target < max(fixed, 1):
            raise HotplugError(
                f"{name}: cannot set {target} vCPUs: {fixed} boot vCPU"
                f"{'s' if fixed != 1 else ''} (started by -smp) cannot be unplugged"
            )
        before = cpus.present
        if target > before:
            added = _add(
                session, run, launch, target - before, None, wait_guest, None, guest_timeout, force
            )
            return SetResult(name, target, before, added.present, cpus.max, added=added)
        if target < before:
            # unplug-pending vCPUs still count as present: only the others are asked
            removed = _remove(session, run, launch, None, before - target, timeout)
            return SetResult(name, target, before, removed.present, cpus.max, removed=removed)
        return SetResult(name, target, before, before, cpus.max)
