"""The supervisor's side of ``view.json`` (``qvm.store.view``): what `status`, `list` and
`cpu list` show, rewritten whenever it changes and at least every ``HEARTBEAT``.

QEMU's facts (run state, vCPUs, memory, the vCPUs' APIC ids) are asked on the supervisor's
own QMP connection: at connection, after every event that changes them, after every
command the relay runs for a client that may change them (before the client gets its
reply, so the next query sees the change), and at each heartbeat (which also catches a
change made on ``qmp.sock`` behind qvm's back). The guest agent is asked in a thread
through ``agent.sock`` like any client, under ``agent.lock`` (never waiting for it: a
command holding it is served first): until it answers, then every ``GUEST_REFRESH``
seconds, and shortly after a vCPU came or went (the guest onlines it some 0.5 s later).
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import time
from typing import Any

from qvm.base.proc import process_usage
from qvm.errors import AgentCommandError, AgentError
from qvm.layout.runfiles import VIEW_FILE, RunFiles
from qvm.store.guest import ANSWERING, NOT_ANSWERING, NOT_CONFIGURED, not_configured_text
from qvm.store.view import HEARTBEAT, GuestView, ViewRecord, write_view
from qvm.supervisor.agent_wire import AgentClient, held_agent
from qvm.supervisor.facts import QMP_CALL_TIMEOUT, describe_qmp_failure
from qvm.supervisor.qmp_replies import memory_summary, runstate
from qvm.supervisor.spawn import log_line

GUEST_REFRESH = 30.0  # seconds between two askings of an answering agent
GUEST_RETRY = 2.0  # ... of one that did not answer (a guest still booting)
GUEST_AFTER_VCPU = (0.7, 2.5)  # seconds after a vCPU came or went
GUEST_SYNC_TIMEOUT = 0.3  # short: it holds agent.lock, which a command may want
GUEST_COMMAND_TIMEOUT = 2.0
CPUINFO = "/proc/cpuinfo"
MAX_CPUINFO = 256 * 1024
GUEST_FACTS = (
    ("guest-get-osinfo", None),
    ("guest-get-host-name", None),
    ("guest-network-get-interfaces", None),
    ("guest-get-vcpus", None),
    ("guest-file-open", {"path": CPUINFO, "mode": "r"}),
)
# QMP commands a relay client runs that change nothing the record holds
READ_ONLY = frozenset({"qom-get", "qom-list", "human-monitor-command"})
VCPU_EVENTS = frozenset({"DEVICE_DELETED", "ACPI_DEVICE_OST"})
STATE_EVENTS = frozenset(
    {"STOP", "RESUME", "DEVICE_DELETED", "ACPI_DEVICE_OST", "MEMORY_DEVICE_SIZE_CHANGE"}
)


def changes_view(command: str) -> bool:
    """A relayed command after which the record is asked anew."""
    return not command.startswith("query-") and command not in READ_ONLY


class ViewKeeper:
    """Keeps one QEMU run's ``view.json``; made when QMP answers, closed when QEMU ends."""

    def __init__(
        self,
        run: RunFiles,
        name: str,
        qmp: Any,
        qemu_pid: int,
        qemu_start_time: int | None,
        agent: bool,
    ) -> None:
        self.run = run
        self.qmp = qmp
        self.agent = agent
        self.record = ViewRecord(name, qemu_pid, qemu_start_time, time.time())
        if not agent:
            guest = GuestView(time.time(), NOT_CONFIGURED, not_configured_text(name))
            self.record = self.record._replace(guest=guest)
        self.wake = asyncio.Event()
        self.dirty = False  # an event changed what the record holds; not asked since
        self.refreshing = asyncio.Lock()
        self.guest_due: list[float] = [time.monotonic()] if agent else []
        self.guest_task: asyncio.Task[None] | None = None
        self.task: asyncio.Task[None] | None = None
        self.closed = False

    def start(self) -> None:
        self.task = asyncio.create_task(self._keep())

    async def close(self) -> None:
        """QEMU ended: no more writes. Never waits long: the exit record comes next. A
        cancellation can be lost in 3.11's ``wait_for`` when its inner call completes at
        the same moment, so the loop also ends on ``closed``, and ``_write`` checks it.
        The file goes after the exit record (``remove``): on a full disk its space must
        not be what lets state.json be written, or a full disk would go unnoticed."""
        self.closed = True
        tasks = {task for task in (self.task, self.guest_task) if task is not None}
        for task in tasks:
            task.cancel()
        if tasks:
            await asyncio.wait(tasks, timeout=QMP_CALL_TIMEOUT)

    def remove(self) -> None:
        """A record of a QEMU run that ended: readers would find it of an older run."""
        self.run.remove(VIEW_FILE)

    def on_event(self, name: str | None) -> None:
        if name in STATE_EVENTS:
            self.dirty = True
            self.wake.set()
        if name in VCPU_EVENTS and self.agent:
            now = time.monotonic()
            self.guest_due = sorted({*self.guest_due, *(now + d for d in GUEST_AFTER_VCPU)})

    async def _keep(self) -> None:
        while not self.closed:
            await self.refresh()
            self._ask_guest_if_due()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self.wake.wait(), self._sleep())
            self.wake.clear()

    def _sleep(self) -> float:
        if not self.guest_due or self.guest_task is not None:
            return HEARTBEAT
        return min(HEARTBEAT, max(self.guest_due[0] - time.monotonic(), 0.0))

    async def refresh(self) -> None:
        """Ask QEMU, and write the record (the heartbeat, whatever QEMU answered)."""
        async with self.refreshing:
            self.dirty = False
            self.record = await self._asked_qemu(self.record)
            self._write()

    async def _asked_qemu(self, record: ViewRecord) -> ViewRecord:
        now = time.time()
        try:
            status, hotpluggable, cpus, memory = await asyncio.wait_for(
                asyncio.gather(
                    self.qmp.execute("query-status"),
                    self.qmp.execute("query-hotpluggable-cpus"),
                    self.qmp.execute("query-cpus-fast"),
                    self.qmp.execute("query-memory-size-summary"),
                    return_exceptions=True,
                ),
                QMP_CALL_TIMEOUT,
            )
            for reply in (status, cpus, memory):
                if isinstance(reply, BaseException):
                    raise reply
            if isinstance(hotpluggable, BaseException):
                hotpluggable = None  # a machine without vCPU hotplug (microvm)
            apic_ids = await self._apic_ids(cpus)
        except Exception as exc:  # noqa: BLE001 - the record says why; the next beat asks again
            return record._replace(qmp_error=describe_qmp_failure(exc, record.qemu_pid))
        return record._replace(
            runstate=runstate(status, record.runstate or "unknown"),
            qmp_at=now,
            qmp_error=None,
            memory_bytes=memory_summary(memory).total,
            hotpluggable_cpus=tuple(hotpluggable) if isinstance(hotpluggable, list) else None,
            cpus_fast=tuple(cpus) if isinstance(cpus, list) else None,
            apic_ids=apic_ids,
        )

    async def _apic_ids(self, cpus: Any) -> dict[str, int]:
        """A present vCPU's QOM path -> its APIC id (what ties it to the guest's CPU), asked
        only for vCPUs the record does not know yet: a vCPU's id never changes."""
        known = self.record.apic_ids or {}
        paths = (
            [c.get("qom-path") for c in cpus if isinstance(c, dict)]
            if isinstance(cpus, list)
            else []
        )
        found = {p: known[p] for p in paths if isinstance(p, str) and p in known}
        for path in paths:
            if isinstance(path, str) and path not in found:
                apic = await asyncio.wait_for(
                    self.qmp.execute("qom-get", {"path": path, "property": "apic-id"}),
                    QMP_CALL_TIMEOUT,
                )
                if isinstance(apic, int) and not isinstance(apic, bool):
                    found[path] = apic
        return found

    def _write(self) -> None:
        if self.closed:
            return
        now = time.time()
        samples = self.record.cpu_samples
        usage = process_usage(self.record.qemu_pid)
        if usage is not None and (not samples or now - samples[-1][0] >= 1.0):
            samples = (*samples[-1:], (now, usage[1]))
        self.record = self.record._replace(written_at=now, cpu_samples=samples)
        try:
            write_view(self.run.file(VIEW_FILE), self.record)
        except Exception as error:  # noqa: BLE001 - queries then see an old record, and say so
            log_line(f"qvm supervisor: {error}")

    # --- the guest agent ------------------------------------------------------------------

    def _ask_guest_if_due(self) -> None:
        if self.guest_task is not None or not self.guest_due:
            return
        if self.guest_due[0] > time.monotonic():
            return
        self.guest_task = asyncio.create_task(self._ask_guest())

    async def _ask_guest(self) -> None:
        try:
            guest = await asyncio.to_thread(ask_guest, self.run, self.record.guest)
        finally:
            self.guest_task = None
        now = time.monotonic()
        self.guest_due = [due for due in self.guest_due if due > now]
        if guest is None:  # the agent was busy with a command: soon again
            self.guest_due.insert(0, now + GUEST_RETRY)
            return
        wait = GUEST_REFRESH if guest.agent == ANSWERING else GUEST_RETRY
        self.guest_due = sorted({*self.guest_due, now + wait})
        async with self.refreshing:
            self.record = self.record._replace(guest=guest)
            self._write()
        self.wake.set()


