"""Disk and NIC hotplug: listing from QMP replies captured from QEMU 7.2 here, rollback
of a failed step (the fake QMP plays QEMU), --persist text exactly."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from framework.fake_qmp import FakeQmp

from qvm.control.disk import (
    DiskInfo,
    disk_entry,
    disk_entry_matches,
    disks_from,
)
from qvm.control.nic import NicInfo, nic_entry, nic_entry_matches, nics_from
from qvm.control.pci import PciPlaces
from qvm.control.transaction import Plug, Step, boot_device_ids, run_steps
from qvm.definition.persist import add_entry_text, persist_entry, remove_entry_text, unpersist_entry
from qvm.errors import ControlError, HotplugError
from qvm.layout.rundir import RunDir
from qvm.store.devices import DeviceRecord
from qvm.store.launch import Forward
from qvm.supervisor.qmp_replies import BlockDevice

RUN = RunDir(Path("/s/vm1"))
ARGV = [
    "qemu-system-x86_64",
    "-blockdev", "driver=file,node-name=disk0-file,filename=/img/a.raw",
    "-blockdev", "driver=raw,node-name=disk0,file=disk0-file",
    "-device", "virtio-blk-pci,drive=disk0,id=disk0",
    "-netdev", "user,id=net0,hostfwd=tcp:127.0.0.1:2222-:22",
    "-device", "virtio-net-pci,netdev=net0,mac=52:54:00:aa:bb:cc,id=net0",
    "-device", "pcie-root-port,id=hp0,bus=pcie.0,chassis=1,slot=1",
]  # fmt: skip
PLACES = PciPlaces("q35", ports=(("hp0", "disk1"),))


def block_entry(dev: str, node: str, file: str, ro: bool = False) -> dict[str, Any]:
    return {
        "device": "",
        "qdev": f"/machine/peripheral/{dev}/virtio-backend",
        "inserted": {
            "node-name": node,
            "file": file,
            "drv": "qcow2",
            "ro": ro,
            "image": {"virtual-size": 67108864, "filename": file},
        },
    }


# --- listing -------------------------------------------------------------------------------


def test_qdev_paths_and_boot_ids() -> None:
    assert BlockDevice("/machine/peripheral/disk1/virtio-backend", "", None).device_id == "disk1"
    assert BlockDevice("/machine/unattached/device[3]", "", None).device_id is None
    assert boot_device_ids(ARGV) == {"disk0", "net0", "hp0"}


def test_disks_boot_attached_and_other() -> None:
    block = [
        block_entry("disk0", "disk0", "/img/a.raw"),
        block_entry("disk1", "disk1", "/s/vm1/hotplug-disk1.qcow2"),
        block_entry("x", "#block123", "/img/x.qcow2", ro=True),
        {"device": "", "qdev": "/machine/peripheral/cd0", "type": "unknown"},  # empty drive
    ]
    records = {
        "disk1": DeviceRecord("disk1", "disk", file="/s/vm1/hotplug-disk1.qcow2", created=True,
                              bus="hp0"),
    }  # fmt: skip
    listed = disks_from("vm1", block, records, {"disk1"}, boot_device_ids(ARGV), PLACES,
                        {"blk": "vda,vdb"})  # fmt: skip
    assert [(d.id, d.origin, d.state) for d in listed.devices] == [
        ("disk0", "boot", "present"),
        ("disk1", "qvm", "unplug-pending"),
        ("x", "other", "present"),
    ]
    attached = listed.devices[1]
    assert (attached.created, attached.bus, attached.size) == (True, "hp0", 67108864)
    assert listed.as_json()["guest_blk"] == listed.guest == ["vda", "vdb"]
    assert listed.as_json()["pci"]["free"] == 0


def test_nics_with_their_forwards() -> None:
    peripherals = {"net0": "virtio-net-pci", "net1": "virtio-net-pci", "disk0": "virtio-blk-pci"}
    macs = {"net0": "52:54:00:aa:bb:cc", "net1": "52:54:00:11:22:33"}
    forwards = [
        Forward("net0", "tcp", "127.0.0.1", 2222, 22),
        Forward("net1", "tcp", "127.0.0.1", 40123, 80),
    ]
    records = {"net1": DeviceRecord("net1", "nic", bus="hp1")}
    listed = nics_from("vm1", peripherals, macs, records, set(), boot_device_ids(ARGV),
                       forwards, PLACES, {"net": "eth0,eth1,lo"})  # fmt: skip
    net0, net1 = listed.devices
    assert (net0.origin, net0.forwards_text()) == ("boot", ["tcp:127.0.0.1:2222:22"])
    assert (net1.origin, net1.forwards_text(), net1.bus) == (
        "qvm",
        ["tcp:127.0.0.1:40123:80"],
        "hp1",
    )
    assert listed.as_json()["guest_net"] == listed.guest == ["eth0", "eth1", "lo"]
    assert listed.as_json()["nics"][1]["mac"] == "52:54:00:11:22:33"
    assert listed.as_json()["nics"][1]["forwards"] == [
        {"nic": "net1", "proto": "tcp", "host_addr": "127.0.0.1", "host_port": 40123,
         "guest_port": 80}
    ]  # fmt: skip


# --- a failed step is undone ------------------------------------------------------------------


DISK_STEPS = [
    Step("blockdev-add", {"driver": "file", "node-name": "disk1-file"},
         ("blockdev-del", {"node-name": "disk1-file"})),
    Step("blockdev-add", {"driver": "qcow2", "node-name": "disk1", "file": "disk1-file"},
         ("blockdev-del", {"node-name": "disk1"})),
    Step("device_add", {"driver": "virtio-blk-pci", "id": "disk1", "drive": "disk1"}),
]  # fmt: skip


def test_failed_device_add_deletes_both_block_nodes_last_first() -> None:
    session = FakeQmp(refuse={"device_add": "Bus 'hp9' not found"})
    with pytest.raises(HotplugError) as error:
        run_steps(session, RUN, Plug("disk attach", DISK_STEPS))
    assert str(error.value) == (
        "vm1: disk attach: device_add disk1: Bus 'hp9' not found; the VM is unchanged"
    )
    assert [c for c, _ in session.sent] == [
        "blockdev-add",
        "blockdev-add",
        "device_add",
        "blockdev-del",
        "blockdev-del",
    ]
    assert [a["node-name"] for c, a in session.sent if c == "blockdev-del"] == [
        "disk1",
        "disk1-file",
    ]


def test_qemus_lock_error_is_said_in_qvms_words() -> None:
    # QEMU opens the file node, then fails to lock for the format node: the file node goes
    desc = 'Failed to get "write" lock'
    calls = {"n": 0}

    def second_refused(arguments: dict[str, Any]) -> Any:
        calls["n"] += 1
        if calls["n"] == 2:
            raise ControlError("x", qemu_class="GenericError", qemu_desc=desc)
        return {}

    session = FakeQmp(replies={"blockdev-add": second_refused})

    def translate(text: str) -> tuple[str, str | None] | None:
        return (
            ("/img/a.qcow2 is locked by VM vm2 (pid 42)", "detach it there")
            if desc in text
            else None
        )

    with pytest.raises(HotplugError) as error:
        run_steps(session, RUN, Plug("disk attach", DISK_STEPS, translate=translate))
    assert str(error.value) == (
        "vm1: disk attach: /img/a.qcow2 is locked by VM vm2 (pid 42); the VM is unchanged "
        "(hint: detach it there)"
    )
    assert session.sent[-1] == ("blockdev-del", {"node-name": "disk1-file"})


def test_a_failed_undo_is_said() -> None:
    session = FakeQmp(refuse={"device_add": "boom", "object-del": "object 'mem-dimm0' is busy"})
    steps = [
        Step("object-add", {"id": "mem-dimm0"}, ("object-del", {"id": "mem-dimm0"})),
        Step("device_add", {"id": "dimm0"}),
    ]
    with pytest.raises(HotplugError) as error:
        run_steps(session, RUN, Plug("mem add", steps))
    assert str(error.value) == (
        "vm1: mem add: device_add dimm0: boom; undoing the earlier steps failed: "
        "object-del id=mem-dimm0: object 'mem-dimm0' is busy"
    )


# --- --persist -------------------------------------------------------------------------------

COMMENTED = """\
# My test VM. Keep these comments!
[machine]
type = "q35"        # q35: PCIe

