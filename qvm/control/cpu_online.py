"""Whether the guest took the vCPUs qvm plugged: its ACPI acknowledgement, the vCPU
running, a line on its serial console.

A guest acknowledges a new vCPU (``ACPI_DEVICE_OST``, source 1) in about 25 ms; that is
its ACPI code taking the device, not the vCPU running. The vCPU stays at its reset state
(HMP ``info registers N``: ``CR0=60000010``, paging off) until the guest starts it
(INIT/SIPI), which Linux does only when it onlines the CPU (udev rule or equivalent),
450-600 ms later under TCG; then CR0 has paging on (e.g. ``80050033``). HMP syncs the
vCPU state first, so this reads the same under TCG and KVM, with no guest agent.

When the guest agent answers, its word wins: ``guest-get-vcpus`` says which guest CPUs
are online, a new vCPU the guest leaves offline is onlined with ``guest-set-vcpus``, and
a vCPU is offlined in the guest before it is unplugged (``agent_offline``).
"""

from __future__ import annotations

import contextlib
import re
import time
from typing import Any

from qvm.base.record import Record
from qvm.control.agent import AgentClient
from qvm.control.events import insert_ack
from qvm.control.guest_agent_facts import (
    guest_apicids,
    guest_cpu_view,
    guest_vcpus,
    match_vcpus,
    set_vcpus,
)
from qvm.control.qmp_session import Events, QmpSession
from qvm.control.transaction import since
from qvm.errors import AgentError, ControlError, HotplugError
from qvm.layout.rundir import RunDir
from qvm.store.pending import PERIPHERAL
from qvm.supervisor.qmp_replies import cpus_fast

# how often --wait-guest reads the registers of a new vCPU
ONLINE_POLL = 0.015
CR0_PG = 1 << 31  # paging: set by any guest kernel that started the vCPU
# HMP `info registers`: a vCPU's block starts with `CPU#N`; CR0 is one of its fields
CPU_HEADER = re.compile(r"^CPU#(\d+)[ \t\r]*$", re.M)
CR0_FIELD = re.compile(r"\bCR0=([0-9a-fA-F]+)\b")
# id -> (started by the guest, seconds after the first device_add, why unknown)
Online = dict[str, "tuple[bool | None, float | None, str | None]"]


class SerialWait(Record):
    pattern: str
    matched: str | None  # the matching line; None: not seen before the timeout
    seconds: float

    def as_json(self) -> dict[str, Any]:
        return self._asdict()


def serial_size(run: RunDir) -> int:
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


def wait_acks(
    events: Events, ids: list[str], timeout: float, started: float
) -> dict[str, tuple[bool, float, str | None]]:
    """id -> (acknowledged OK, seconds after the first device_add, failure text)."""
    acks: dict[str, tuple[bool, float, str | None]] = {}

    def all_answered(event: dict[str, Any]) -> bool:
        ack = insert_ack(event, ids)
        if ack is not None and ack[0] not in acks:
            dev_id, accepted, detail = ack
            acks[dev_id] = (accepted, since(started), detail)
        return len(acks) == len(ids)

    if ids:
        events.wait(all_answered, started + timeout)
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


def _cpu_indexes(session: QmpSession, ids: list[str]) -> dict[str, int]:
    """device id -> QEMU's cpu-index, matched by QOM path in ``query-cpus-fast``."""
    running = cpus_fast(session.execute("query-cpus-fast"))
    by_path = {c.qom_path: c.cpu_index for c in running}
    found = {dev_id: by_path.get(f"{PERIPHERAL}{dev_id}") for dev_id in ids}
    return {dev_id: index for dev_id, index in found.items() if isinstance(index, int)}


def _read_cr0(session: QmpSession, cpu_index: int) -> tuple[int | None, str | None]:
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


def wait_online(
    session: QmpSession, ids: list[str], rejected: set[str], timeout: float, started: float
) -> Online:
    """id -> (started by the guest, seconds after the first device_add, why unknown).

    Reads each new vCPU's registers every ``ONLINE_POLL`` s until its CR0 has paging on,
    or ``timeout`` s after the first device_add. Every vCPU is looked at at least once.
    """
    indexes = _cpu_indexes(session, ids)
    results: Online = {}
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


# --- the guest agent's word ----------------------------------------------------------------

# how often the agent is asked while waiting for new vCPUs
AGENT_POLL = 0.05
# a guest that onlines hotplugged CPUs itself (udev) does so 450-600 ms after the plug
# under TCG: qvm onlines a vCPU the guest has left offline this long after it appeared
ONLINE_GRACE = 2.0


class GuestOnline(Record):
    """A new vCPU as the guest agent sees it."""

    logical_id: int | None  # the guest's CPU number; None: it never appeared
    online: bool
    seconds: float | None  # after the first device_add, until online
    onlined_by_qvm: bool = False
    detail: str | None = None  # what went wrong (the agent's message)


def apic_ids(session: QmpSession, qom_paths: dict[str, str | None]) -> dict[str, int | None]:
    """label -> QEMU's ``apic-id`` of the vCPU at that QOM path (None: not readable)."""
    found: dict[str, int | None] = {}
    for label, path in qom_paths.items():
        value = None
        if path:
            try:
                value = session.execute("qom-get", {"path": path, "property": "apic-id"})
            except ControlError as error:
                if error.qemu_exited:
                    raise
        found[label] = value if isinstance(value, int) else None
    return found


