"""vCPU hotplug, on QMP replies captured from QEMU 7.2 on this machine (the fake QMP
plays QEMU where a session is needed)."""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import pytest
from framework.fake_qmp import FakeQmp, device_deleted, launch_record, state_json

from qvm.base.jsonfile import write_json_atomic
from qvm.cli.commands.cpu import _add_problems, _say_added
from qvm.control.cpu import AddedCpu, AddResult, _add, _remove
from qvm.control.cpu_online import cr0_by_cpu, started_by_guest, wait_online
from qvm.control.cpu_slots import (
    CpuList,
    choose_free_slots,
    choose_removals,
    merge_slots,
    parse_slot_spec,
    props_text,
    topology_from_launch,
)
from qvm.control.events import match_unplug_event
from qvm.control.guard import tcg_unplug_refusal
from qvm.definition.topology import Topology
from qvm.errors import ControlError, HotplugError
from qvm.layout.rundir import RunDir
from qvm.store.pending import pending_ids, pending_marks

TYPE = "max-x86_64-cpu"

# `-smp 1,sockets=1,cores=4,threads=1,maxcpus=4` with cpu1 hotplugged: QEMU lists the
# slots highest first, and its props dict in its own key order
HOTPLUGGABLE = [
    {"props": {"core-id": 3, "thread-id": 0, "socket-id": 0}, "vcpus-count": 1, "type": TYPE},
    {"props": {"core-id": 2, "thread-id": 0, "socket-id": 0}, "vcpus-count": 1, "type": TYPE},
    {
        "props": {"core-id": 1, "thread-id": 0, "socket-id": 0},
        "vcpus-count": 1,
        "qom-path": "/machine/peripheral/cpu1",
        "type": TYPE,
    },
    {
        "props": {"core-id": 0, "thread-id": 0, "socket-id": 0},
        "vcpus-count": 1,
        "qom-path": "/machine/unattached/device[0]",
        "type": TYPE,
    },
]
CPUS_FAST = [
    {
        "thread-id": 13907,
        "props": {"core-id": 0, "thread-id": 0, "socket-id": 0},
        "qom-path": "/machine/unattached/device[0]",
        "cpu-index": 0,
        "target": "x86_64",
    },
    {
        "thread-id": 14032,
        "props": {"core-id": 1, "thread-id": 0, "socket-id": 0},
        "qom-path": "/machine/peripheral/cpu1",
        "cpu-index": 1,
        "target": "x86_64",
    },
]
TOPO = Topology(sockets=1, dies=1, cores=4, threads=1)
LAUNCH = launch_record(
    vcpus_boot=1, vcpus_max=4, topology={"sockets": 1, "dies": 1, "cores": 4, "threads": 1}
)


def cpus(pending: tuple[str, ...] = (), hotpluggable: list | None = None) -> CpuList:
    slots = merge_slots(hotpluggable or HOTPLUGGABLE, CPUS_FAST, pending, TOPO)
    return CpuList("vm1", slots)


def test_merge_orders_slots_lowest_first_and_fills_in_cpus_fast() -> None:
    slots = cpus().slots
    assert [s.index for s in slots] == [0, 1, 2, 3]
    boot, cpu1, free2, free3 = slots
    assert (boot.state, boot.id, boot.removable, boot.boot) == ("present", None, False, True)
    assert (boot.cpu_index, boot.thread_id) == (0, 13907)
    assert boot.qom_path == "/machine/unattached/device[0]"
    assert (cpu1.state, cpu1.id, cpu1.removable, cpu1.boot) == ("present", "cpu1", True, False)
    assert (cpu1.cpu_index, cpu1.thread_id) == (1, 14032)
    assert free2.state == "free" and free2.qom_path is None and free2.cpu_index is None
    # QEMU's dict, untouched (key order included), and its type as the driver
    assert list(free3.props) == ["core-id", "thread-id", "socket-id"]
    assert free3.type == TYPE


