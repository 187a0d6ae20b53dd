"""Memory, disk and NIC hotplug with the real QEMU and the real test guest, on q35 and pc.

Each device is checked by what the guest itself prints on its serial console (QVM-STATE
mem_kb=.. blk=.. net=..), and after every refusal the VM is checked for leftovers:
``qom-list /objects`` (memory backends), ``query-named-block-nodes`` (block nodes).

Measured here (TCG): a 256 MiB DIMM shows in MemTotal ~134 ms after device_add, and goes
~143 ms after device_del; a virtio-mem device is plugged by the guest's driver in tens of
ms. Under TCG, after a vCPU unplug, QEMU 7.2 usually dies (SIGSEGV) a moment after the
next device_add of any device returned: no scenario unplugs a vCPU before a device_add,
except the one that checks qvm's guard against it (last).
"""

from __future__ import annotations

import json
import re
import socket
import subprocess
from pathlib import Path

import pytest
from framework.harness import Qvm, one_line_error
from framework.wait import wait_until

pytestmark = pytest.mark.integration

MIB_KB = 1024  # mem_kb is in KiB


def machine(qvm: Qvm, name: str, machine_type: str, cpus: int, memory: str, extra: str) -> Path:
    return qvm.machine(
        name,
        f"""# {name}: device hotplug test ({machine_type})
[machine]
type = "{machine_type}"

[cpu]
count = {cpus}
max = {cpus}

[memory]
{memory}

[boot]
kernel = "{{guest}}/vmlinuz"
initrd = "{{guest}}/initrd.img"
append = "console=ttyS0 quiet no_timer_check"
{extra}""",
    )


def qmp(qvm: Qvm, name: str, *args: str) -> object:
    return json.loads(qvm("qmp", name, *args).stdout)


def objects(qvm: Qvm, name: str) -> list[str]:
    """The user-creatable objects: memory backends (pc.ram is boot memory)."""
    return sorted(o["name"] for o in qmp(qvm, name, "qom-list", "path=/objects"))  # type: ignore[attr-defined]


def block_nodes(qvm: Qvm, name: str) -> list[str]:
    nodes = qmp(qvm, name, "query-named-block-nodes", "flat=true")
    return sorted(n["node-name"] for n in nodes)  # type: ignore[attr-defined]


def netdevs(qvm: Qvm, name: str) -> str:
    """QEMU's own list of network backends (QMP has no query for them in 7.2)."""
    return str(qmp(qvm, name, "human-monitor-command", "command-line=info network"))


