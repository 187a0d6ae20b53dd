"""The pure parts of snapshots: the record read back and checked, device-set and
definition-shape comparisons, and what of QEMU's argv a snapshot depends on."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from qvm.cmdline.argv import LaunchInputs, StartFrom, build_argv
from qvm.definition.schema import CpuSpec, Machine, MemorySpec
from qvm.errors import RecordError
from qvm.layout.rundir import RunDir
from qvm.ops.snapshot import TagError, check_tag, shape_of_argv, start_from
from qvm.store import snapshots
from qvm.store.launch import Forward

DIMM = snapshots.MemoryDevice("dimm0", "dimm", "mem-dimm0", 256 * 1024**2)


def record(tag: str = "booted", **changes: object) -> snapshots.SnapshotRecord:
    base = snapshots.SnapshotRecord(
        tag=tag,
        created=1.5,
        disk_only=False,
        guest_time_ns=123,
        vm_clock_ns=456,
        ram_bytes=512 * 1024**2,
        vmstate_bytes=100,
        vmstate_node="qvm-state",
        nodes=("qvm-state",),
        files=("/run/vm1/state.qcow2",),
        devices=snapshots.DeviceSet(
            cpu_slots=(0, 1, 2),
            memory=(DIMM,),
            forwards=(Forward("nic0", "tcp", "127.0.0.1", 2222, 22),),
        ),
        definition_sha256="ab" * 32,
        shape={"cpu": "max", "smp": "1,maxcpus=4"},
        save_seconds=0.1,
    )
    return base._replace(**changes)


def test_record_round_trip(tmp_path: Path) -> None:
    run = RunDir(tmp_path)
    snapshots.add_snapshot(run, record())
    snapshots.add_snapshot(run, record("second", disk_only=True))
    assert snapshots.read_snapshots(run) == (record(), record("second", disk_only=True))
    snapshots.add_snapshot(run, record(ram_bytes=1))  # same tag: replaced
    assert snapshots.find_snapshot(run, "booted").ram_bytes == 1  # type: ignore[union-attr]
    snapshots.drop_snapshot(run, "booted")
    assert [s.tag for s in snapshots.read_snapshots(run)] == ["second"]
    assert not list(tmp_path.glob(".*.tmp"))


@pytest.mark.parametrize(
    ("mutate", "key"),
    [
        (lambda d: d.pop("tag"), "tag"),
        (lambda d: d.update(created="yesterday"), "created"),
        (lambda d: d["devices"].update(cpu_slots=[0, "1"]), "cpu_slots"),
        (lambda d: d["devices"]["memory"][0].update(kind="ram"), "kind"),
        (lambda d: d.update(nodes="qvm-state"), "nodes"),
    ],
)
def test_bad_record_is_one_error_naming_the_key(tmp_path: Path, mutate, key: str) -> None:  # noqa: ANN001
    run = RunDir(tmp_path)
    data = record().to_json()
    mutate(data)
    run.snapshots_file.write_text(json.dumps({"snapshots": [data]}))
    with pytest.raises(RecordError) as caught:
        snapshots.read_snapshots(run)
    assert str(run.snapshots_file) in str(caught.value) and key in str(caught.value)


def test_not_json_is_a_record_error(tmp_path: Path) -> None:
    run = RunDir(tmp_path)
    run.snapshots_file.write_text("{")
    with pytest.raises(RecordError, match="not valid JSON"):
        snapshots.read_snapshots(run)


def test_device_set_differences() -> None:
    saved = record().devices
    assert snapshots.device_set_differences(saved, saved) == []
    # forwards are the host's business, not the guest's state
    assert snapshots.device_set_differences(saved, saved._replace(forwards=())) == []
    fewer = saved._replace(cpu_slots=(0,), memory=())
    assert snapshots.device_set_differences(saved, fewer) == [
        "vCPU slots {0,1,2} at save time, {0} now",
        "dimm dimm0 is gone",
    ]
    bigger = saved._replace(memory=(DIMM._replace(size=DIMM.size * 2),))
    assert snapshots.device_set_differences(saved, bigger) == ["dimm dimm0 changed"]
    disk = snapshots.PluggedDevice("disk1", "disk", file="/x.qcow2", format="qcow2")
    assert snapshots.device_set_differences(saved, saved._replace(plugged=(disk,))) == [
        "disk disk1 was added"
    ]


def test_shape_differences() -> None:
    assert snapshots.shape_differences({"a": 1}, {"a": 1}) == []
    assert snapshots.shape_differences({"smp": "x", "device:nic0": "e1000"}, {"smp": "y"}) == [
        "device:nic0: 'e1000' at save time, now unset",
        "smp: 'x' at save time, now 'y'",
    ]


def _machine(count: int = 1) -> Machine:
    return Machine(
        name="vm1",
        path=Path("/m/vm1.toml"),
        cpu=CpuSpec(count=count, max=4),
        memory=MemorySpec(size=256 * 1024**2, max=1024**3, slots=2),
    )


def test_shape_leaves_out_the_device_set_and_host_facts() -> None:
    run = RunDir(Path("/s/vm1"))
    plain = build_argv(_machine(), LaunchInputs(accel="tcg", run_dir=run))
    start = StartFrom(
        cpu_slots=(0, 1, 3),
        memory_devices=(DIMM,),
        loadvm="booted",
    )
    restoring = build_argv(
        _machine(), LaunchInputs(accel="tcg", run_dir=run, state_disk=True, **start._asdict())
    )
    # the restart's argv has the snapshot's devices, the state disk and -loadvm ...
    joined = " ".join(restoring)
    assert "id=cpu1," in joined and "id=cpu3," in joined and "id=cpu2," not in joined
    assert "pc-dimm,id=dimm0,memdev=mem-dimm0" in joined
    assert "-loadvm booted" in joined and "node-name=qvm-state," in joined
    # ... and the same shape as a plain boot
    assert shape_of_argv(plain) == shape_of_argv(restoring)
    assert shape_of_argv(build_argv(_machine(count=2), LaunchInputs("tcg", run))) == (
        shape_of_argv(plain)
    )
    other = _machine()._replace(cpu=CpuSpec(count=1, max=3))
    assert snapshots.shape_differences(
        shape_of_argv(plain), shape_of_argv(build_argv(other, LaunchInputs("tcg", run)))
    ) == ["smp: '1,sockets=1,cores=4,threads=1,maxcpus=4' at save time, now "
          "'1,sockets=1,cores=3,threads=1,maxcpus=3'"]  # fmt: skip


def test_start_from_a_record() -> None:
    start = start_from(record())
    assert start.cpu_slots == (0, 1, 2) and start.loadvm == "booted"
    assert start.memory_devices == (DIMM,)


@pytest.mark.parametrize("tag", ["", "-x", "a b", "x/y", "a" * 65, "é"])
def test_bad_tags(tag: str) -> None:
    with pytest.raises(TagError):
        check_tag("vm1", tag)


def test_summary() -> None:
    assert record().devices.summary() == "3 vCPUs, 1 DIMM"
    assert snapshots.DeviceSet(cpu_slots=(0,)).summary() == "1 vCPU"


DISK = snapshots.PluggedDevice("disk1", "disk", "/s/vm1/hotplug-disk1.qcow2", "qcow2", bus="hp0")
NIC = snapshots.PluggedDevice("net1", "nic", model="virtio-net-pci", mac="52:54:00:00:00:01")


def test_plugged_devices_on_the_command_line_keep_their_ids_and_leave_the_shape() -> None:
    run = RunDir(Path("/s/vm1"))
    plain = build_argv(_machine(), LaunchInputs(accel="tcg", run_dir=run))
    start = start_from(record(devices=snapshots.DeviceSet(cpu_slots=(0,), plugged=(DISK, NIC))))
    restoring = build_argv(_machine(), LaunchInputs("tcg", run, **start._asdict()))
    joined = " ".join(restoring)
    assert (
        "-blockdev driver=file,node-name=disk1-file,filename=/s/vm1/hotplug-disk1.qcow2 "
        "-blockdev driver=qcow2,node-name=disk1,file=disk1-file "
        "-device virtio-blk-pci,drive=disk1,id=disk1,bus=hp0"
    ) in joined
    assert "-netdev user,id=net1 " in joined
    assert "virtio-net-pci,netdev=net1,mac=52:54:00:00:00:01,id=net1" in joined
    # the snapshot carries them: the shape is a plain boot's, as at save time
    assert shape_of_argv(restoring, (DISK, NIC)) == shape_of_argv(plain)
    assert shape_of_argv(restoring) != shape_of_argv(plain)


def test_a_run_from_a_snapshot_restarts_cold(tmp_path: Path) -> None:
    from qvm.host.accel import AccelChoice
    from qvm.ops.up import LaunchPlan

    run = RunDir(tmp_path)
    machine = _machine()
    accel = AccelChoice("tcg", "test")
    cold = LaunchInputs("tcg", run)
    start = start_from(record(devices=snapshots.DeviceSet(cpu_slots=(0, 1), plugged=(DISK,))))
    warm = cold._replace(**start._asdict())
    assert LaunchPlan(machine, run, accel, build_argv(machine, cold), cold).cold_argv() is None
    plan = LaunchPlan(machine, run, accel, build_argv(machine, warm), warm)
    assert "-loadvm" in plan.argv
    assert plan.cold_argv() == tuple(build_argv(machine, cold))
    assert plan.launch_record().restart_argv == tuple(build_argv(machine, cold))


def test_clone_record_keeps_the_template_macs(tmp_path: Path) -> None:
    run = RunDir(tmp_path)
    devices = snapshots.DeviceSet(cpu_slots=(0,))
    macs = {"net0": "52:54:00:aa:bb:cc"}
    clone = snapshots.CloneRecord("tpl", "ready", "/s/tpl@ready/memory.bin", devices, macs)
    snapshots.write_clone(run, clone)
    assert snapshots.read_clone(run) == clone
    snapshots.write_clone(run, clone._replace(mac_note="set"))
    assert snapshots.read_clone(run).mac_note == "set"  # type: ignore[union-attr]
    data = json.loads(run.clone_file.read_text())
    data["template_macs"] = {"net0": 7}
    run.clone_file.write_text(json.dumps(data))
    with pytest.raises(RecordError, match="template_macs"):
        snapshots.read_clone(run)


def test_clone_first_start_sets_the_guest_clock_as_a_restore_does(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The clone's guest resumes with the template's clock at the save: its first start
    sets it through the agent when one answered at the save, and says so."""
    from qvm.ops import incoming

    run = RunDir(tmp_path)
    devices = snapshots.DeviceSet(cpu_slots=(0,))
    asked: list[str] = []

    def set_guest_time(asked_run: RunDir) -> str:
        asked.append(asked_run.name)
        return "set to the host's by the guest agent"

    monkeypatch.setattr(incoming, "set_guest_time", set_guest_time)
    with_agent = snapshots.CloneRecord("tpl", "ready", "/m", devices, guest_time_ns=1)
    snapshots.write_clone(run, with_agent)
    assert incoming.set_clock(run) == "set to the host's by the guest agent"
    record = snapshots.read_clone(run)
    assert record is not None and record.clock_note == "set to the host's by the guest agent"
    assert asked == [run.name]
    snapshots.write_clone(run, with_agent._replace(guest_time_ns=None))
    assert incoming.set_clock(run) == "not set: no guest agent answered at the template's save"
    assert asked == [run.name]  # no agent at the save: none asked now


def test_a_kept_device_is_its_record_less_cleanup_and_time_and_back() -> None:
    from qvm.control.disk import node_cleanup, restored_record
    from qvm.store.devices import DeviceRecord

    record = DeviceRecord(
        "disk3", "disk", node_cleanup("disk3"), "rp1", file="/x.qcow2", format="qcow2"
    )
    kept = snapshots.PluggedDevice.kept_of(record._replace(added=5.0))
    assert kept == snapshots.PluggedDevice("disk3", "disk", "/x.qcow2", "qcow2", bus="rp1")
    assert restored_record(kept, 7.0) == record._replace(added=7.0)
