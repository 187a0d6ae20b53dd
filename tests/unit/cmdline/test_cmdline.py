"""Golden tests of the pure command-line builder."""

from __future__ import annotations

from pathlib import Path

from qvm.cmdline.argv import LaunchInputs, build_argv, escape_opt
from qvm.definition import schema
from qvm.definition.naming import stable_mac
from qvm.layout.rundir import RunDir

RUN = RunDir(Path("/run/q/vm1"))


def monitors(run: str = "/run/q/vm1") -> list[str]:
    return [
        "-qmp", f"unix:{run}/qmp.sock,server=on,wait=off",
        "-chardev", f"socket,id=qvm-events,path={run}/events.sock,server=on,wait=off",
        "-mon", "chardev=qvm-events,mode=control",
        "-chardev",
        f"socket,id=serial0,path={run}/console.sock,server=on,wait=off,"
        f"logfile={run}/serial.log,logappend=on",
        "-serial", "chardev:serial0",
    ]  # fmt: skip


def agent(run: str = "/run/q/vm1", bus: str = "virtio-serial-pci") -> list[str]:
    return [
        "-device", f"{bus},id=qvm.agent-serial",
        "-chardev", f"socket,id=qga0,path={run}/qga.sock,server=on,wait=off",
        "-device", "virtserialport,chardev=qga0,name=org.qemu.guest_agent.0,id=qvm.agent",
    ]  # fmt: skip


def hotplug_ports(count: int) -> list[str]:
    ports = []
    for i in range(count):
        ports += ["-device", f"pcie-root-port,id=hp{i},bus=pcie.0,chassis=1,slot={i + 1}"]
    return ports


def test_demo_like_machine_under_tcg() -> None:
    machine = schema.Machine(
        name="vm1",
        path=Path("/m/vm1.toml"),
        cpu=schema.CpuSpec(count=1, max=4),
        memory=schema.MemorySpec(size=256 * 1024**2),
        boot=schema.BootSpec(Path("/g/vmlinuz"), Path("/g/initrd.img"), "console=ttyS0 quiet"),
    )
    assert build_argv(machine, LaunchInputs(accel="tcg", run_dir=RUN)) == [
        "qemu-system-x86_64",
        "-name", "guest=vm1,debug-threads=on",
        "-nodefaults", "-no-user-config", "-display", "none",
        "-machine", "q35,accel=tcg",
        "-device", "pvpanic", "-action", "panic=exit-failure",
        "-cpu", "max",
        "-smp", "1,sockets=1,cores=4,threads=1,maxcpus=4",
        "-m", "256M",
        "-kernel", "/g/vmlinuz", "-initrd", "/g/initrd.img", "-append", "console=ttyS0 quiet",
        *monitors(),
        *agent(),
        *hotplug_ports(4),
    ]  # fmt: skip


def test_boot_vcpus_beyond_the_first_are_unpluggable_devices() -> None:
    machine = schema.Machine(
        name="vm1",
        path=Path("/m/vm1.toml"),
        type="pc",
        cpu=schema.CpuSpec(model="IvyBridge-IBRS", count=3, max=8, sockets=2, cores=2, threads=2),
        memory=schema.MemorySpec(size=2 * 1024**3),
    )
    argv = build_argv(machine, LaunchInputs(accel="kvm", run_dir=RUN))
    assert argv[argv.index("-smp") + 1] == "1,sockets=2,cores=2,threads=2,maxcpus=8"
    devices = [argv[i + 1] for i, a in enumerate(argv) if a == "-device" and "cpu" in argv[i + 1]]
    assert devices == [
        "IvyBridge-IBRS-x86_64-cpu,id=cpu1,socket-id=0,core-id=0,thread-id=1",
        "IvyBridge-IBRS-x86_64-cpu,id=cpu2,socket-id=0,core-id=1,thread-id=0",
    ]