def test_q35_memory_disks_and_nics_through_root_ports(qvm: Qvm, tmp_path: Path) -> None:
    toml = machine(
        qvm,
        "vm1",
        "q35",
        1,
        'size = "256M"\nmax = "768M"\nslots = 2',
        "\n[hotplug]\npci_slots = 2   # vmem0 and one disk or NIC\n",
    )
    original = toml.read_text()
    qvm("up", "vm1")
    serial = qvm.serial("vm1")
    base = int(serial.wait_ready()["mem_kb"])

    # --- memory: DIMMs -------------------------------------------------------------------
    listed = qvm.json("mem", "list", "vm1")
    assert (listed["boot"], listed["max"], listed["slots"], listed["devices"]) == (
        256 << 20,
        768 << 20,
        2,
        [],
    )
    added = qvm("mem", "add", "vm1", "256M")
    assert added.stdout.splitlines()[0] == (
        "vm1: added dimm0 (DIMM, 256 MiB, slot 0, backend mem-dimm0)"
    )
    serial.wait_state(mem_kb=base + 256 * MIB_KB)
    assert qvm.status("vm1")["memory"] == {"bytes": 512 << 20, "max": 768 << 20}

    one_line_error(
        qvm("mem", "add", "vm1", "512M", check=False),
        "qvm: vm1: mem add 512 MiB: past memory.max: 512 MiB in use (256 MiB boot + 256 MiB "
        "of memory devices), asked 512 MiB, max 768 MiB (hint: add at most 256 MiB, or raise "
        "memory.max in machines/vm1.toml, then qvm restart vm1)",
    )
    qvm("mem", "add", "vm1", "128M")
    serial.wait_state(mem_kb=base + 384 * MIB_KB)
    one_line_error(
        qvm("mem", "add", "vm1", "64M", check=False),
        "qvm: vm1: mem add: no free memory slot: 2 of 2 DIMM slots used (hint: remove a DIMM "
        "with qvm mem del, add --virtio-mem (it needs no slot; without --max it reserves all "
        "the 128 MiB left below memory.max), or raise memory.slots in machines/vm1.toml, "
        "then qvm restart vm1)",
    )
    assert objects(qvm, "vm1") == ["mem-dimm0", "mem-dimm1", "pc.ram", "type"]

    # a paused guest cannot release a DIMM: pending, and the supervisor finishes the job
    qvm("qmp", "vm1", "stop")
    pending = qvm("mem", "del", "vm1", "dimm1", "--timeout", "1", check=False)
    assert pending.returncode == 3
    assert one_line_error(pending).startswith(
        "qvm: vm1: unplug of dimm1 pending: the guest has not released it within 1 s. The "
        "request stands: the DIMM stays in the VM until the guest releases it, and its "
        "backend is deleted then"
    )
    states = {d["id"]: d["state"] for d in qvm.json("mem", "list", "vm1")["devices"]}
    assert states == {"dimm0": "present", "dimm1": "unplug-pending"}
    qvm("qmp", "vm1", "cont")
    wait_until(
        lambda: objects(qvm, "vm1") == ["mem-dimm0", "pc.ram", "type"],
        10,
        "the supervisor to delete mem-dimm1 after DEVICE_DELETED",
    )
    serial.wait_state(mem_kb=base + 256 * MIB_KB)
    assert [d["id"] for d in qvm.json("mem", "list", "vm1")["devices"]] == ["dimm0"]

    # --- memory: virtio-mem (takes root port hp0) ------------------------------------------
    vmem = qvm("mem", "add", "vm1", "64M", "--virtio-mem", "--max", "256M").stdout.splitlines()
    assert vmem[0] == "vm1: added vmem0 (virtio-mem on hp0, up to 256 MiB, backend mem-vmem0)"
    assert re.fullmatch(r"vm1: the guest plugged 64 MiB after \d+ ms", vmem[1])
    serial.wait_state(mem_kb=base + 320 * MIB_KB)
    grown = qvm("mem", "resize", "vm1", "vmem0", "192M")
    assert re.fullmatch(r"vm1: vmem0: 64 MiB -> 192 MiB in \d+ ms\n", grown.stdout)
    serial.wait_state(mem_kb=base + 448 * MIB_KB)
    qvm("mem", "resize", "vm1", "vmem0", "0", "--timeout", "20")
    serial.wait_state(mem_kb=base + 256 * MIB_KB)
    one_line_error(
        qvm("mem", "del", "vm1", "vmem0", check=False),
        "qvm: vm1: vmem0 is a virtio-mem device, which QEMU 7.2 cannot unplug (hint: 'qvm mem "
        "resize vm1 vmem0 0' gives its memory back; the device goes at the next restart)",
    )
    kinds = [(d["id"], d["kind"], d["size"]) for d in qvm.json("mem", "list", "vm1")["devices"]]
    assert kinds == [("dimm0", "dimm", 256 << 20), ("vmem0", "virtio-mem", 0)]

    # --- disks (hp1) ------------------------------------------------------------------------
    assert qvm("disk", "list", "vm1").stdout.splitlines()[-2] == (
        "vm1: PCIe root ports for hotplug: 1 of 2 free (hp0 vmem0)"
    )
    missing = tmp_path / "missing.qcow2"
    one_line_error(
        qvm("disk", "attach", "vm1", str(missing), check=False),
        f"qvm: vm1: disk attach: {missing}: file not found (hint: check the path, or use "
        "--new SIZE to make an empty image)",
    )
    raw = tmp_path / "data.raw"
    raw.write_bytes(b"\0" * (1 << 20))
    wrong = one_line_error(qvm("disk", "attach", "vm1", str(raw), "--format", "qcow2", check=False))
    assert wrong.startswith("qvm: vm1: disk attach: blockdev-add disk0: ")
    assert wrong.endswith("; the VM is unchanged"), wrong  # its file node was deleted again
    assert block_nodes(qvm, "vm1") == []
    assert qvm.json("disk", "list", "vm1")["disks"] == []

    attached = qvm("disk", "attach", "vm1", "--new", "64M", "--persist").stdout.splitlines()
    image = qvm.run_dir("vm1") / "hotplug-disk0.qcow2"
    assert attached[:2] == [
        f"vm1: created {image} (qcow2, 64 MiB)",
        f"vm1: attached disk0 ({image}, qcow2, read-write) on hp1",
    ]
    serial.wait_state(blk="vda")
    assert toml.read_text() == original + (
        f'\n[[disk]]\nfile = "{image}"\nformat = "qcow2"\nid = "disk0"\n'  # it boots as disk0
    )
    assert block_nodes(qvm, "vm1") == ["disk0", "disk0-file"]

    # --- no free root port for a NIC ----------------------------------------------------------
    one_line_error(
        qvm("nic", "add", "vm1", check=False),
        "qvm: vm1: nic add: no free PCIe root port: 2 of 2 used (hint: remove a hotplugged "
        "device, or raise hotplug.pci_slots in machines/vm1.toml, then qvm restart vm1)",
    )
    assert "net" not in netdevs(qvm, "vm1").replace("\\r\\n", "")

    # --- an image another QEMU holds ------------------------------------------------------------
    held = tmp_path / "held.raw"
    held.write_bytes(b"\0" * (1 << 20))
    holder = subprocess.Popen(["qemu-io", "-f", "raw", "-c", "sleep 60000", str(held)])
    try:
        message = one_line_error(qvm("disk", "attach", "vm1", str(held), check=False))
        assert message == (
            f"qvm: vm1: disk attach: {held} is locked by pid {holder.pid} (qemu-io), which "
            "uses it (hint: stop it first; 'fuser' or 'lslocks' show the holder)"
        )
    finally:
        holder.kill()
        holder.wait()
    assert block_nodes(qvm, "vm1") == ["disk0", "disk0-file"]

    detached = qvm("disk", "detach", "vm1", "disk0", "--persist").stdout.splitlines()
    assert re.fullmatch(rf"vm1: detached disk0 in \d+ ms; the image stays at {image}", detached[0])
    assert detached[1] == f"vm1: removed its [[disk]] from {toml}"
    serial.wait_state(blk="-")
    assert image.exists() and toml.read_text() == original
    assert block_nodes(qvm, "vm1") == []

    # --- NICs (hp1 again) ---------------------------------------------------------------------
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        message = one_line_error(
            qvm("nic", "add", "vm1", "--forward", f"tcp:{port}:22", check=False)
        )
        assert re.fullmatch(
            rf"qvm: vm1: nic add: tcp port 127\.0\.0\.1:{port} is already in use by pid \d+ "
            r"\(\S+\) \(hint: pick another host port, or 0 for any free one\)",
            message,
        ), message
    nic = qvm("nic", "add", "vm1", "--forward", "tcp:0:22").stdout.splitlines()
    assert re.fullmatch(
        r"vm1: added net0 \(virtio-net-pci, mac 52:54:00(:[0-9a-f]{2}){3}\) on hp1", nic[0]
    )
    assert re.fullmatch(r"vm1: tcp 127\.0\.0\.1:\d+ -> guest port 22", nic[1])
    serial.wait_state(net="eth0,lo")
    (listed_nic,) = qvm.json("nic", "list", "vm1")["nics"]
    assert (listed_nic["id"], listed_nic["origin"], listed_nic["bus"]) == ("net0", "qvm", "hp1")
    assert [f["guest_port"] for f in listed_nic["forwards"]] == [22]
    assert "net0" in netdevs(qvm, "vm1")
    qvm("nic", "del", "vm1", "net0")
    serial.wait_state(net="lo")
    assert "net0" not in netdevs(qvm, "vm1")
    assert qvm.json("nic", "list", "vm1")["nics"] == []

    # what is left: the DIMM and the virtio-mem device, nothing else
    assert objects(qvm, "vm1") == ["mem-dimm0", "mem-vmem0", "pc.ram", "type"]
    devices = json.loads((qvm.run_dir("vm1") / "devices.json").read_text())["devices"]
    assert [d["id"] for d in devices] == ["dimm0", "vmem0"]


