"""``view.json``: what `status`, `list` and `cpu list` show of a running VM, kept by its
supervisor so that a query reads one file and ``/proc`` instead of asking the supervisor
(and the guest agent) in turn: QEMU's run state, its vCPUs and memory as QEMU reported
them after the latest change, the guest agent's facts with their time, and a heartbeat.

The supervisor rewrites it (temporary file + rename: a reader sees the old record or the
new one) after every change it sees (QMP events, the relay's commands, the agent's
answers) and at least every ``HEARTBEAT`` seconds. A record older than ``STALE_AFTER``
says its supervisor is not keeping it: stuck, or stopped (``qvm.ops.status`` says which
from ``/proc``). QEMU's and the agent's replies are kept as they came and read by the
same defensive parsers as a live answer; the rest is checked here, where it is read.

Stdlib only (with ``qvm.store.fields``): the supervisor imports it, and so does every
query.
"""

from __future__ import annotations

import os
import time

from qvm.base.checking import TYPE_CHECKING
from qvm.base.jsonfile import write_text_atomic
from qvm.base.record import Record
from qvm.store.fields import Fields, read_record
from qvm.store.guest import AGENT_STATES, GuestFacts, OsInfo, parse_interfaces
from qvm.store.state import QemuRun, StateRecord

if TYPE_CHECKING:
    from typing import Any

HEARTBEAT = 5.0  # seconds between two rewrites of an unchanged record
STALE_AFTER = 3 * HEARTBEAT  # a record this old is not being kept
# right after `qvm up` (which returns when QMP answers) the supervisor's first record is a
# few ms away: a query waits this long for it, unless the supervisor is stopped
FIRST_VIEW_WAIT = 3.0
WAITED_STATES = ("starting", "running", "paused")  # QEMU runs, or is about to
VIEW_HINT = "the VM's supervisor rewrites it; 'qvm status NAME --live' asks it instead"


def _list_of_objects(f: Fields, key: str) -> tuple[dict[str, Any], ...] | None:
    value = f.any(key, None)
    if value is None:
        return None
    if not isinstance(value, list) or not all(isinstance(item, dict) for item in value):
        raise f.fail(key, "must be a list of JSON objects (QEMU's reply, as it came)")
    return tuple(value)


class GuestView(Record):
    """The guest agent's latest answer (or why there was none) and when it came."""

    at: float  # time.time() of the answer, or of the attempt that failed
    agent: str  # one of qvm.store.guest.AGENT_STATES
    detail: str | None = None
    osinfo: dict[str, Any] | None = None  # guest-get-osinfo's reply
    hostname: str | None = None
    interfaces: tuple[dict[str, Any], ...] | None = None  # guest-network-get-interfaces'
    vcpus: tuple[dict[str, Any], ...] | None = None  # guest-get-vcpus'
    cpuinfo: str | None = None  # the guest's /proc/cpuinfo (APIC ids of online CPUs)

    @classmethod
    def read(cls, f: Fields) -> GuestView:
        osinfo = f.object("osinfo", None)
        return f.declared(
            cls,
            agent=f.one_of("agent", AGENT_STATES),
            osinfo=osinfo.data if osinfo is not None else None,
            interfaces=_list_of_objects(f, "interfaces"),
            vcpus=_list_of_objects(f, "vcpus"),
        )

    def to_json(self) -> dict[str, Any]:
        data = self._asdict()
        for key in ("interfaces", "vcpus"):
            if data[key] is not None:
                data[key] = list(data[key])
        return data

    def facts(self) -> GuestFacts:
        """What `status` says of the guest, as ``qvm.control.guest_agent_facts`` would."""
        if self.agent != "answering":
            return GuestFacts(self.agent, self.detail)
        return GuestFacts(
            self.agent,
            self.detail,
            OsInfo.from_reply(self.osinfo) if self.osinfo is not None else None,
            self.hostname,
            tuple(parse_interfaces(list(self.interfaces or ()))),
        )


