"""QEMU's replies, each parsed once (qvm.supervisor.qmp_replies): QEMU 7.2's shapes, and a
scan that keeps the reply's keys out of every other module."""

from __future__ import annotations

from pathlib import Path

from qvm.supervisor import qmp_replies as replies

MIB = 1024**2


def test_memory_devices() -> None:
    reply = [
        {
            "type": "dimm",
            "data": {
                "id": "dimm0",
                "memdev": "/objects/mem-dimm0",
                "size": 256 * MIB,
                "slot": 0,
                "addr": 4 * 1024**3,
            },
        },
        {
            "type": "virtio-mem",
            "data": {
                "id": "vmem0",
                "memdev": "/objects/mem-vmem0",
                "size": 128 * MIB,
                "max-size": 512 * MIB,
                "requested-size": 128 * MIB,
                "block-size": 2 * MIB,
                "memaddr": 5 * 1024**3,
            },
        },
        "junk",
    ]
    dimm, vmem = replies.memory_devices(reply)
    assert (dimm.id, dimm.type, dimm.backend, dimm.size, dimm.slot) == (
        "dimm0",
        "dimm",
        "mem-dimm0",
        256 * MIB,
        0,
    )
    assert dimm.backend_size == 256 * MIB and dimm.addr == 4 * 1024**3
    assert (vmem.type, vmem.max_size, vmem.requested_size, vmem.addr) == (
        "virtio-mem",
        512 * MIB,
        128 * MIB,
        5 * 1024**3,
    )
    assert vmem.backend_size == 512 * MIB
    assert replies.memory_devices(None) == []


def test_memory_summary() -> None:
    summary = replies.memory_summary({"base-memory": 256 * MIB, "plugged-memory": 128 * MIB})
    assert (summary.base, summary.plugged, summary.total) == (256 * MIB, 128 * MIB, 384 * MIB)
    assert replies.memory_summary({}).total == 0
    assert replies.memory_summary({}).base is None


def test_vcpu_slots_and_running_vcpus() -> None:
    slots = replies.hotpluggable_cpus(
        [
            {
                "type": "qemu64-x86_64-cpu",
                "vcpus-count": 1,
                "props": {"socket-id": 1, "core-id": 0, "thread-id": 0},
            },
            {
                "type": "qemu64-x86_64-cpu",
                "vcpus-count": 1,
                "qom-path": "/machine/unattached/device[0]",
                "props": {"socket-id": 0, "core-id": 0, "thread-id": 0},
            },
        ]
    )
    assert [s.qom_path for s in slots] == [None, "/machine/unattached/device[0]"]
    assert slots[0].props == {"socket-id": 1, "core-id": 0, "thread-id": 0}
    (cpu,) = replies.cpus_fast([{"cpu-index": 0, "qom-path": "/machine/x", "thread-id": 77}])
    assert (cpu.cpu_index, cpu.qom_path, cpu.thread_id) == (0, "/machine/x", 77)


def test_block_devices_and_named_nodes() -> None:
    image = {
        "filename": "/s/vm1/disk0.qcow2",
        "format": "qcow2",
        "virtual-size": 1024**3,
        "snapshots": [
            {"name": "booted", "vm-clock-sec": 2, "vm-clock-nsec": 5, "vm-state-size": 9}
        ],
    }
    disk, cdrom = replies.block_devices(
        [
            {
                "device": "",
                "qdev": "/machine/peripheral/disk0/virtio-backend",
                "inserted": {
                    "node-name": "disk0",
                    "file": "/s/vm1/disk0.qcow2",
                    "drv": "qcow2",
                    "ro": False,
                    "image": image,
                },
            },
            {"device": "ide1-cd0", "qdev": "/machine/unattached/device[23]"},
        ]
    )
    assert disk.device_id == "disk0" and cdrom.device_id is None and cdrom.inserted is None
    assert disk.inserted is not None
    assert (disk.inserted.node, disk.inserted.driver, disk.inserted.virtual_size) == (
        "disk0",
        "qcow2",
        1024**3,
    )
    (snapshot,) = disk.inserted.snapshots
    assert (snapshot.name, snapshot.vm_clock_ns, snapshot.vm_state_size) == (
        "booted",
        2 * 10**9 + 5,
        9,
    )
    (state,) = replies.named_block_nodes(
        [
            {
                "node-name": "qvm-state",
                "drv": "qcow2",
                "ro": False,
                "image": {"filename": "/s/vm1/state.qcow2"},
            }
        ]
    )
    assert (state.node, state.file, state.readonly) == ("qvm-state", "/s/vm1/state.qcow2", False)


def test_runstate() -> None:
    assert replies.runstate({"status": "inmigrate", "running": False}) == "inmigrate"
    assert replies.runstate({}, "paused") == "paused"


def test_the_replies_keys_are_read_in_one_module() -> None:
    """A second parse of these queries would read their keys again somewhere else."""
    qvm = Path(__file__).resolve().parents[3] / "qvm"
    keys = (
        '"plugged-memory"',
        '"base-memory"',
        '"requested-size")',
        '"vcpus-count"',
        '"cpu-index"',
    )
    readers = {
        key: sorted(str(p.relative_to(qvm)) for p in qvm.rglob("*.py") if key in p.read_text())
        for key in keys
    }
    assert readers == dict.fromkeys(keys, ["supervisor/qmp_replies.py"])