def test_json_shape_has_the_documented_keys() -> None:
    record = cpus().slots[1].as_json()
    for key in ("props", "present", "qom_path", "cpu_index", "id", "removable", "state"):
        assert key in record
    assert record["state"] == "present" and record["present"] is True


def test_pending_mark_only_on_a_present_device() -> None:
    listing = cpus(pending=("cpu1", "cpu3"))
    assert [s.state for s in listing.slots] == ["present", "unplug-pending", "free", "free"]
    assert listing.summary() == "2 of 4 vCPUs present, 1 unplug pending"
    assert cpus().summary() == "2 of 4 vCPUs present"


def test_topology_order_with_sockets_and_threads() -> None:
    topo = Topology(sockets=2, dies=1, cores=2, threads=2)
    entries = [
        {"props": {"socket-id": s, "core-id": c, "thread-id": t}, "type": TYPE}
        for s in (1, 0)
        for c in (1, 0)
        for t in (1, 0)
    ]
    slots = merge_slots(entries, [], (), topo)
    assert [s.index for s in slots] == list(range(8))
    assert [props_text(s.props) for s in slots[:3]] == [
        "socket-id=0,core-id=0,thread-id=0",
        "socket-id=0,core-id=0,thread-id=1",
        "socket-id=0,core-id=1,thread-id=0",
    ]
    assert slots[5].props == {"socket-id": 1, "core-id": 0, "thread-id": 1}


def test_merge_without_topology_sorts_by_props() -> None:
    slots = merge_slots(HOTPLUGGABLE, CPUS_FAST, (), None)
    assert [s.props["core-id"] for s in slots] == [0, 1, 2, 3]


def test_lowest_free_slots_first_and_their_stable_ids(tmp_path: Path) -> None:
    run = RunDir(tmp_path / "vm1")
    chosen = choose_free_slots(cpus(), 2, None, LAUNCH, run)
    assert [s.props["core-id"] for s in chosen] == [2, 3]
    assert [s.label for s in chosen] == ["cpu2", "cpu3"]


def test_slot_by_props(tmp_path: Path) -> None:
    run = RunDir(tmp_path / "vm1")
    chosen = choose_free_slots(cpus(), 1, {"core-id": 3}, LAUNCH, run)
    assert chosen[0].label == "cpu3"
    with pytest.raises(HotplugError) as taken:
        choose_free_slots(
            cpus(), 1, parse_slot_spec("socket-id=0,core-id=1,thread-id=0"), LAUNCH, run
        )
    assert str(taken.value) == (
        "vm1: slot socket-id=0,core-id=1,thread-id=0 is already taken by cpu1 "
        "(hint: qvm cpu list vm1 shows the free slots)"
    )
    with pytest.raises(HotplugError) as boot:
        choose_free_slots(cpus(), 1, {"core-id": 0}, LAUNCH, run)
    assert "already taken by the boot vCPU" in str(boot.value)
    with pytest.raises(HotplugError) as missing:
        choose_free_slots(cpus(), 1, {"socket-id": 1, "core-id": 0, "thread-id": 0}, LAUNCH, run)
    assert str(missing.value) == (
        "vm1: no vCPU slot socket-id=1,core-id=0,thread-id=0 (hint: free slots: "
        "socket-id=0,core-id=2,thread-id=0 socket-id=0,core-id=3,thread-id=0; "
        "see qvm cpu list vm1)"
    )


def full(launch_boot: int) -> tuple[CpuList, Any]:
    entries = [
        dict(e, **{"qom-path": f"/machine/peripheral/cpu{3 - i}"})
        for i, e in enumerate(HOTPLUGGABLE[:3])
    ]
    entries.append(HOTPLUGGABLE[3])
    return cpus(hotpluggable=entries), LAUNCH._replace(vcpus_boot=launch_boot)