class ViewRecord(Record):
    name: str
    qemu_pid: int  # with qemu_start_time, the QEMU run this record is about
    qemu_start_time: int | None
    written_at: float  # time.time(): the heartbeat
    runstate: str | None = None  # QEMU's (query-status), None before it first answered
    qmp_at: float | None = None  # when QEMU last answered the queries below
    qmp_error: str | None = None  # why it did not, at the latest try
    memory_bytes: int | None = None
    hotpluggable_cpus: tuple[dict[str, Any], ...] | None = None  # QEMU's replies, as they came
    cpus_fast: tuple[dict[str, Any], ...] | None = None
    apic_ids: dict[str, int] | None = None  # a present vCPU's QOM path -> its APIC id
    # (time.time(), QEMU's CPU seconds) at the latest heartbeats: a reader's CPU% is the
    # rate from one of them to its own reading of /proc
    cpu_samples: tuple[tuple[float, float], ...] = ()
    guest: GuestView | None = None  # None: no agent asked yet (or none configured)

    @classmethod
    def from_json(cls, data: Any, source: str) -> ViewRecord:
        f = Fields(data, source, VIEW_HINT)
        apic_ids = f.object("apic_ids", None)
        guest = f.object("guest", None)
        samples = f.any("cpu_samples", [])
        if not isinstance(samples, list) or not all(
            isinstance(s, list)
            and len(s) == 2
            and all(isinstance(v, int | float) and not isinstance(v, bool) for v in s)
            for s in samples
        ):
            raise f.fail("cpu_samples", "must be a list of [time, CPU seconds] pairs")
        return f.declared(
            cls,
            qemu_pid=f.pid("qemu_pid"),
            hotpluggable_cpus=_list_of_objects(f, "hotpluggable_cpus"),
            cpus_fast=_list_of_objects(f, "cpus_fast"),
            apic_ids=(
                {key: apic_ids.int(key) for key in apic_ids.data} if apic_ids is not None else None
            ),
            cpu_samples=tuple((float(at), float(cpu)) for at, cpu in samples),
            guest=GuestView.read(guest) if guest is not None else None,
        )

    def to_json(self) -> dict[str, Any]:
        data = self._asdict()
        for key in ("hotpluggable_cpus", "cpus_fast"):
            if data[key] is not None:
                data[key] = list(data[key])
        data["cpu_samples"] = [list(sample) for sample in self.cpu_samples]
        data["guest"] = self.guest.to_json() if self.guest is not None else None
        return data

    @property
    def run(self) -> QemuRun:
        return QemuRun(self.qemu_pid, self.qemu_start_time)

    @property
    def vcpus_present(self) -> int | None:
        return len(self.cpus_fast) if self.cpus_fast is not None else None

    def age(self, now: float) -> float:
        return max(now - self.written_at, 0.0)


def read_view(path: str | os.PathLike[str]) -> ViewRecord | None:
    """The record at ``path``; None when there is none. Corrupt: RecordError."""
    return read_record(path, ViewRecord.from_json, VIEW_HINT)


def current_view(path: str | os.PathLike[str], state: StateRecord, wait: bool) -> ViewRecord | None:
    """The record at ``path`` when it is about the QEMU run ``state`` names; with
    ``wait``, the first one of a run that has just started is waited for, briefly."""
    current = QemuRun.of_state(state)
    if current.pid is None:
        return None
    deadline = time.monotonic() + FIRST_VIEW_WAIT
    while True:
        view = read_view(path)
        if view is not None and view.run.is_current(current):
            return view
        if not wait or time.monotonic() > deadline or state.state not in WAITED_STATES:
            return None
        time.sleep(0.01)


def write_view(path: str | os.PathLike[str], record: ViewRecord) -> None:
    """Not fsynced: a record a crash loses is rewritten within a heartbeat, and state.json
    (which is) says whether anything runs."""
    import json  # noqa: PLC0415 -- the supervisor's: a query only reads (qvm.base.jsonfile)

    write_text_atomic(path, json.dumps(record.to_json(), separators=(",", ":")), durable=False)


def cpu_percent(
    samples: tuple[tuple[float, float], ...], now: float, cpu_seconds: float
) -> float | None:
    """QEMU's CPU% from the newest of ``samples`` at least a second old (else the
    oldest) to ``now``; None without one. CPU time comes in 10 ms ticks: over a few ms,
    one tick would read as hundreds of per cent."""
    if not samples:
        return None
    older = [s for s in samples if now - s[0] >= 1.0]
    at, then = older[-1] if older else samples[0]
    elapsed = now - at
    if elapsed <= 0:
        return None
    return round(
        min(max(100.0 * (cpu_seconds - then) / elapsed, 0.0), 100.0 * (os.cpu_count() or 1)), 1
    )