def test_pc_hotplug_then_the_tcg_guard_after_a_vcpu_unplug(qvm: Qvm, tmp_path: Path) -> None:
    machine(qvm, "vm1", "pc", 2, 'size = "256M"\nmax = "512M"\nslots = 1', "")
    # another VM holds an image: it needs no OS for that
    image = tmp_path / "shared.raw"
    image.write_bytes(b"\0" * (1 << 20))
    qvm.machine(
        "other", f'[machine]\ntype = "pc"\n[memory]\nsize = "64M"\n[[disk]]\nfile = "{image}"\n'
    )
    qvm("up", "vm1")
    serial = qvm.serial("vm1")
    base = int(serial.wait_ready()["mem_kb"])
    serial.wait_state(ncpus=2)

    qvm("mem", "add", "vm1", "256M")
    serial.wait_state(mem_kb=base + 256 * MIB_KB)
    removed = qvm("mem", "del", "vm1", "dimm0").stdout.splitlines()
    assert re.fullmatch(
        r"vm1: removed dimm0 \(256 MiB\) in \d+ ms; deleted its backend mem-dimm0", removed[0]
    )
    serial.wait_state(mem_kb=base)
    assert objects(qvm, "vm1") == ["pc.ram", "type"]

    free = qvm.json("disk", "list", "vm1")["pci"]["free"]
    qvm("up", "other")
    one_line_error(
        qvm("disk", "attach", "vm1", str(image), check=False),
        f"qvm: vm1: disk attach: {image} is in use by VM other (hint: detach it there or stop "
        "other first, or attach it --readonly if they only read it)",
    )
    qvm("kill", "other")
    assert block_nodes(qvm, "vm1") == []
    attached = qvm("disk", "attach", "vm1", str(image), "--id", "data").stdout.splitlines()
    assert attached[0] == f"vm1: attached data ({image}, raw, read-write)"
    assert attached[1] == f"vm1: PCI slots on pci.0: {free - 1} of 32 free"
    serial.wait_state(blk="vda")
    qvm("disk", "detach", "vm1", "data")
    serial.wait_state(blk="-")

    qvm("nic", "add", "vm1")
    serial.wait_state(net="eth0,lo")
    qvm("nic", "del", "vm1", "net0")
    serial.wait_state(net="lo")

    if qvm.status("vm1")["accel"] != "tcg":
        return
    # after a vCPU unplug, any device_add crashes QEMU 7.2 under TCG: refused, VM untouched
    qvm("cpu", "del", "vm1", "cpu1", "--timeout", "30")
    serial.wait_state(ncpus=1)
    guard = (
        "under TCG QEMU 7.2 usually crashes soon after the next device_add of any device, not "
        "only of a vCPU (hint: qvm restart vm1 first, or pass --force to try anyway)"
    )
    for args, action in (
        (("mem", "add", "vm1", "128M"), "mem add"),
        (("disk", "attach", "vm1", "--new", "16M"), "disk attach"),
        (("nic", "add", "vm1"), "nic add"),
    ):
        one_line_error(
            qvm(*args, check=False),
            f"qvm: vm1: {action} refused: a vCPU was unplugged earlier in this QEMU run, and "
            + guard,
        )
    assert not list(qvm.run_dir("vm1").glob("hotplug-*.qcow2"))
    assert qvm.status("vm1")["state"] == "running"
    assert objects(qvm, "vm1") == ["pc.ram", "type"] and block_nodes(qvm, "vm1") == []
    # (--force is not tried here: QEMU then dies a moment after device_add returned, by
    # SIGSEGV, in 9 of 11 tries here, but not always, so a test of it could only be flaky)


def test_a_persisted_disk_survives_a_restart_as_itself(qvm: Qvm) -> None:
    """`disk attach --persist` then `qvm restart` failed: the lock check before the start
    found the VM's own QEMU holding the image ("in use by another process"). After the
    restart the disk keeps its id, and a snapshot takes the image qvm made."""
    toml = machine(qvm, "vm1", "q35", 1, 'size = "256M"', "\n[hotplug]\npci_slots = 1\n")
    qvm("up", "vm1")
    qvm.serial("vm1").wait_ready()
    qvm("disk", "attach", "vm1", "--new", "16M", "--persist")
    image = qvm.run_dir("vm1") / "hotplug-disk0.qcow2"
    assert f'file = "{image}"' in toml.read_text() and 'id = "disk0"' in toml.read_text()
    restarted = qvm("restart", "vm1", "--force", check=False)
    assert restarted.returncode == 0, restarted.stderr
    assert [d["id"] for d in qvm.json("disk", "list", "vm1")["disks"]] == ["disk0"]
    qvm("down", "vm1", "--force")
    saved = qvm("snapshot", "save", "vm1", "cold", "--disk-only", check=False)
    assert saved.returncode == 0, saved.stderr  # not refused as "your image"
