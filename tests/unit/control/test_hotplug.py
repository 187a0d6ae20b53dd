"""What every kind of hotplug shares: pending marks and the typed records of a run dir,
the TCG guard, ids, PCI places, the guest's report, and the one transaction (played by the
fake QMP). QMP replies are captured from QEMU 7.2 on this machine."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from framework.fake_qmp import FakeQmp, device_deleted, launch_record, state_json

from qvm.base.jsonfile import write_json_atomic
from qvm.control.events import match_unplug_event
from qvm.control.guard import check_device_add, tcg_unplug_refusal
from qvm.control.guest import guest_report_from
from qvm.control.pci import PciPlaces, choose_pci_bus, pci_places_from
from qvm.control.qmp_session import QmpSession
from qvm.control.session import ControlSession
from qvm.control.transaction import DeviceUnplug, Peripheral, Plug, Step, fresh_id, plug, unplug
from qvm.definition.naming import pci_ports
from qvm.definition.schema import HotplugSpec
from qvm.errors import HotplugError, RecordError
from qvm.layout.rundir import RunDir
from qvm.store.devices import DeviceRecord, add_device_record, device_records
from qvm.store.forwards import read_forwards
from qvm.store.pending import (
    PendingMark,
    complete_pending,
    deleted_ids,
    mark_pending,
    pending_ids,
    pending_marks,
)

LAUNCH = launch_record()


def _run(tmp_path: Path, pid: int = 100, start: int = 5) -> RunDir:
    run = RunDir(tmp_path / "vm1")
    run.path.mkdir(parents=True, exist_ok=True)
    write_json_atomic(run.state_file, state_json(pid, start))
    return run


# --- pending marks ----------------------------------------------------------------------

# `device_del` of a virtio-blk-pci on q35: the backend child goes first, ~50 ms earlier
BACKEND_GONE = {"path": "/machine/peripheral/disk1/virtio-backend"}
DEVICE_GONE = {"device": "disk1", "path": "/machine/peripheral/disk1"}
LAPIC_GONE = {"path": "/machine/peripheral/cpu1/lapic"}


def test_exact_marks_wait_for_the_device_itself_cpu_marks_for_any_child() -> None:
    marks = {"disk1": PendingMark(exact=True), "cpu1": PendingMark()}
    assert deleted_ids(marks, BACKEND_GONE) == []
    assert deleted_ids(marks, DEVICE_GONE) == ["disk1"]
    assert deleted_ids(marks, LAPIC_GONE) == ["cpu1"]


def test_unplug_events_of_a_pci_device_ignore_its_children() -> None:
    backend = {"event": "DEVICE_DELETED", "data": BACKEND_GONE}
    device = {"event": "DEVICE_DELETED", "data": DEVICE_GONE}
    assert match_unplug_event(backend, ["disk1"], children=False)[:2] == ("", "")
    assert match_unplug_event(device, ["disk1"], children=False)[:2] == ("disk1", "deleted")
    assert match_unplug_event(backend, ["disk1"])[:2] == ("disk1", "deleted")


def test_completing_a_mark_hands_its_cleanup_to_the_supervisor(tmp_path: Path) -> None:
    run = _run(tmp_path)
    cleanup = [("blockdev-del", {"node-name": "disk1"}), ("blockdev-del", {"node-name": "d-f"})]
    mark_pending(run, ["disk1"], exact=True, cleanup=cleanup)
    mark_pending(run, ["cpu1"])
    assert complete_pending(run, BACKEND_GONE) == []
    assert complete_pending(run, DEVICE_GONE) == [("disk1", cleanup)]
    assert set(pending_marks(run)) == {"cpu1"}
    assert complete_pending(run, DEVICE_GONE) == []  # done once


def test_marks_of_an_earlier_qemu_run_are_not_completed(tmp_path: Path) -> None:
    run = _run(tmp_path, pid=100)
    mark_pending(run, ["dimm0"], exact=True, cleanup=[("object-del", {"id": "mem-dimm0"})])
    run = _run(tmp_path, pid=101)  # QEMU restarted; dimm0 of the new run is another device
    assert complete_pending(run, {"device": "dimm0", "path": "/machine/peripheral/dimm0"}) == []


# --- the TCG guard ------------------------------------------------------------------------


def test_tcg_guard_covers_every_device_add(tmp_path: Path) -> None:
    run = _run(tmp_path)
    assert check_device_add(run, LAUNCH, "disk attach", force=False) is False
    run.cpu_unplugged_file.write_text(json.dumps({"qemu_pid": 100, "qemu_start_time": 5}))
    message = (
        "vm1: disk attach refused: a vCPU was unplugged earlier in this QEMU run, and under "
        "TCG QEMU 7.2 usually crashes soon after the next device_add of any device, not only "
        "of a vCPU (hint: qvm restart vm1 first, or pass --force to try anyway)"
    )
    assert tcg_unplug_refusal(run, LAUNCH, "disk attach") == message
    with pytest.raises(HotplugError) as error:
        check_device_add(run, LAUNCH, "disk attach", force=False)
    assert str(error.value) == message
    assert check_device_add(run, LAUNCH, "disk attach", force=True) is True
    assert check_device_add(run, LAUNCH._replace(accel="kvm"), "mem add", force=False) is False


# --- ids ----------------------------------------------------------------------------------


def test_fresh_ids_skip_what_is_taken() -> None:
    assert fresh_id("disk", ["disk0", "disk2"]) == (1, "disk1")
    assert fresh_id("disk", ["disk0"], start=2) == (2, "disk2")
    # e.g. an image RUNDIR/disk1.qcow2 left by an earlier run: never overwritten
    assert fresh_id("disk", [], ok=lambda i: i != "disk0") == (1, "disk1")


# --- PCI places ---------------------------------------------------------------------------

# query-pci of q35 with hp0 (disk1 on it) and hp1 (free); trimmed to what qvm reads
Q35_PCI = [
    {
        "bus": 0,
        "devices": [
            {"slot": 0, "qdev_id": "", "class_info": {"desc": "Host bridge"}},
            {
                "slot": 1,
                "qdev_id": "hp0",
                "pci_bridge": {"bus": {"number": 1}, "devices": [{"slot": 0, "qdev_id": "disk1"}]},
            },
            {"slot": 2, "qdev_id": "hp1", "pci_bridge": {"bus": {"number": 2}, "devices": []}},
            {"slot": 31, "qdev_id": ""},
        ],
    }
]
PC_PCI = [{"bus": 0, "devices": [{"slot": 0}, {"slot": 1}, {"slot": 1}, {"slot": 2}]}]


def test_q35_root_ports_and_what_is_on_them() -> None:
    places = pci_places_from("q35", Q35_PCI)
    assert places.ports == (("hp0", "disk1"), ("hp1", None))
    assert places.free_ports() == ["hp1"]
    assert places.summary() == "PCIe root ports for hotplug: 1 of 2 free (hp0 disk1)"
    assert choose_pci_bus(places, RunDir(Path("/s/vm1")), LAUNCH, "disk attach") == "hp1"


def test_q35_out_of_root_ports_says_what_to_raise() -> None:
    full = PciPlaces("q35", ports=(("hp0", "disk1"), ("hp1", "net1")))
    with pytest.raises(HotplugError) as error:
        choose_pci_bus(full, RunDir(Path("/s/vm1")), LAUNCH, "nic add")
    assert str(error.value) == (
        "vm1: nic add: no free PCIe root port: 2 of 2 used (hint: remove a hotplugged "
        "device, or raise hotplug.pci_slots in /nowhere/machines/vm1.toml, then qvm restart vm1)"
    )
    with pytest.raises(HotplugError) as error:
        choose_pci_bus(PciPlaces("q35"), RunDir(Path("/s/vm1")), LAUNCH, "nic add")
    assert "started with hotplug.pci_slots = 0 (hint: set hotplug.pci_slots in" in str(error.value)


def test_pc_counts_the_slots_of_pci0() -> None:
    places = pci_places_from("pc", PC_PCI)
    assert (places.bus_slots_used, places.free) == (3, 29)
    assert places.summary() == "PCI slots on pci.0: 29 of 32 free"
    assert choose_pci_bus(places, RunDir(Path("/s/vm1")), LAUNCH, "disk attach") is None
    with pytest.raises(HotplugError, match="no free PCI slot: 32 of 32 used on pci.0"):
        choose_pci_bus(PciPlaces("pc", bus_slots_used=32), RunDir(Path("/s/vm1")), LAUNCH, "x")


def test_default_ports_only_on_q35() -> None:
    assert pci_ports("q35", HotplugSpec()) == 4
    assert pci_ports("q35", HotplugSpec(pci_slots=0)) == 0
    assert pci_ports("pc", HotplugSpec()) == 0


# --- the guest's own report -----------------------------------------------------------------


def test_guest_report_is_the_last_state_line() -> None:
    text = (
        "QVM-GUEST-READY\n"
        "QVM-STATE cpus=0 ncpus=1 mem_kb=156036 blk=- net=lo\n"
        "qvm-guest:/# \n"
        "QVM-STATE cpus=0 ncpus=1 mem_kb=418180 blk=vda net=eth0,lo\n"
        "QVM-STATE cpus=0 ncpu"  # a line still being written
    )
    assert guest_report_from(text) == {
        "cpus": "0",
        "ncpus": "1",
        "mem_kb": "418180",
        "blk": "vda",
        "net": "eth0,lo",
    }
    assert guest_report_from("no such line") is None


# --- the typed records of a run dir ---------------------------------------------------------


def test_a_corrupt_record_is_one_line_naming_its_file(tmp_path: Path) -> None:
    run = _run(tmp_path)
    run.devices_file.write_text('{"qemu_pid": 100, "qemu_start_time": 5, "devices": [{"id": 1}]')
    with pytest.raises(RecordError, match=r"devices\.json: not valid JSON"):
        device_records(run)
    write_json_atomic(
        run.devices_file, {"qemu_pid": 100, "qemu_start_time": 5, "devices": [{"id": "x"}]}
    )
    with pytest.raises(RecordError) as error:
        device_records(run)
    assert str(error.value) == (
        f"{run.devices_file}: devices[0]: kind: missing (hint: qvm restart rewrites it)"
    )
    write_json_atomic(run.pending_file, {"disk1": {"qemu_pid": "100"}})
    with pytest.raises(RecordError, match=r"disk1: qemu_pid: must be an integer, got '100'"):
        pending_ids(run)
    # the supervisor's event loop must go on: a mark it cannot read completes nothing
    assert complete_pending(run, DEVICE_GONE) == []
    write_json_atomic(run.forwards_file, {"qemu_pid": 100, "qemu_start_time": 5, "forwards": [{}]})
    with pytest.raises(RecordError, match=r"forwards\[0\]: proto: missing"):
        read_forwards(run)


def test_device_records_round_trip_and_belong_to_one_qemu_run(tmp_path: Path) -> None:
    run = _run(tmp_path)
    disk = DeviceRecord(
        "disk1", "disk", (("blockdev-del", {"node-name": "disk1"}),), bus="hp0", file="/a.qcow2"
    )
    add_device_record(run, disk)
    assert device_records(run) == (disk,)
    run = _run(tmp_path, pid=101)
    assert device_records(run) == ()


# --- the transaction, played by the fake QMP --------------------------------------------------


def test_the_real_session_and_the_fake_are_both_a_qmp_session(tmp_path: Path) -> None:
    fake: QmpSession = FakeQmp()
    real: QmpSession = ControlSession(RunDir(tmp_path / "vm1"))  # not opened: no socket
    assert isinstance(fake, QmpSession) and isinstance(real, QmpSession)


def test_plug_records_the_device_once_qemu_has_it(tmp_path: Path) -> None:
    run = _run(tmp_path)
    record = DeviceRecord("net1", "nic", (("netdev_del", {"id": "net1"}),), model="e1000")
    steps = [
        Step("netdev_add", {"type": "user", "id": "net1"}, ("netdev_del", {"id": "net1"})),
        Step("device_add", {"driver": "e1000", "id": "net1", "netdev": "net1"}),
    ]
    session = FakeQmp()
    plug(session, run, Plug("nic add", steps, record))
    assert session.commands() == ["netdev_add", "device_add"]
    assert device_records(run) == (record,)
    refused = FakeQmp(refuse={"device_add": "Bus 'hp9' not found"})
    with pytest.raises(HotplugError, match="device_add net2: Bus 'hp9' not found; the VM is"):
        plug(refused, run, Plug("nic add", [s._replace(arguments={"id": "net2"}) for s in steps]))
    assert refused.commands() == ["netdev_add", "device_add", "netdev_del"]
    assert device_records(run) == (record,)


DISK1 = DeviceRecord("disk1", "disk", (("blockdev-del", {"node-name": "disk1"}),))


def test_unplug_waits_for_the_device_itself_then_deletes_its_backend(tmp_path: Path) -> None:
    run = _run(tmp_path)
    add_device_record(run, DISK1)
    session = FakeQmp(
        events={
            "device_del": lambda args: [
                device_deleted(args["id"], f"/machine/peripheral/{args['id']}/virtio-backend"),
                device_deleted(args["id"]),
            ]
        }
    )
    [gone] = unplug(session, run, Peripheral("disk"), {"disk1": DISK1.cleanup}, 10.0)
    assert (gone.outcome, gone.cleaned, gone.cleanup_errors) == (
        "removed",
        ("blockdev-del node-name=disk1",),
        (),
    )
    assert session.commands() == ["device_del", "blockdev-del"]
    assert device_records(run) == ()
    assert pending_marks(run) == {}


def test_unplug_the_guest_does_not_complete_is_pending_with_its_cleanup(tmp_path: Path) -> None:
    run = _run(tmp_path)
    add_device_record(run, DISK1)
    session = FakeQmp(replies={"qom-list": [{"name": "disk1", "type": "child<virtio-blk-pci>"}]})
    [pending] = unplug(session, run, Peripheral("disk"), {"disk1": DISK1.cleanup}, 0.5)
    assert (pending.outcome, pending.detail) == (
        "pending",
        "the guest has not released it within 0.5 s",
    )
    mark = pending_marks(run)["disk1"]
    assert (mark.exact, mark.cleanup, mark.run.pid) == (True, DISK1.cleanup, 100)
    assert device_records(run) == (DISK1,)  # the device is still there
    # DEVICE_DELETED came just after the wait: the second look finds it gone
    late = FakeQmp(replies={"qom-list": []})
    [gone] = unplug(late, run, Peripheral("disk"), {"disk1": DISK1.cleanup}, 0.5)
    assert gone.outcome == "removed" and pending_marks(run) == {}
    assert late.commands() == ["device_del", "qom-list", "blockdev-del"]


def test_unplug_refused_by_the_guest_or_at_once_by_qemu(tmp_path: Path) -> None:
    run = _run(tmp_path)
    ost = {"info": {"device": "disk1", "source": 3, "status": 0x82}}
    session = FakeQmp(events={"device_del": lambda _: [{"event": "ACPI_DEVICE_OST", "data": ost}]})
    [refused] = unplug(session, run, Peripheral("disk"), {"disk1": ()}, 10.0)
    assert refused == DeviceUnplug(
        "disk1",
        "refused",
        refused.seconds,
        "the guest refused the eject (ACPI _OST status 0x82: device busy)",
    )
    at_once = FakeQmp(refuse={"device_del": "Device 'disk1' not found"})
    with pytest.raises(HotplugError) as error:
        unplug(at_once, run, Peripheral("disk"), {"disk1": ()}, 10.0)
    assert str(error.value) == (
        "vm1: device_del disk1: Device 'disk1' not found; the VM is unchanged"
    )
