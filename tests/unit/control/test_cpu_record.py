"""`cpu list` from the supervisor's view.json: the slots QEMU reported and the guest's
word on each, matched by APIC id as a live answer would be; no record is one line."""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest
from framework.fake_qmp import state_json

from qvm.control import cpu_record
from qvm.control.cpu_record import recorded_cpus
from qvm.errors import NotRunningError, RecordError
from qvm.layout.rundir import RunDir
from qvm.store.guest import ANSWERING, NOT_ANSWERING
from qvm.store.view import GuestView, ViewRecord, write_view

TYPE = "max-x86_64-cpu"
BOOT = "/machine/unattached/device[0]"


def slot(core: int, qom_path: str | None = None) -> dict[str, object]:
    """One entry of ``query-hotpluggable-cpus`` (a free slot has no QOM path)."""
    entry: dict[str, object] = {
        "props": {"core-id": core, "thread-id": 0, "socket-id": 0},
        "vcpus-count": 1,
        "type": TYPE,
    }
    return entry if qom_path is None else {**entry, "qom-path": qom_path}


HOTPLUGGABLE = (slot(2), slot(1, "/machine/peripheral/cpu1"), slot(0, BOOT))
CPUS_FAST = (
    {"qom-path": BOOT, "cpu-index": 0, "thread-id": 11},
    {"qom-path": "/machine/peripheral/cpu1", "cpu-index": 1, "thread-id": 12},
)
# the guest numbered the hotplugged vCPU (APIC id 1) as its CPU 1, and left it offline:
# /proc/cpuinfo lists online CPUs only
GUEST = GuestView(
    at=0.0,
    agent=ANSWERING,
    vcpus=(
        {"logical-id": 0, "online": True, "can-offline": False},
        {"logical-id": 1, "online": False, "can-offline": True},
    ),
    cpuinfo="processor\t: 0\napicid\t\t: 0\n\n",
)


@pytest.fixture
def run(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> RunDir:
    run = RunDir(tmp_path / "vm1")
    run.create()
    run.state_file.write_text(json.dumps(state_json()))
    monkeypatch.setattr(cpu_record, "supervisor_alive", lambda run: True)
    return run


def view(**changes: object) -> ViewRecord:
    record = ViewRecord(
        "vm1",
        100,
        5,
        time.time() - 2,
        hotpluggable_cpus=HOTPLUGGABLE,
        cpus_fast=CPUS_FAST,
        apic_ids={BOOT: 0, "/machine/peripheral/cpu1": 1},
        guest=GUEST._replace(at=time.time() - 7),
    )
    return record._replace(**changes)


def test_the_slots_and_the_guests_word_come_from_the_record(run: RunDir) -> None:
    write_view(run.view_file, view())
    recorded = recorded_cpus(run)
    slots = recorded.cpus.slots
    assert [(s.index, s.state, s.id) for s in slots] == [
        (0, "present", None),
        (1, "present", "cpu1"),
        (2, "free", None),
    ]
    assert [(s.guest_cpu, s.guest_online) for s in slots[:2]] == [(0, True), (None, False)]
    assert recorded.cpus.guest_source == "agent"
    assert 1.5 < recorded.age < 5 and 6.5 < recorded.guest_age < 10  # type: ignore[operator]
    assert not recorded.stuck


def test_without_the_agents_answer_the_guest_column_says_why(run: RunDir) -> None:
    write_view(run.view_file, view(guest=GuestView(time.time(), NOT_ANSWERING, "no reply")))
    cpus = recorded_cpus(run).cpus
    assert (cpus.guest_source, cpus.guest_detail) == ("QEMU only", "no reply")
    assert all(s.guest_online is None for s in cpus.slots)


def test_no_record_is_one_line_and_a_stopped_vm_is_not_running(
    run: RunDir, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr("qvm.store.view.FIRST_VIEW_WAIT", 0.05)
    write_view(run.view_file, view(qemu_start_time=4))  # an earlier QEMU run's
    with pytest.raises(RecordError, match="no record of QEMU's vCPUs yet"):
        recorded_cpus(run)
    write_view(run.view_file, view(cpus_fast=None, qmp_error="QEMU did not answer QMP"))
    with pytest.raises(RecordError, match="QEMU did not answer QMP"):
        recorded_cpus(run)
    run.state_file.write_text(json.dumps(state_json(qemu_pid=None, state="stopped")))
    with pytest.raises(NotRunningError):
        recorded_cpus(run)
