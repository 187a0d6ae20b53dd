"""The supervisor's side of view.json: what it asks QEMU and writes, a machine without
vCPU hotplug, a QEMU that stops answering (the facts kept, the reason said), the events
that make it dirty, the relay's commands that change it, and nothing written once closed."""

from __future__ import annotations

import asyncio
import os
from pathlib import Path
from typing import Any

from qvm.layout.runfiles import VIEW_FILE, RunFiles
from qvm.store.view import read_view
from qvm.supervisor.view import ViewKeeper, changes_view

BOOT = "/machine/unattached/device[0]"
REPLIES: dict[str, Any] = {
    "query-status": {"status": "running", "running": True},
    "query-hotpluggable-cpus": [
        {"props": {"core-id": 1}, "vcpus-count": 1, "type": "max-x86_64-cpu"},
        {"props": {"core-id": 0}, "vcpus-count": 1, "type": "max-x86_64-cpu", "qom-path": BOOT},
    ],
    "query-cpus-fast": [{"qom-path": BOOT, "cpu-index": 0, "thread-id": 7}],
    "query-memory-size-summary": {"base-memory": 128 * 1024**2},
}


class FakeQmp:
    def __init__(self, replies: dict[str, Any]) -> None:
        self.replies = dict(replies)
        self.asked: list[str] = []

    async def execute(self, command: str, arguments: dict[str, Any] | None = None) -> Any:
        self.asked.append(command)
        if command == "qom-get":
            return 0
        reply = self.replies[command]
        if isinstance(reply, BaseException):
            raise reply
        return reply


def keeper(tmp_path: Path, qmp: FakeQmp) -> ViewKeeper:
    # our own pid stands for QEMU: /proc has its CPU time
    return ViewKeeper(RunFiles(str(tmp_path)), "vm1", qmp, os.getpid(), None, agent=False)


def test_it_records_what_qemu_says_and_the_agent_is_not_configured(tmp_path: Path) -> None:
    qmp = FakeQmp(REPLIES)
    kept = keeper(tmp_path, qmp)
    asyncio.run(kept.refresh())
    view = read_view(tmp_path / VIEW_FILE)
    assert view is not None
    assert (view.runstate, view.vcpus_present, view.memory_bytes) == ("running", 1, 128 * 1024**2)
    assert view.apic_ids == {BOOT: 0}
    assert len(view.cpu_samples) == 1 and view.qmp_error is None
    assert view.guest is not None and view.guest.agent == "not configured"
    asyncio.run(kept.refresh())
    assert qmp.asked.count("qom-get") == 1  # a vCPU's APIC id is asked once


def test_a_machine_without_vcpu_hotplug_still_has_its_record(tmp_path: Path) -> None:
    qmp = FakeQmp({**REPLIES, "query-hotpluggable-cpus": RuntimeError("CommandNotFound")})
    asyncio.run(keeper(tmp_path, qmp).refresh())
    view = read_view(tmp_path / VIEW_FILE)
    assert view is not None and view.hotpluggable_cpus is None and view.vcpus_present == 1


def test_a_qemu_that_stops_answering_keeps_the_facts_and_says_why(tmp_path: Path) -> None:
    qmp = FakeQmp(REPLIES)
    kept = keeper(tmp_path, qmp)
    asyncio.run(kept.refresh())
    qmp.replies["query-status"] = TimeoutError()
    asyncio.run(kept.refresh())
    view = read_view(tmp_path / VIEW_FILE)
    assert view is not None and view.vcpus_present == 1
    assert view.qmp_error == "QEMU did not answer QMP within 2 s"


def test_events_make_it_dirty_and_only_changing_commands_refresh_it(tmp_path: Path) -> None:
    kept = keeper(tmp_path, FakeQmp(REPLIES))
    kept.on_event("RTC_CHANGE")
    assert not kept.dirty
    kept.on_event("DEVICE_DELETED")
    assert kept.dirty
    asyncio.run(kept.refresh())
    assert not kept.dirty
    assert changes_view("device_add") and changes_view("qom-set")
    assert not changes_view("query-hotpluggable-cpus") and not changes_view("qom-get")


def test_nothing_is_written_once_closed(tmp_path: Path) -> None:
    async def scenario() -> None:
        kept = keeper(tmp_path, FakeQmp(REPLIES))
        kept.start()
        for _ in range(100):
            if (tmp_path / VIEW_FILE).exists():
                break
            await asyncio.sleep(0.01)
        await kept.close()
        written = (tmp_path / VIEW_FILE).read_bytes()
        await kept.refresh()  # a relayed command's, late
        assert (tmp_path / VIEW_FILE).read_bytes() == written
        kept.remove()  # after the exit record
        assert not (tmp_path / VIEW_FILE).exists()

    asyncio.run(scenario())