# the data disk
[[disk]]
file = "data.raw"   # scratch

# restart it when it dies
[supervisor]
restart = "on-failure"
"""


def test_a_disk_entry_goes_after_the_last_one_and_comments_stay_put(tmp_path: Path) -> None:
    path = tmp_path / "vm1.toml"
    path.write_text(COMMENTED)
    disk = DiskInfo("disk1", "qvm", str(tmp_path / "images/b.qcow2"), "qcow2", True, "disk1", 1)
    done = persist_entry(path, "disk", disk_entry(disk, path, with_id=False))
    assert done.action == "added"
    assert path.read_text() == COMMENTED.replace(
        'file = "data.raw"   # scratch\n',
        'file = "data.raw"   # scratch\n\n'
        '[[disk]]\nfile = "images/b.qcow2"\nformat = "qcow2"\nreadonly = true\n',
    )
    removed = unpersist_entry(path, "disk", lambda e: disk_entry_matches(e, disk, path))
    assert removed.action == "removed"
    assert path.read_text() == COMMENTED
    again = unpersist_entry(path, "disk", lambda e: disk_entry_matches(e, disk, path))
    assert again.action == "absent"


def test_a_nic_entry_without_any_nic_goes_at_the_end() -> None:
    nic = NicInfo("web", "qvm", "virtio-net-pci", "52:54:00:f9:81:c9")
    entry = nic_entry(nic, ("tcp:0:22",), with_id=True)
    assert entry == {"mac": "52:54:00:f9:81:c9", "forwards": ["tcp:0:22"], "id": "web"}
    text = add_entry_text(COMMENTED, "nic", entry)
    assert text == COMMENTED + (
        '\n[[nic]]\nmac = "52:54:00:f9:81:c9"\nforwards = ["tcp:0:22"]\nid = "web"\n'
    )
    back, gone = remove_entry_text(text, "nic", lambda e: nic_entry_matches(e, nic))
    assert (back, gone) == (COMMENTED, [entry])


def test_entries_written_inline_are_left_alone() -> None:
    from qvm.errors import DefinitionError

    with pytest.raises(DefinitionError, match="not written: its entries are not all"):
        remove_entry_text('disk = [{file = "a.raw"}]\n', "disk", lambda e: True, "vm1.toml")


def test_a_nic_entry_matches_by_id_else_by_mac() -> None:
    nic = NicInfo("net1", "qvm", "e1000", "52:54:00:11:22:33")
    assert nic_entry(nic, (), with_id=False) == {"model": "e1000", "mac": "52:54:00:11:22:33"}
    assert nic_entry_matches({"mac": "52:54:00:11:22:33"}, nic)
    assert not nic_entry_matches({"id": "other", "mac": "52:54:00:11:22:33"}, nic)


def test_rm_keeps_the_images_disk_attach_new_made(tmp_path: Path) -> None:
    from qvm.ops.files import remove

    run = RunDir(tmp_path / "vm1")
    run.path.mkdir()
    for name in ("state.json", "serial.log", "disk0.qcow2", "hotplug-disk1.qcow2"):
        (run.path / name).write_text("x")
    removed = remove(run, purge=False)
    image = run.new_disk_image("disk1")
    assert removed.kept == [
        (image, "made by qvm disk attach --new: the guest's data; delete it yourself when done")
    ]
    assert sorted(p.name for p in removed.files) == ["disk0.qcow2", "serial.log", "state.json"]
    assert list(run.path.iterdir()) == [image]
