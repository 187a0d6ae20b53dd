"""Whether the guest took the vCPUs qvm plugged: its ACPI acknowledgement, the vCPU
running, a line on its serial console.

A guest acknowledges a new vCPU (``ACPI_DEVICE_OST``, source 1) in about 25 ms; that is
its ACPI code taking the device, not the vCPU running. The vCPU stays at its reset state
(HMP ``info registers N``: ``CR0=60000010``, paging off) until the guest starts it
(INIT/SIPI), which Linux does only when it onlines the CPU (udev rule or equivalent),
450-600 ms later under TCG; then CR0 has paging on (e.g. ``80050033``). HMP syncs the
vCPU state first, so this reads the same under TCG and KVM, with no guest agent.
"""

from __future__ import annotations

import re
import time
from typing import Any, NamedTuple

from qvm.control.events import insert_ack
from qvm.control.qmp_session import Events, QmpSession
from qvm.control.transaction import since
from qvm.errors import ControlError
from qvm.layout.rundir import RunDir
from qvm.store.pending import PERIPHERAL

# how often --wait-guest reads the registers of a new vCPU
ONLINE_POLL = 0.015
CR0_PG = 1 << 31  # paging: set by any guest kernel that started the vCPU
# HMP `info registers`: a vCPU's block starts with `CPU#N`; CR0 is one of its fields
CPU_HEADER = re.compile(r"^CPU#(\d+)[ \t\r]*$", re.M)
CR0_FIELD = re.compile(r"\bCR0=([0-9a-fA-F]+)\b")
# id -> (started by the guest, seconds after the first device_add, why unknown)
Online = dict[str, "tuple[bool | None, float | None, str | None]"]


class SerialWait(NamedTuple):
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
    by_path = {c.get("qom-path"): c.get("cpu-index") for c in session.execute("query-cpus-fast")}
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