def agent_wait_online(
    client: AgentClient,
    session: QmpSession,
    ids: list[str],
    rejected: set[str],
    before: set[int],
    timeout: float,
    started: float,
    online_them: bool,
) -> dict[str, GuestOnline]:
    """id -> what the guest agent says of each new vCPU, once every one expected has
    appeared in ``guest-get-vcpus`` and is online, or ``timeout`` s after the first
    device_add. A vCPU the guest leaves offline for ``ONLINE_GRACE`` s is onlined with
    ``guest-set-vcpus`` (unless not ``online_them``)."""
    expected = len([d for d in ids if d not in rejected])
    deadline = started + timeout
    appeared: dict[int, float] = {}
    online_at: dict[int, float] = {}
    onlined: set[int] = set()
    detail: str | None = None
    while True:
        now = since(started)
        vcpus = guest_vcpus(client)
        for logical, vcpu in vcpus.items():
            if logical in before:
                continue
            appeared.setdefault(logical, now)
            if vcpu.online:
                online_at.setdefault(logical, now)
        waiting = [c for c in appeared if c not in online_at]
        if len(appeared) >= expected and not waiting:
            break
        if time.monotonic() >= deadline:
            break
        stale = [c for c in waiting if now - appeared[c] >= ONLINE_GRACE]
        if online_them and stale:
            onlined.update(stale)
            try:
                changed = set_vcpus(client, dict.fromkeys(stale, True))
            except AgentError as error:
                detail = str(error)
                break
            if changed != len(stale):
                detail = f"guest-set-vcpus onlined {changed} of {len(stale)}"
                break
            continue  # look again at once
        time.sleep(AGENT_POLL)
    return _match_new(client, session, ids, appeared, online_at, onlined, detail)


def _match_new(
    client: AgentClient,
    session: QmpSession,
    ids: list[str],
    appeared: dict[int, float],
    online_at: dict[int, float],
    onlined: set[int],
    detail: str | None,
) -> dict[str, GuestOnline]:
    """Tie each new guest CPU to its device by APIC id; failing that (``/proc/cpuinfo``
    unreadable, or the CPU offline), by order: Linux numbers new CPUs as they come."""
    apics = apic_ids(session, {d: f"{PERIPHERAL}{d}" for d in ids})
    apicids = guest_apicids(client) or {}
    by_id: dict[str, int] = {}
    for dev_id in ids:
        apic = apics[dev_id]
        logical = apicids.get(apic) if apic is not None else None
        if logical in appeared:
            by_id[dev_id] = logical
    rest = sorted(c for c in appeared if c not in by_id.values())
    for dev_id in ids:
        if dev_id not in by_id and rest:
            by_id[dev_id] = rest.pop(0)
    results = {}
    for dev_id in ids:
        logical = by_id.get(dev_id)
        if logical is None:
            results[dev_id] = GuestOnline(None, False, None, detail=detail)
            continue
        results[dev_id] = GuestOnline(
            logical,
            logical in online_at,
            online_at.get(logical),
            logical in onlined and logical in online_at,
            detail if logical in onlined and logical not in online_at else None,
        )
    return results


class GuestOffline(Record):
    """A vCPU about to be unplugged, as the guest agent saw and left it."""

    logical_id: int | None  # None: not online in the guest (nothing to offline)
    offlined: bool  # qvm offlined it through the agent


def agent_offline(
    client: AgentClient,
    session: QmpSession,
    name: str,
    targets: dict[str, str | None],
    sent: tuple[Any, ...] = (),
) -> dict[str, GuestOffline] | None:
    """Offline the vCPUs (label -> QOM path) in the guest before they are unplugged.
    ``sent``: the results of ``CPU_VIEW`` if it went out with the agent's resync.

    None when the agent cannot tell which guest CPU a vCPU is (``/proc/cpuinfo``
    unreadable). A guest that says a vCPU cannot go (``can-offline`` false), or fails
    to offline one, raises HotplugError, with every vCPU back online as it was: QEMU is
    not asked."""
    view = guest_cpu_view(client, sent)
    if view.apicids is None:
        return None
    matches = match_vcpus(apic_ids(session, targets), view.apicids, view.vcpus)
    refused = [
        f"{label} is guest CPU {m.logical_id}, which the guest says cannot be offlined"
        for label, m in matches.items()
        if m.online and m.can_offline is False
    ]
    if refused:
        raise HotplugError(
            f"{name}: {'; '.join(refused)} (can-offline false in guest-get-vcpus); QEMU was "
            "not asked, the VM is unchanged (hint: unplug another vCPU: qvm cpu list "
            f"{name} shows which the guest can give up)"
        )
    wanted = {label: m.logical_id for label, m in matches.items() if m.online}
    logical_ids = sorted(logical for logical in wanted.values() if logical is not None)
    done: list[int] = []
    try:
        # the agent stops at the first CPU it cannot offline and says how many it did; a
        # write of 0 to Linux's online file returns once the CPU is down
        done = logical_ids[: set_vcpus(client, dict.fromkeys(logical_ids, False))]
        if len(done) < len(logical_ids):
            raise AgentError(f"guest-set-vcpus did not offline CPU {logical_ids[len(done)]}")
    except AgentError as error:
        with contextlib.suppress(AgentError):
            set_vcpus(client, dict.fromkeys(done, True))
        raise HotplugError(
            f"{name}: the guest did not offline its CPU{'s' if len(wanted) > 1 else ''} "
            f"{', '.join(str(c) for c in wanted.values())}: {error}; QEMU was not asked, the "
            "VM is unchanged"
        ) from None
    return {label: GuestOffline(wanted.get(label), label in wanted) for label in matches}