def test_no_free_slot_messages(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)  # the machine file is elsewhere: its absolute path
    run = RunDir(tmp_path / "vm1")
    listing, launch = full(launch_boot=1)
    with pytest.raises(HotplugError) as error:
        choose_free_slots(listing, 1, None, launch, run)
    assert str(error.value) == (
        "vm1: no free vCPU slot: 4 of 4 present (maxcpus=4) "
        "(hint: raise cpu.max in /nowhere/machines/vm1.toml, then qvm restart vm1)"
    )
    listing, launch = full(launch_boot=4)
    with pytest.raises(HotplugError) as error:
        choose_free_slots(listing, 1, None, launch, run)
    assert "it was started with cpu.count = cpu.max = 4" in str(error.value)
    assert "raise cpu.max" in str(error.value)
    with pytest.raises(HotplugError) as error:
        choose_free_slots(cpus(), 3, None, LAUNCH, run)
    assert str(error.value).startswith(
        "vm1: only 2 free vCPU slots for 3 new vCPUs: 2 of 4 present (maxcpus=4)"
    )


def test_hint_names_the_machine_file_relative_to_the_current_folder(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    (tmp_path / "machines").mkdir()
    monkeypatch.chdir(tmp_path)
    listing, launch = full(launch_boot=1)
    launch = launch._replace(machine_file=str(tmp_path / "machines" / "vm1.toml"))
    with pytest.raises(HotplugError) as error:
        choose_free_slots(listing, 1, None, launch, RunDir(tmp_path / "vm1"))
    assert "(hint: raise cpu.max in machines/vm1.toml, then qvm restart vm1)" in str(error.value)


def test_removal_newest_first_and_clear_refusals() -> None:
    listing, _ = full(launch_boot=1)
    assert [s.label for s in choose_removals(listing, None, None, "vm1")] == ["cpu3"]
    assert [s.label for s in choose_removals(listing, None, 2, "vm1")] == ["cpu3", "cpu2"]
    assert [s.label for s in choose_removals(listing, ["cpu1", "cpu3"], None, "vm1")] == [
        "cpu1",
        "cpu3",
    ]
    with pytest.raises(HotplugError) as boot:
        choose_removals(listing, ["cpu0"], None, "vm1")
    assert str(boot.value) == (
        "vm1: cpu0 is a boot vCPU (started by -smp, not as a device): it cannot be unplugged"
    )
    with pytest.raises(HotplugError) as unknown:
        choose_removals(listing, ["cpu9"], None, "vm1")
    assert str(unknown.value) == (
        "vm1: no vCPU with id 'cpu9' (removable: cpu1, cpu2, cpu3) (hint: qvm cpu list vm1)"
    )
    with pytest.raises(HotplugError) as free:
        choose_removals(cpus(), ["cpu3"], None, "vm1")
    assert (
        str(free.value)
        == "vm1: cpu3 is not present (its slot socket-id=0,core-id=3,thread-id=0 is free)"
    )
    with pytest.raises(HotplugError) as many:
        choose_removals(listing, None, 4, "vm1")
    assert str(many.value) == (
        "vm1: cannot remove 4 vCPUs: only 3 can be unplugged (cpu1, cpu2, cpu3); "
        "the boot vCPU stays"
    )


def test_pending_vcpus_are_not_chosen_again_by_count() -> None:
    with pytest.raises(HotplugError) as error:
        choose_removals(cpus(pending=("cpu1",)), None, 1, "vm1")
    assert str(error.value) == (
        "vm1: cannot remove 1 vCPU: no vCPU can be unplugged, 1 already unplug-pending; "
        "the boot vCPU stays"
    )


@pytest.mark.parametrize(
    ("event", "expected"),
    [
        # what QEMU 7.2 really sends for a vCPU: the lapic child's path, no device
        (
            {"event": "DEVICE_DELETED", "data": {"path": "/machine/peripheral/cpu1/lapic"}},
            ("cpu1", "deleted"),
        ),
        (
            {
                "event": "DEVICE_DELETED",
                "data": {"device": "cpu1", "path": "/machine/peripheral/cpu1"},
            },
            ("cpu1", "deleted"),
        ),
        # another device whose id starts the same way
        (
            {"event": "DEVICE_DELETED", "data": {"path": "/machine/peripheral/cpu10/lapic"}},
            ("", ""),
        ),
        (
            {"event": "DEVICE_UNPLUG_GUEST_ERROR", "data": {"path": "/machine/peripheral/cpu1"}},
            ("cpu1", "refused"),
        ),
        # eject in progress (0x84), then success without a device: neither decides
        (
            {
                "event": "ACPI_DEVICE_OST",
                "data": {"info": {"device": "cpu1", "source": 3, "status": 132}},
            },
            ("", ""),
        ),
        (
            {"event": "ACPI_DEVICE_OST", "data": {"info": {"source": 3, "status": 0}}},
            ("", ""),
        ),
        (
            {
                "event": "ACPI_DEVICE_OST",
                "data": {"info": {"device": "cpu1", "source": 3, "status": 0x81}},
            },
            ("cpu1", "refused"),
        ),
    ],
)
def test_unplug_events(event: dict, expected: tuple[str, str]) -> None:
    dev_id, what, detail = match_unplug_event(event, ["cpu1", "cpu2"])
    assert (dev_id, what) == expected
    if what == "refused" and event["event"] == "ACPI_DEVICE_OST":
        assert detail == (
            "the guest refused the eject (ACPI _OST status 0x81: device in use by an application)"
        )


def test_unplug_event_of_a_device_added_without_id() -> None:
    event = {
        "event": "DEVICE_DELETED",
        "data": {"path": "/machine/peripheral-anon/device[2]/lapic"},
    }
    path = "/machine/peripheral-anon/device[2]"
    assert match_unplug_event(event, [path])[:2] == (path, "deleted")


def test_parse_slot_spec() -> None:
    assert parse_slot_spec("socket-id=0,core-id=1,thread-id=0") == {
        "socket-id": 0,
        "core-id": 1,
        "thread-id": 0,
    }
    assert parse_slot_spec(" core-id = 2 ") == {"core-id": 2}
    with pytest.raises(ValueError, match="core-id must be an integer"):
        parse_slot_spec("core-id=x")
    with pytest.raises(ValueError, match="expected key=value"):
        parse_slot_spec("core-id")


def test_topology_from_launch() -> None:
    assert topology_from_launch(LAUNCH) == TOPO
    assert topology_from_launch(LAUNCH._replace(topology=None)) is None


def _state(run: RunDir, pid: int, start: int) -> None:
    run.path.mkdir(parents=True, exist_ok=True)
    write_json_atomic(run.state_file, state_json(pid, start))


def test_pending_marks_belong_to_one_qemu_run(tmp_path: Path) -> None:
    run = RunDir(tmp_path / "vm1")
    _state(run, 100, 5)
    write_json_atomic(
        run.pending_file,
        {
            "cpu1": {"qemu_pid": 100, "qemu_start_time": 5, "since": 1.0},
            "cpu2": {"qemu_pid": 99, "qemu_start_time": 4, "since": 1.0},
        },
    )
    assert pending_ids(run) == {"cpu1"}


def test_tcg_guard_applies_to_the_qemu_run_that_saw_an_unplug(tmp_path: Path) -> None:
    run = RunDir(tmp_path / "vm1")
    _state(run, 100, 5)
    assert tcg_unplug_refusal(run, LAUNCH) is None
    run.cpu_unplugged_file.write_text(json.dumps({"qemu_pid": 100, "qemu_start_time": 5}))
    assert tcg_unplug_refusal(run, LAUNCH) == (
        "vm1: cpu add refused: a vCPU was unplugged earlier in this QEMU run, and under TCG "
        "QEMU 7.2 crashes (double free) on the next vCPU device_add "
        "(hint: qvm restart vm1 first, or pass --force to try anyway)"
    )
    assert tcg_unplug_refusal(run, LAUNCH._replace(accel="kvm")) is None
    _state(run, 101, 6)  # QEMU restarted: the record is about a run that is over
    assert tcg_unplug_refusal(run, LAUNCH) is None


# HMP `info registers N` replies (QMP human-monitor-command), captured from QEMU 7.2 (TCG)
# on the test guest: cpu0 running the kernel, and cpu1 just after its device_add, still at
# its reset state (real mode, paging off) because the guest had not onlined it yet
REGISTERS_ONLINE = (
    "\r\nCPU#0\r\n"
    "RAX=000000000001ad40 RBX=0000000000000000 RCX=0000000000000000 RDX=4000000000000000\r\n"
    "RIP=ffffffff87c17a0b RFL=00000246 [---Z-P-] CPL=0 II=0 A20=1 SMM=0 HLT=1\r\n"
    "CS =0010 0000000000000000 ffffffff 00af9b00 DPL=0 CS64 [-RA]\r\n"
    "GDT=     fffffe0000001000 0000007f\r\n"
    "IDT=     fffffe0000000000 00000fff\r\n"
    "CR0=80050033 CR2=00000000005794a9 CR3=000000000291c000 CR4=00751eb0\r\n"
    "DR0=0000000000000000 DR1=0000000000000000 DR2=0000000000000000 DR3=0000000000000000 \r\n"
    "DR6=00000000ffff0ff0 DR7=0000000000000400\r\n"
    "EFER=0000000000000d01\r\n"
)
REGISTERS_NEW = (
    "\r\nCPU#1\r\n"
    "EAX=00000000 EBX=00000000 ECX=00000000 EDX=00060fb1\r\n"
    "EIP=0000fff0 EFL=00000002 [-------] CPL=0 II=0 A20=1 SMM=0 HLT=1\r\n"
    "CS =f000 ffff0000 0000ffff 00009b00\r\n"
    "GDT=     00000000 0000ffff\r\n"
    "IDT=     00000000 0000ffff\r\n"
    "CR0=60000010 CR2=00000000 CR3=00000000 CR4=00000000\r\n"
    "DR0=0000000000000000 DR1=0000000000000000 DR2=0000000000000000 DR3=0000000000000000 \r\n"
    "EFER=0000000000000000\r\n"
)


def test_cr0_of_one_vcpu_and_of_all() -> None:
    assert cr0_by_cpu(REGISTERS_ONLINE) == {0: 0x80050033}
    assert cr0_by_cpu(REGISTERS_NEW) == {1: 0x60000010}
    # `info registers -a`: one block per vCPU
    assert cr0_by_cpu(REGISTERS_ONLINE + REGISTERS_NEW) == {0: 0x80050033, 1: 0x60000010}
    assert started_by_guest(0x80050033) is True
    assert started_by_guest(0x60000010) is False


def test_cr0_of_a_vcpu_qemu_does_not_have() -> None:
    assert cr0_by_cpu("CPU#7 not available\r\n") == {}
    assert cr0_by_cpu("") == {}
    # other registers that end in CR0 are not CR0
    assert cr0_by_cpu("\r\nCPU#2\r\nXCR0=0000000000000007\r\n") == {}


def registers_session(registers: dict[int, list[str]]) -> FakeQmp:
    """query-cpus-fast, then `info registers N` replies, one per look (the last repeats)."""

    def info_registers(arguments: dict[str, Any]) -> str:
        replies = registers[int(arguments["command-line"].split()[-1])]
        return replies.pop(0) if len(replies) > 1 else replies[0]

    cpu2 = {"qom-path": "/machine/peripheral/cpu2", "cpu-index": 2, "thread-id": 1}
    return FakeQmp(
        replies={"query-cpus-fast": [*CPUS_FAST, cpu2], "human-monitor-command": info_registers}
    )


def test_wait_online_reads_each_new_vcpu_until_the_guest_starts_it(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr("qvm.control.cpu_online.ONLINE_POLL", 0.001)
    up = REGISTERS_ONLINE.replace("CPU#0", "CPU#1")
    never = REGISTERS_NEW.replace("CPU#1", "CPU#2")
    session = registers_session({1: [REGISTERS_NEW, REGISTERS_NEW, up], 2: [never]})
    started = time.monotonic()
    result = wait_online(session, ["cpu1", "cpu2"], set(), 0.2, started)
    assert result["cpu1"][0] is True and result["cpu1"][1] is not None
    assert result["cpu2"] == (False, None, None)
    assert time.monotonic() - started >= 0.2
    lines = {a["command-line"] for c, a in session.sent if c == "human-monitor-command"}
    assert lines == {"info registers 1", "info registers 2"}


def test_wait_online_looks_once_at_a_rejected_vcpu_and_says_when_it_cannot_tell() -> None:
    session = registers_session({2: [REGISTERS_NEW.replace("CPU#1", "CPU#2")]})
    started = time.monotonic()
    result = wait_online(session, ["cpu2", "cpu5"], {"cpu2"}, 30, started)
    assert time.monotonic() - started < 5
    assert result["cpu2"] == (False, None, None)
    assert result["cpu5"] == (
        None,
        None,
        "QEMU lists no /machine/peripheral/cpu5 in query-cpus-fast",
    )
    session = registers_session({2: ["CPU#2 not available\r\n"]})
    assert wait_online(session, ["cpu2"], set(), 30, started)["cpu2"] == (
        None,
        None,
        "HMP info registers 2 printed no CR0 (CPU#2 not available)",
    )


PROPS = {"socket-id": 0, "core-id": 1, "thread-id": 0}


def added(**kwargs: Any) -> AddResult:
    cpu = AddedCpu("cpu1", TYPE, PROPS, **kwargs)
    return AddResult("vm1", [cpu], 2, 4, waited_guest=True, guest_timeout=2.0)


def test_add_report_online(capsys: pytest.CaptureFixture[str]) -> None:
    result = added(acknowledged=True, ack_seconds=0.028, online=True, online_seconds=0.51)
    assert result.complete and _add_problems(result) == []
    _say_added(result)
    assert capsys.readouterr().out == (
        "vm1: added cpu1 (socket-id=0,core-id=1,thread-id=0); the guest acknowledged it "
        "(ACPI _OST) after 28 ms, online after 510 ms\n"
    )
    assert result.as_json()["added"][0]["online"] is True
    assert result.as_json()["added"][0]["online_seconds"] == 0.51


def test_add_report_not_online() -> None:
    no_os = added(acknowledged=False, online=False)
    assert not no_os.complete
    assert _add_problems(no_os) == [
        "vm1: cpu1 was added but not started by the guest within 2 s; the guest did not "
        "acknowledge it either (no guest OS, or its ACPI CPU hotplug is not active)"
    ]
    offline = added(acknowledged=True, ack_seconds=0.025, online=False)
    assert _add_problems(offline) == [
        "vm1: cpu1 was added but not started by the guest within 2 s; the guest acknowledged "
        "it (ACPI _OST) after 25 ms but has not onlined it (hint: the guest must online "
        "hotplugged CPUs itself, e.g. with a udev rule; see docs/hotplug.md)"
    ]
    rejected = added(acknowledged=False, ack_detail="OST status 0x1", online=False)
    assert _add_problems(rejected) == [
        "vm1: cpu1 was added, but the guest rejected it (OST status 0x1)"
    ]
    unknown = added(acknowledged=True, online=None, online_detail="why")
    assert not unknown.complete
    assert _add_problems(unknown) == [
        "vm1: cpu1 was added, but qvm could not tell whether the guest started it: why"
    ]


# --- add and remove through the shared transaction ------------------------------------------


def slots_session(**kwargs: Any) -> FakeQmp:
    """QEMU with the slots of HOTPLUGGABLE: device_add fills one, device_del frees one."""
    slots = [dict(e) for e in HOTPLUGGABLE]

    def plugged(arguments: dict[str, Any]) -> dict:
        slot = next(s for s in slots if s["props"]["core-id"] == arguments["core-id"])
        slot["qom-path"] = f"/machine/peripheral/{arguments['id']}"
        return {}

    def unplugged(arguments: dict[str, Any]) -> dict:
        for slot in slots:
            if slot.get("qom-path") == f"/machine/peripheral/{arguments['id']}":
                del slot["qom-path"]
        return {}

    replies = {
        "query-hotpluggable-cpus": lambda _: [dict(s) for s in slots],
        "query-cpus-fast": CPUS_FAST,
        "device_add": plugged,
        "device_del": unplugged,
    }
    return FakeQmp(replies=replies, **kwargs)


def _run(tmp_path: Path) -> RunDir:
    run = RunDir(tmp_path / "vm1")
    _state(run, 100, 5)
    return run


def test_add_fills_the_lowest_free_slots_and_waits_for_the_acks(tmp_path: Path) -> None:
    run = _run(tmp_path)

    def acks(arguments: dict[str, Any]) -> list[dict]:
        info = {
            "device": arguments["id"],
            "source": 1,
            "status": 0 if arguments["id"] == "cpu2" else 1,
        }
        return [{"event": "ACPI_DEVICE_OST", "data": {"info": info}}]

    session = slots_session(events={"device_add": acks})
    session.replies["human-monitor-command"] = REGISTERS_ONLINE.replace("CPU#0", "CPU#2")
    session.replies["query-cpus-fast"] = [
        *CPUS_FAST,
        {"qom-path": "/machine/peripheral/cpu2", "cpu-index": 2},
        {"qom-path": "/machine/peripheral/cpu3", "cpu-index": 3},
    ]
    result = _add(session, run, LAUNCH, 2, None, True, None, 5.0, False)
    assert [(a.id, a.acknowledged, a.online) for a in result.added] == [
        ("cpu2", True, True),
        ("cpu3", False, None),
    ]
    assert result.added[1].ack_detail == "ACPI _OST status 0x1: non-specific failure"
    assert result.present == 4


def test_a_later_refused_device_add_says_which_vcpus_were_added(tmp_path: Path) -> None:
    run = _run(tmp_path)
    session = slots_session()
    session.replies["device_add"] = lambda args: (
        {} if args["id"] == "cpu2" else _raise("CPU core-id 3 is busy")
    )
    with pytest.raises(HotplugError) as error:
        _add(session, run, LAUNCH, 2, None, False, None, 5.0, False)
    assert str(error.value) == (
        "vm1: added cpu2, then device_add cpu3 failed: CPU core-id 3 is busy"
    )


def _raise(desc: str) -> Any:
    raise ControlError(f"vm1: device_add: {desc}", qemu_class="GenericError", qemu_desc=desc)


def test_remove_matches_the_lapic_and_confirms_with_the_slots(tmp_path: Path) -> None:
    run = _run(tmp_path)
    lapic = {
        "device_del": lambda a: [device_deleted(a["id"], f"/machine/peripheral/{a['id']}/lapic")]
    }
    result = _remove(slots_session(events=lapic), run, LAUNCH, ["cpu1"], None, 5.0)
    assert [(u.id, u.outcome, u.props) for u in result.unplugs] == [("cpu1", "removed", PROPS)]
    assert (result.present, result.max, result.complete) == (1, 4, True)
    # under TCG the unplug is remembered: the next device_add would crash QEMU 7.2
    assert tcg_unplug_refusal(run, LAUNCH) is not None


def test_remove_not_released_is_pending_and_legacy_mode_is_explained(tmp_path: Path) -> None:
    run = _run(tmp_path)
    session = slots_session()
    session.replies["device_del"] = {}  # the guest never releases it
    result = _remove(session, run, LAUNCH, None, None, 0.2)
    assert [(u.id, u.outcome, u.detail) for u in result.unplugs] == [
        ("cpu1", "pending", "the guest has not released it within 0.2 s")
    ]
    assert not pending_marks(run)["cpu1"].exact
    legacy = slots_session(
        refuse={"device_del": "acpi: device unplug request for not supported device type: x"}
    )
    with pytest.raises(HotplugError, match="no guest OS has enabled ACPI CPU hotplug"):
        _remove(legacy, RunDir(tmp_path / "vm2"), LAUNCH, ["cpu1"], None, 5.0)