def ask_guest(run: RunFiles, before: GuestView | None) -> GuestView | None:
    """The agent's facts for the record, in two round trips (blocking: run in a thread);
    None when another command holds the agent (asked again soon)."""
    at = time.time()
    try:
        with held_agent(run, 0.0, GUEST_SYNC_TIMEOUT) as client:
            if client is None:
                return None
            client.begin_sync(GUEST_SYNC_TIMEOUT)
            replies = client.execute_batch(GUEST_FACTS, GUEST_COMMAND_TIMEOUT)
            return _guest_view(client, replies, time.time())
    except AgentError as error:
        detail = str(error)
    except OSError as error:
        detail = f"the guest agent's channel: {error.strerror or error}"
    if before is not None and before.agent == ANSWERING and at - before.at < 2 * GUEST_REFRESH:
        # one miss (the guest busy under TCG) does not take back what it said a moment ago
        return before._replace(
            detail=f"not answering since {time.strftime('%H:%M:%S', time.localtime(at))}: {detail}"
        )
    return GuestView(at, NOT_ANSWERING, detail)


def _guest_view(client: AgentClient, replies: list[Any], at: float) -> GuestView:
    osinfo, host, interfaces, vcpus, handle = (
        None if isinstance(r, AgentError) else r for r in replies
    )
    problems = [str(r) for r in replies[:4] if isinstance(r, AgentError)]
    cpuinfo = None
    if isinstance(handle, int) and not isinstance(handle, bool):
        with contextlib.suppress(AgentCommandError):
            read, _ = client.execute_batch(
                [
                    ("guest-file-read", {"handle": handle, "count": MAX_CPUINFO}),
                    ("guest-file-close", {"handle": handle}),
                ]
            )
            if isinstance(read, dict):
                cpuinfo = base64.b64decode(read.get("buf-b64") or "").decode(errors="replace")
    hostname = host.get("host-name") if isinstance(host, dict) else None
    return GuestView(
        at=at,
        agent=ANSWERING,
        detail="; ".join(dict.fromkeys(problems)) or None,
        osinfo=osinfo if isinstance(osinfo, dict) else None,
        hostname=hostname if isinstance(hostname, str) else None,
        interfaces=tuple(i for i in interfaces if isinstance(i, dict))
        if isinstance(interfaces, list)
        else None,
        vcpus=tuple(v for v in vcpus if isinstance(v, dict)) if isinstance(vcpus, list) else None,
        cpuinfo=cpuinfo,
    )