def test_kvm_defaults_to_host_cpu_and_dies_appear_only_when_several() -> None:
    machine = schema.Machine(
        name="vm1",
        path=Path("/m/vm1.toml"),
        cpu=schema.CpuSpec(count=2, max=4, sockets=1, dies=2, cores=2, threads=1),
    )
    argv = build_argv(machine, LaunchInputs(accel="kvm", run_dir=RUN))
    assert argv[argv.index("-cpu") + 1] == "host"
    assert argv[argv.index("-smp") + 1] == "1,sockets=1,dies=2,cores=2,threads=1,maxcpus=4"
    assert "host-x86_64-cpu,id=cpu1,socket-id=0,die-id=0,core-id=1,thread-id=0" in argv


def test_memory_hotplug_disks_nics_and_extra_args() -> None:
    machine = schema.Machine(
        name="vm1",
        path=Path("/m/vm1.toml"),
        memory=schema.MemorySpec(size=512 * 1024**2, max=4 * 1024**3, slots=4),
        disks=(
            schema.DiskSpec(file=Path("/img/a,b.raw"), readonly=True),
            schema.DiskSpec(base=Path("/img/debian.qcow2")),
            schema.DiskSpec(file=Path("/img/c.qcow2"), interface="scsi", id="data"),
        ),
        nics=(
            schema.NicSpec(
                forwards=(
                    schema.PortForward("tcp", "127.0.0.1", 2222, 22),
                    schema.PortForward("tcp", "0.0.0.0", 0, 80),
                )
            ),
        ),
        qemu=schema.QemuSpec(binary="/opt/qemu/bin/qemu-system-x86_64", extra_args=("-s",)),
    )
    inputs = LaunchInputs(
        accel="tcg",
        run_dir=RUN,
        disk_formats=("raw", "qcow2", "qcow2"),
    )
    argv = build_argv(machine, inputs)
    assert argv[0] == "/opt/qemu/bin/qemu-system-x86_64"
    assert argv[argv.index("-m") + 1] == "512M,slots=4,maxmem=4G"
    tail = argv[argv.index("chardev:serial0") + 1 :]
    assert tail == [
        "-device", "virtio-scsi-pci,id=scsi0",
        "-blockdev", "driver=file,node-name=disk0-file,filename=/img/a,,b.raw,read-only=on",
        "-blockdev", "driver=raw,node-name=disk0,file=disk0-file,read-only=on",
        "-device", "virtio-blk-pci,drive=disk0,id=disk0",
        "-blockdev", "driver=file,node-name=disk1-file,filename=/run/q/vm1/disk1.qcow2",
        "-blockdev", "driver=qcow2,node-name=disk1,file=disk1-file",
        "-device", "virtio-blk-pci,drive=disk1,id=disk1",
        "-blockdev", "driver=file,node-name=data-file,filename=/img/c.qcow2",
        "-blockdev", "driver=qcow2,node-name=data,file=data-file",
        "-device", "scsi-hd,drive=data,id=data,bus=scsi0.0",
        "-netdev",
        # host port 0 stays 0: QEMU binds it, no probe before (qvm.host.usernet)
        "user,id=net0,hostfwd=tcp:127.0.0.1:2222-:22,hostfwd=tcp:0.0.0.0:0-:80",
        "-device", f"virtio-net-pci,netdev=net0,mac={stable_mac('vm1', 0)},id=net0",
        *agent(),
        *hotplug_ports(4),
        "-s",
    ]  # fmt: skip


def test_microvm_has_no_hotplug_topology() -> None:
    machine = schema.Machine(
        name="m", path=Path("/m/m.toml"), type="microvm", cpu=schema.CpuSpec(count=2, max=2)
    )
    argv = build_argv(machine, LaunchInputs(accel="tcg", run_dir=RUN))
    assert argv[argv.index("-smp") + 1] == "2"
    assert "pvpanic" not in argv
    assert not any("x86_64-cpu" in a for a in argv)


def test_serial_can_be_disabled() -> None:
    serial = schema.SerialSpec(enabled=False)
    machine = schema.Machine(name="vm1", path=Path("/m/vm1.toml"), serial=serial)
    argv = build_argv(machine, LaunchInputs(accel="tcg", run_dir=RUN))
    assert "-serial" not in argv


