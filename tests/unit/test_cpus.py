"""The pure parts of vCPU hotplug, on QMP replies captured from QEMU 7.2 on this machine."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from qvm.cpus import (
    CpuList,
    choose_free_slots,
    choose_removals,
    match_unplug_event,
    merge_slots,
    parse_slot_spec,
    pending_ids,
    props_text,
    topology_from_launch,
)
from qvm.errors import HotplugError
from qvm.hotplug import tcg_unplug_refusal
from qvm.rundir import RunDir, write_json_atomic
from qvm.topology import Topology

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
LAUNCH = {
    "machine_file": "/nowhere/machines/vm1.toml",
    "vcpus_boot": 1,
    "vcpus_max": 4,
    "accel": "tcg",
    "topology": {"sockets": 1, "dies": 1, "cores": 4, "threads": 1},
}


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


def full(launch_boot: int) -> tuple[CpuList, dict]:
    entries = [
        dict(e, **{"qom-path": f"/machine/peripheral/cpu{3 - i}"})
        for i, e in enumerate(HOTPLUGGABLE[:3])
    ]
    entries.append(HOTPLUGGABLE[3])
    return cpus(hotpluggable=entries), dict(LAUNCH, vcpus_boot=launch_boot)


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
    launch["machine_file"] = str(tmp_path / "machines" / "vm1.toml")
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
    assert topology_from_launch({}) is None


def _state(run: RunDir, pid: int, start: int) -> None:
    run.path.mkdir(parents=True, exist_ok=True)
    write_json_atomic(run.state_file, {"qemu_pid": pid, "qemu_start_time": start})


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
    assert tcg_unplug_refusal(run, dict(LAUNCH, accel="kvm")) is None
    _state(run, 101, 6)  # QEMU restarted: the record is about a run that is over
    assert tcg_unplug_refusal(run, LAUNCH) is None
