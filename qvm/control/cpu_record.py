"""`cpu list` from the supervisor's record (``qvm.store.view``): QEMU's vCPU slots as it
reported them after the latest change, and the guest agent's word on each with its age;
no round trip to the supervisor or the agent (``qvm.control.cpu.list_cpus`` makes them,
for `cpu list --live`). The slots and the guest's CPUs are matched by the same functions
as a live answer.
"""

from __future__ import annotations

import time

from qvm.base.proc import process_state
from qvm.base.record import Record
from qvm.control.cpu_slots import CpuList, merge_slots, topology_from_launch
from qvm.control.guest_agent_facts import (
    SOURCE_AGENT,
    SOURCE_QEMU,
    CpuMatch,
    apicids_from_cpuinfo,
    match_vcpus,
    parse_vcpus,
)
from qvm.errors import NotRunningError, RecordError
from qvm.layout.rundir import RunDir
from qvm.layout.runfiles import LAUNCH_FILE, STATE_FILE, VIEW_FILE
from qvm.store.guest import ANSWERING
from qvm.store.launch import read_launch
from qvm.store.pending import pending_ids
from qvm.store.state import read_state
from qvm.store.view import VIEW_HINT, GuestView, current_view
from qvm.supervisor.client import supervisor_alive


class RecordedCpus(Record):
    cpus: CpuList
    age: float  # seconds since the supervisor wrote the record
    guest_age: float | None  # since the agent said what the GUEST column shows
    stuck: bool  # the supervisor is stopped (SIGSTOP): the record is as old as ``age``


def recorded_cpus(run: RunDir) -> RecordedCpus:
    """The slots of a running VM, from its supervisor's record. Not running:
    NotRunningError; no record (yet) or a corrupt one: RecordError."""
    state = read_state(run.file(STATE_FILE))
    if state is None or state.qemu_pid is None or not supervisor_alive(run):
        raise NotRunningError(run.name)
    stuck = process_state(state.supervisor_pid) in ("T", "t")
    view = current_view(run.file(VIEW_FILE), state, wait=not stuck)
    if view is None or view.hotpluggable_cpus is None or view.cpus_fast is None:
        problem = view.qmp_error if view is not None and view.qmp_error else None
        raise RecordError(
            run.file(VIEW_FILE), "", problem or "no record of QEMU's vCPUs yet", VIEW_HINT
        )
    launch = read_launch(run.file(LAUNCH_FILE))
    slots = merge_slots(
        list(view.hotpluggable_cpus),
        list(view.cpus_fast),
        pending_ids(run),
        topology_from_launch(launch) if launch is not None else None,
    )
    now = time.time()
    cpus = _with_guest(CpuList(run.name, slots), view.guest, view.apic_ids or {})
    guest = view.guest
    return RecordedCpus(
        cpus,
        round(view.age(now), 1),
        round(max(now - guest.at, 0.0), 1) if guest is not None else None,
        stuck,
    )


def _with_guest(cpus: CpuList, guest: GuestView | None, apic_ids: dict[str, int]) -> CpuList:
    if guest is None or guest.agent != ANSWERING or guest.vcpus is None:
        detail = guest.detail if guest is not None else "the guest agent was not asked yet"
        return cpus._replace(guest_source=SOURCE_QEMU, guest_detail=detail)
    present = {s.label: apic_ids.get(s.qom_path or "") for s in cpus.slots if s.present}
    apicids = apicids_from_cpuinfo(guest.cpuinfo) if guest.cpuinfo is not None else None
    return with_matches(cpus, match_vcpus(present, apicids, parse_vcpus(list(guest.vcpus))))


def with_matches(cpus: CpuList, matches: dict[str, CpuMatch]) -> CpuList:
    """``cpus`` with each present vCPU's guest CPU number and online state (by slot label)."""
    slots = []
    for slot in cpus.slots:
        match = matches.get(slot.label) if slot.present else None
        if match is not None:
            slot = slot._replace(guest_cpu=match.logical_id, guest_online=match.online)
        slots.append(slot)
    return cpus._replace(slots=slots, guest_source=SOURCE_AGENT)