def test_agent_channel_by_default_on_virtio_mmio_for_microvm_and_none_when_disabled() -> None:
    machine = schema.Machine(name="vm1", path=Path("/m/vm,1.toml"))
    argv = build_argv(machine, LaunchInputs(accel="tcg", run_dir=RunDir(Path("/r/a,b"))))
    start = argv.index("-device", argv.index("chardev:serial0"))
    assert argv[start : start + 6] == agent("/r/a,,b")
    micro = schema.Machine(name="vm1", path=Path("/m/vm1.toml"), type="microvm")
    argv = build_argv(micro, LaunchInputs(accel="tcg", run_dir=RUN))
    start = argv.index("-device", argv.index("chardev:serial0"))
    assert argv[start : start + 6] == agent(bus="virtio-serial-device")
    off = schema.Machine(
        name="vm1", path=Path("/m/vm1.toml"), agent=schema.AgentSpec(enabled=False)
    )
    argv = build_argv(off, LaunchInputs(accel="tcg", run_dir=RUN))
    assert not any("agent" in a or "virtio-serial" in a or "qga0" in a for a in argv)


def test_stable_mac_is_stable_and_local() -> None:
    assert stable_mac("vm1", 0) == stable_mac("vm1", 0)
    assert stable_mac("vm1", 0) != stable_mac("vm1", 1)
    assert stable_mac("vm1", 0).startswith("52:54:00:")


def test_escape_opt_doubles_commas() -> None:
    assert escape_opt("/a,b,,c") == "/a,,b,,,,c"


def test_spare_root_ports_on_q35_after_the_boot_devices_and_none_on_pc() -> None:
    disk = (schema.DiskSpec(file=Path("/img/a.raw")),)
    machine = schema.Machine(
        name="vm1", path=Path("/m/vm1.toml"), disks=disk, hotplug=schema.HotplugSpec(pci_slots=2)
    )
    argv = build_argv(machine, LaunchInputs(accel="tcg", run_dir=RUN, disk_formats=("raw",)))
    assert argv[argv.index("virtio-blk-pci,drive=disk0,id=disk0") + 1 :] == [
        *agent(),
        "-device", "pcie-root-port,id=hp0,bus=pcie.0,chassis=1,slot=1",
        "-device", "pcie-root-port,id=hp1,bus=pcie.0,chassis=1,slot=2",
    ]  # fmt: skip
    none = schema.Machine(
        name="vm1", path=Path("/m/vm1.toml"), hotplug=schema.HotplugSpec(pci_slots=0)
    )
    assert not any("pcie-root-port" in a for a in build_argv(none, LaunchInputs("tcg", RUN)))
    for machine_type in ("pc", "microvm"):
        other = schema.Machine(name="vm1", path=Path("/m/vm1.toml"), type=machine_type)
        argv = build_argv(other, LaunchInputs(accel="tcg", run_dir=RUN))
        assert not any("pcie-root-port" in a for a in argv)


def test_a_network_nic_sits_on_a_hub_with_its_uplink_to_the_switch() -> None:
    machine = schema.Machine(
        name="vm1",
        path=Path("/m/vm1.toml"),
        nics=(schema.NicSpec(), schema.NicSpec(network="lab", id="lan")),
    )
    argv = build_argv(machine, LaunchInputs(accel="tcg", run_dir=RUN))
    start = argv.index("hubport,id=lan,hubid=1") - 1
    assert argv[start : start + 8] == [
        "-netdev", "hubport,id=lan,hubid=1",
        "-device", f"virtio-net-pci,netdev=lan,mac={stable_mac('vm1', 1)},id=lan",
        # the switch's socket folder, under the state root beside the run dirs
        "-netdev", "vde,id=qvm.lan.vde,sock=/run/q/_networks/lab/switch",
        "-netdev", "hubport,id=qvm.lan.up,hubid=1,netdev=qvm.lan.vde",
    ]  # fmt: skip
    assert "user,id=net0" in argv  # the other NIC stays user-mode
