"""``view.json``: the supervisor's record of what queries show, read where it is read
(round trip, corrupt and partial files as one RecordError), never torn while rewritten,
and the reader's side of it: staleness, a stopped supervisor, CPU% and the guest's facts."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import threading
import time
from pathlib import Path
from typing import Any

import pytest
from framework.fake_qmp import state_json

from qvm.base.proc import process_state
from qvm.errors import RecordError
from qvm.layout.rundir import RunDir
from qvm.store.guest import ANSWERING, NOT_ANSWERING
from qvm.store.state import StateRecord
from qvm.store.view import (
    STALE_AFTER,
    GuestView,
    ViewRecord,
    cpu_percent,
    current_view,
    read_view,
    write_view,
)

CPU0 = {"qom-path": "/machine/unattached/device[0]", "cpu-index": 0, "thread-id": 11}
SLOT0 = {
    "props": {"core-id": 0, "thread-id": 0, "socket-id": 0},
    "vcpus-count": 1,
    "qom-path": "/machine/unattached/device[0]",
    "type": "max-x86_64-cpu",
}
SLOT1 = {
    "props": {"core-id": 1, "thread-id": 0, "socket-id": 0},
    "vcpus-count": 1,
    "type": "max-x86_64-cpu",
}
INTERFACES = [
    {
        "name": "eth0",
        "hardware-address": "52:54:00:12:34:56",
        "ip-addresses": [{"ip-address": "10.0.2.15", "prefix": 24, "ip-address-type": "ipv4"}],
    }
]


def a_view(**changes: Any) -> ViewRecord:
    guest = GuestView(
        at=1000.0,
        agent=ANSWERING,
        osinfo={"pretty-name": "qvm test guest", "kernel-release": "6.1"},
        hostname="guest",
        interfaces=tuple(INTERFACES),
        vcpus=({"logical-id": 0, "online": True, "can-offline": False},),
        cpuinfo="processor\t: 0\napicid\t\t: 0\n\n",
    )
    view = ViewRecord(
        name="vm1",
        qemu_pid=100,
        qemu_start_time=5,
        written_at=1001.0,
        runstate="running",
        qmp_at=1001.0,
        memory_bytes=128 * 1024**2,
        hotpluggable_cpus=(SLOT1, SLOT0),
        cpus_fast=(CPU0,),
        apic_ids={"/machine/unattached/device[0]": 0},
        cpu_samples=((990.0, 1.5), (1000.0, 2.0)),
        guest=guest,
    )
    return view._replace(**changes)


def test_a_record_reads_back_as_written(tmp_path: Path) -> None:
    path = tmp_path / "view.json"
    write_view(path, a_view())
    assert read_view(path) == a_view()
    assert read_view(tmp_path / "none.json") is None


def test_the_guest_facts_come_from_the_agents_replies_as_a_live_answer_would() -> None:
    facts = a_view().guest.facts()  # type: ignore[union-attr]
    assert facts.agent == ANSWERING
    assert facts.os is not None and facts.os.summary() == "qvm test guest, kernel 6.1"
    assert facts.hostname == "guest"
    assert [(i.name, [a.address for a in i.addresses]) for i in facts.interfaces] == [
        ("eth0", ["10.0.2.15"])
    ]
    silent = GuestView(1.0, NOT_ANSWERING, "no reply within 0.5 s", hostname="old")
    assert silent.facts().hostname is None  # what it said before is not shown as now


@pytest.mark.parametrize(
    ("change", "key"),
    [
        ({"cpus_fast": {"not": "a list"}}, "cpus_fast"),
        ({"hotpluggable_cpus": [1, 2]}, "hotpluggable_cpus"),
        ({"qemu_pid": "100"}, "qemu_pid"),
        ({"written_at": None}, "written_at"),
        ({"cpu_samples": [[1.0]]}, "cpu_samples"),
        ({"apic_ids": {"/machine/x": "one"}}, "/machine/x"),
        ({"guest": {"at": 1.0, "agent": "chatty"}}, "agent"),
    ],
)
def test_a_record_of_the_wrong_shape_is_one_record_error(
    tmp_path: Path, change: dict[str, Any], key: str
) -> None:
    path = tmp_path / "view.json"
    path.write_text(json.dumps({**a_view().to_json(), **change}))
    with pytest.raises(RecordError) as caught:
        read_view(path)
    assert str(caught.value).startswith(str(path))
    assert key in str(caught.value)


def test_a_partial_or_corrupt_record_is_one_record_error(tmp_path: Path) -> None:
    path = tmp_path / "view.json"
    write_view(path, a_view())
    whole = path.read_bytes()
    for broken in (whole[: len(whole) // 2], b"", b"\x00\xff", b"[]"):
        path.write_bytes(broken)
        with pytest.raises(RecordError, match="view.json"):
            read_view(path)


def test_a_record_rewritten_while_read_is_never_torn(tmp_path: Path) -> None:
    """The supervisor renames each new record in; readers see the old one or the new
    one, whole (each record here is consistent with itself: its hostname names its time)."""
    path = tmp_path / "view.json"
    padding = "x" * 64 * 1024  # several pages: a torn read would show
    write_view(path, a_view())
    done = threading.Event()
    problems: list[str] = []

    def writer() -> None:
        written = 0
        while not done.is_set() or written < 200:
            written += 1
            guest = a_view().guest._replace(hostname=f"h{written}", cpuinfo=padding)  # type: ignore[union-attr]
            write_view(path, a_view(written_at=float(written), guest=guest))

    def reader() -> None:
        for _ in range(400):
            try:
                view = read_view(path)
            except RecordError as error:
                problems.append(str(error))
                continue
            assert view is not None and view.guest is not None
            if view.written_at != 1001.0 and view.guest.hostname != f"h{int(view.written_at)}":
                problems.append(f"mixed: {view.written_at} {view.guest.hostname}")

    threads = [threading.Thread(target=writer)] + [
        threading.Thread(target=reader) for _ in range(3)
    ]
    for thread in threads:
        thread.start()
    for thread in threads[1:]:
        thread.join()
    done.set()
    threads[0].join()
    assert problems == []
    assert not [name for name in os.listdir(tmp_path) if name.endswith(".tmp")]


def test_cpu_percent_is_a_rate_over_a_second_or_more() -> None:
    samples = ((100.0, 10.0), (109.5, 14.0))
    # the newest sample is 0.5 s old: the older one, 10 s back, gives the rate
    assert cpu_percent(samples, 110.0, 15.0) == 50.0
    assert cpu_percent(samples, 112.0, 15.0) == 40.0
    assert cpu_percent((), 112.0, 15.0) is None
    assert cpu_percent(((100.0, 10.0),), 101.0, 5.0) == 0.0  # never negative


def running_state(supervisor_pid: int = 99) -> StateRecord:
    return StateRecord.from_json(state_json(supervisor_pid=supervisor_pid), "state.json")


def test_a_record_of_an_earlier_qemu_run_is_not_the_current_one(tmp_path: Path) -> None:
    path = tmp_path / "view.json"
    write_view(path, a_view(qemu_start_time=4))
    started = time.monotonic()
    assert current_view(path, running_state(), wait=False) is None
    assert time.monotonic() - started < 0.5
    write_view(path, a_view())
    assert current_view(path, running_state(), wait=False) == a_view()


@pytest.fixture
def stopped_process() -> Any:
    """A process stopped by SIGSTOP (state T), as a stuck supervisor would be."""
    process = subprocess.Popen(["sleep", "60"])
    os.kill(process.pid, signal.SIGSTOP)
    deadline = time.monotonic() + 5
    while process_state(process.pid) != "T" and time.monotonic() < deadline:
        time.sleep(0.005)  # the signal is delivered, not yet acted on
    yield process
    process.kill()
    process.wait()


def status_of(run: RunDir, supervisor_pid: int, monkeypatch: pytest.MonkeyPatch) -> Any:
    from qvm.ops import status

    monkeypatch.setattr(status, "supervisor_alive", lambda run: True)
    run.state_file.write_text(json.dumps(state_json(supervisor_pid=supervisor_pid)))
    return status.vm_status(run)


def test_a_stopped_supervisor_is_shown_stuck_at_once(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, stopped_process: Any
) -> None:
    run = RunDir(tmp_path / "vm1")
    run.create()
    # no view.json of this run: a running supervisor would be waited for, briefly
    started = time.monotonic()
    facts = status_of(run, stopped_process.pid, monkeypatch)
    assert time.monotonic() - started < 0.5
    assert facts.supervisor_state == "stuck"
    assert f"kill -CONT {stopped_process.pid}" in facts.error
    write_view(run.view_file, a_view(written_at=time.time() - 30))
    facts = status_of(run, stopped_process.pid, monkeypatch)
    assert (facts.supervisor_state, facts.vcpus.present) == ("stuck", 1)
    assert 29 < facts.facts_age < 40


def test_a_record_not_rewritten_for_long_says_stale(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    run = RunDir(tmp_path / "vm1")
    run.create()
    write_view(run.view_file, a_view(written_at=time.time() - STALE_AFTER - 5))
    facts = status_of(run, os.getpid(), monkeypatch)
    assert facts.supervisor_state == "stale"
    assert "--live" in facts.error
    write_view(run.view_file, a_view(written_at=time.time()))
    facts = status_of(run, os.getpid(), monkeypatch)
    assert (facts.supervisor_state, facts.error) == ("ok", None)
    assert facts.guest.hostname == "guest" and facts.guest_age > 0
    assert facts.memory.bytes == 128 * 1024**2


def test_a_corrupt_record_is_a_problem_in_the_row_not_a_traceback(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    run = RunDir(tmp_path / "vm1")
    run.create()
    run.view_file.write_text('{"name": "vm1", "qemu_pid": 100, "qemu_start')
    facts = status_of(run, os.getpid(), monkeypatch)
    assert facts.state == "running"
    assert str(run.view_file) in facts.error and "not valid JSON" in facts.error
