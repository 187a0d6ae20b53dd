"""Memory hotplug arithmetic and messages, on QMP replies captured from QEMU 7.2 here
(q35, -m 256M,slots=2,maxmem=1G, a 256 MiB DIMM and a virtio-mem device of up to 256 MiB
with 128 MiB plugged)."""

from __future__ import annotations

from pathlib import Path

import pytest
from framework.fake_qmp import launch_record

from qvm.base.sizes import human_size
from qvm.control.memory import check_room, check_size, check_slot, memory_state_from
from qvm.errors import HotplugError
from qvm.layout.rundir import RunDir
from qvm.store.devices import DeviceRecord
from qvm.store.launch import LaunchRecord

MIB = 1024**2
LAUNCH = launch_record(memory_size=256 * MIB, memory_max=1024 * MIB, memory_slots=2)
DEVICES = [
    {
        "type": "dimm",
        "data": {
            "memdev": "/objects/mem-dimm0",
            "hotplugged": True,
            "addr": 4294967296,
            "hotpluggable": True,
            "size": 256 * MIB,
            "slot": 0,
            "node": 0,
            "id": "dimm0",
        },
    },
    {
        "type": "virtio-mem",
        "data": {
            "memdev": "/objects/mem-vmem0",
            "memaddr": 4563402752,
            "block-size": 2 * MIB,
            "size": 128 * MIB,
            "node": 0,
            "max-size": 256 * MIB,
            "requested-size": 128 * MIB,
            "id": "vmem0",
        },
    },
]
SUMMARY = {"base-memory": 256 * MIB, "plugged-memory": 384 * MIB}
RECORDS = [DeviceRecord("vmem0", "virtio-mem", bus="hp0")]
RUN = RunDir(Path("/s/vm1"))


def state(  # noqa: ANN201
    devices: list | None = None, summary: dict | None = None, launch: LaunchRecord | None = None
):
    return memory_state_from(
        "vm1",
        launch or LAUNCH,
        DEVICES if devices is None else devices,
        summary or SUMMARY,
        RECORDS,
        {"dimm0"},
        {"mem_kb": "549252", "blk": "-"},
    )


def test_devices_sizes_and_what_counts_against_max() -> None:
    s = state()
    dimm, vmem = s.devices
    assert (dimm.id, dimm.kind, dimm.slot, dimm.backend, dimm.state) == (
        "dimm0",
        "dimm",
        0,
        "mem-dimm0",
        "unplug-pending",
    )
    assert (vmem.kind, vmem.size, vmem.max_size, vmem.bus, vmem.by_qvm) == (
        "virtio-mem",
        128 * MIB,
        256 * MIB,
        "hp0",
        True,
    )
    # QEMU gives the guest 256 + 256 + 128; of maxmem, the virtio-mem device takes its max
    assert (s.total, s.in_use, s.room, s.slots_used) == (640 * MIB, 768 * MIB, 256 * MIB, 1)
    assert s.guest_kb == 549252
    assert s.summary() == (
        "640 MiB (256 MiB boot + 384 MiB plugged); 768 MiB of memory.max 1 GiB in use, "
        "room for 256 MiB; 1 of 2 DIMM slots used"
    )
    record = s.as_json()
    assert record["devices"][1]["requested_size"] == 128 * MIB
    assert record["guest_mem_kb"] == 549252


def test_past_max_says_current_asked_and_max() -> None:
    with pytest.raises(HotplugError) as error:
        check_room(state(), RUN, LAUNCH, 512 * MIB)
    assert str(error.value) == (
        "vm1: mem add 512 MiB: past memory.max: 768 MiB in use (256 MiB boot + 512 MiB of "
        "memory devices), asked 512 MiB, max 1 GiB (hint: add at most 256 MiB, or raise "
        "memory.max in /nowhere/machines/vm1.toml, then qvm restart vm1)"
    )
    check_room(state(), RUN, LAUNCH, 256 * MIB)  # exactly the room left


def test_no_free_slot_says_slots_used_of_total() -> None:
    two = [DEVICES[0], {**DEVICES[0], "data": {**DEVICES[0]["data"], "id": "dimm1", "slot": 1}}]
    with pytest.raises(HotplugError) as error:
        check_slot(state(two), RUN, LAUNCH)
    assert str(error.value) == (
        "vm1: mem add: no free memory slot: 2 of 2 DIMM slots used (hint: remove a DIMM "
        "with qvm mem del, add --virtio-mem (it needs no slot; without --max it reserves "
        "all the 256 MiB left below memory.max), or raise memory.slots in "
        "/nowhere/machines/vm1.toml, then qvm restart vm1)"
    )
    check_slot(state(), RUN, LAUNCH)
    # no room left: a virtio-mem device would not fit either, so it is not offered
    full = [{**d, "data": {**d["data"], "size": 384 * MIB}} for d in two]
    with pytest.raises(HotplugError) as error:
        check_slot(state(full), RUN, LAUNCH)
    assert "virtio-mem" not in str(error.value), error.value


def test_memory_hotplug_off() -> None:
    launch = LAUNCH._replace(memory_max=None, memory_slots=0)
    off = state([], {"base-memory": 256 * MIB, "plugged-memory": 0}, launch)
    assert off.summary() == "256 MiB; memory hotplug is off (no memory.max and memory.slots)"
    with pytest.raises(HotplugError, match="memory hotplug is off"):
        check_room(off, RUN, launch, 128 * MIB)


def test_sizes_are_multiples_of_2m() -> None:
    check_size("vm1", "mem add", 128 * MIB)
    with pytest.raises(HotplugError) as error:
        check_size("vm1", "mem add", 3 * MIB)
    assert str(error.value) == (
        "vm1: mem add: the size must be a positive multiple of 2 MiB, got 3145728 bytes "
        '(3 MiB) (hint: sizes look like "256M" or "1G")'
    )


def test_human_size() -> None:
    assert [human_size(n) for n in (0, 512, 1024, 256 * MIB, 1536 * MIB)] == [
        "0 B",
        "512 B",
        "1 KiB",
        "256 MiB",
        "1.5 GiB",
    ]
