"""Definition in, QEMU argv out. A pure function: no probing, no disk, no clock.

Everything the builder cannot know from the definition (which accelerator this host can
use, image formats read from disk) arrives resolved in ``LaunchInputs``, so ``qvm cmdline``
and ``qvm up`` print and run the same argv. A forward's host port 0 stays 0: QEMU binds it.
"""

from __future__ import annotations

from collections.abc import Sequence

from qvm.base.checking import TYPE_CHECKING
from qvm.base.record import Record
from qvm.base.sizes import format_size
from qvm.definition.naming import (
    disk_node_name,
    hotplug_port_id,
    nic_id,
    overlay_name,
    pci_ports,
    share_id,
    stable_mac,
)
from qvm.definition.schema import (
    SEED_DEVICE_ID,
    DiskSpec,
    Machine,
    NicSpec,
    ShareSpec,
    shared_memory,
)
from qvm.definition.topology import cpu_device_id, cpu_driver, slot_props, topology_of
from qvm.layout.kinds import DIMM, DISK, NIC, VIRTIO_MEM
from qvm.layout.netfiles import NetFiles
from qvm.layout.rundir import RunDir
from qvm.layout.runfiles import AGENT_PORT_ID, AGENT_PORT_NAME

if TYPE_CHECKING:  # only read here; the store's module is not on every command's path
    from qvm.store.snapshots import MemoryDevice, PluggedDevice


class StartFrom(Record):
    """How a restore or a clone starts QEMU: a snapshot's device set and where from."""

    cpu_slots: tuple[int, ...] | None = None
    # a snapshot's device set (qvm.store.snapshots.DeviceSet), started with the same ids,
    # backends and buses, so that -loadvm finds them
    memory_devices: tuple[MemoryDevice, ...] = ()
    plugged: tuple[PluggedDevice, ...] = ()
    loadvm: str | None = None
    incoming: str | None = None


class LaunchInputs(Record):
    accel: str  # "kvm" or "tcg"
    run_dir: RunDir
    # per [[disk]]: the format QEMU should open; an overlay is always qcow2
    disk_formats: tuple[str, ...] = ()
    # a snapshot's device set instead of the definition's: the vCPU slots present besides
    # slot 0 (None: the definition's count), and its memory devices
    cpu_slots: tuple[int, ...] | None = None
    memory_devices: tuple[MemoryDevice, ...] = ()
    plugged: tuple[PluggedDevice, ...] = ()  # hotplugged disks and NICs, in their plug order
    # the run dir's state.qcow2 as block node qvm-state (RAM state of snapshots)
    state_disk: bool = False
    loadvm: str | None = None  # start from this internal snapshot (-loadvm)
    incoming: str | None = None  # start from this migration stream (-incoming)
    # network NICs on their hubs with no uplink: joined to no switch (the helper QEMU that
    # freezes a snapshot for clones never runs its guest, and a stopped network has none)
    no_uplinks: bool = False


def default_cpu_model(accel: str) -> str:
    return "host" if accel == "kvm" else "max"


def cpu_model(machine: Machine, accel: str) -> str:
    return machine.cpu.model or default_cpu_model(accel)


def escape_opt(value: str) -> str:
    """QEMU option values double a comma to mean a literal one."""
    return value.replace(",", ",,")


def build_argv(machine: Machine, inputs: LaunchInputs) -> list[str]:
    accel = inputs.accel
    run = inputs.run_dir
    model = cpu_model(machine, accel)
    argv: list[str] = [machine.qemu.binary]

    # Identity, and nothing QEMU would add on its own
    argv += ["-name", f"guest={escape_opt(machine.name)},debug-threads=on"]
    argv += ["-nodefaults", "-no-user-config", "-display", "none"]

    # Machine and accelerator
    shared = shared_memory(machine)
    # shared RAM (what vhost-user devices such as virtiofs need) is a memfd backend
    ram = f",memory-backend={SHARED_RAM}" if shared else ""
    argv += ["-machine", f"{machine.type},accel={accel}{ram}"]
    if machine.type != "microvm":
        # a guest panic becomes a failed exit that the supervisor and restart policy see
        argv += ["-device", "pvpanic", "-action", "panic=exit-failure"]

    # CPU: boot with one vCPU from -smp and the rest as devices, so that every vCPU
    # but the first can be unplugged later (as libvirt and Proxmox do)
    argv += ["-cpu", model]
    if machine.type == "microvm":
        argv += ["-smp", str(machine.cpu.count)]
    else:
        topo = topology_of(machine.cpu)
        smp = f"1,sockets={topo.sockets}"
        if topo.dies > 1:
            smp += f",dies={topo.dies}"
        smp += f",cores={topo.cores},threads={topo.threads},maxcpus={topo.max_cpus}"
        argv += ["-smp", smp]
        slots = range(1, machine.cpu.count) if inputs.cpu_slots is None else inputs.cpu_slots
        for index in slots:
            if index == 0:
                continue
            props = ",".join(f"{k}={v}" for k, v in slot_props(index, topo).items())
            argv += ["-device", f"{cpu_driver(model)},id={cpu_device_id(index)},{props}"]

    # Memory
    memory = format_size(machine.memory.size)
    if machine.memory.max is not None and machine.memory.slots > 0:
        memory += f",slots={machine.memory.slots},maxmem={format_size(machine.memory.max)}"
    argv += ["-m", memory]
    if shared:
        size = format_size(machine.memory.size)
        argv += ["-object", f"memory-backend-memfd,id={SHARED_RAM},size={size},share=on"]

    # Boot
    if machine.boot.kernel is not None:
        argv += ["-kernel", str(machine.boot.kernel)]
    if machine.boot.initrd is not None:
        argv += ["-initrd", str(machine.boot.initrd)]
    if machine.boot.append is not None:
        argv += ["-append", machine.boot.append]

    # Monitors: one for the user, one for the supervisor (its events, and qvm's commands)
    argv += ["-qmp", f"unix:{escape_opt(str(run.qmp_socket))},server=on,wait=off"]
    argv += [
        "-chardev",
        f"socket,id=qvm-events,path={escape_opt(str(run.events_socket))},server=on,wait=off",
        "-mon",
        "chardev=qvm-events,mode=control",
    ]

    # Serial console: a socket for `qvm console`, logged to a file whether or not
    # anyone is attached
    if machine.serial.enabled:
        argv += [
            "-chardev",
            f"socket,id=serial0,path={escape_opt(str(run.console_socket))},server=on,wait=off,"
            f"logfile={escape_opt(str(run.serial_log))},logappend=on",
            "-serial",
            "chardev:serial0",
        ]

    # Disks
    needs_scsi = any(d.interface == "scsi" for d in machine.disks)
    if needs_scsi:
        argv += ["-device", "virtio-scsi-pci,id=scsi0"]
    for index, disk in enumerate(machine.disks):
        argv += _disk_args(machine, index, disk, inputs)

    # cloud-init NoCloud seed, read-only, after the disks (found by its label, cidata)
    if machine.cloud_init is not None:
        argv += _seed_args(machine, run)

    # Network
    for index, nic in enumerate(machine.nics):
        argv += _nic_args(machine, index, nic, run, inputs.no_uplinks)

    # Guest agent channel, after the boot disks and NICs so that it takes none of their
    # PCI addresses
    if machine.agent.enabled:
        argv += _agent_args(machine, run)

    # Host folders, after the agent: a machine without shares keeps its addresses
    for index, share in enumerate(machine.shares):
        argv += _share_args(share_id(index), share, run)

    # Hotplug: spare PCIe root ports on q35 (its pcie.0 takes no hotplugged devices), one
    # per hotplugged disk, NIC or virtio-mem device; after the boot devices, so that
    # those keep their addresses. pc's pci.0 takes hotplugged devices as is.
    argv += _hotplug_port_args(machine)

    # Snapshots: the RAM-state disk (a node without a device), a snapshot's memory
    # devices (after the root ports a virtio-mem device sits on), where to start from
    if inputs.state_disk:
        argv += _state_disk_args(run)
    for memory_device in inputs.memory_devices:
        argv += _memory_device_args(memory_device, shared)
    for plugged in inputs.plugged:
        argv += _plugged_args(plugged)
    if inputs.loadvm is not None:
        argv += ["-loadvm", inputs.loadvm]
    if inputs.incoming is not None:
        # no announcement after the stream is read: it would carry the MACs of the VM the
        # stream came from (a clone's template), whose frames a shared switch would then
        # send here (qvm.ops.netguest)
        argv += ["-incoming", inputs.incoming, "-global", "migration.announce-rounds=0"]

    # Escape hatch, last so that it can override
    argv += list(machine.qemu.extra_args)
    return argv


def _disk_args(machine: Machine, index: int, disk: DiskSpec, inputs: LaunchInputs) -> list[str]:
    node = disk_node_name(index, disk)
    if disk.base is not None:
        filename = str(inputs.run_dir.path / overlay_name(index))
        fmt = "qcow2"
    else:
        filename = str(disk.file)
        fmt = inputs.disk_formats[index] if index < len(inputs.disk_formats) else "raw"
    readonly = ",read-only=on" if disk.readonly else ""
    args = [
        "-blockdev",
        f"driver=file,node-name={node}-file,filename={escape_opt(filename)}{readonly}",
        "-blockdev",
        f"driver={fmt},node-name={node},file={node}-file{readonly}",
    ]
    if machine.type == "microvm":
        device = f"virtio-blk-device,drive={node},id={node}"
    elif disk.interface == "virtio":
        device = f"virtio-blk-pci,drive={node},id={node}"
    elif disk.interface == "ide":
        device = f"ide-hd,drive={node},id={node}"
    elif disk.interface == "scsi":
        device = f"scsi-hd,drive={node},id={node},bus=scsi0.0"
    else:  # nvme
        device = f"nvme,drive={node},id={node},serial={node}"
    return [*args, "-device", device]


def _seed_args(machine: Machine, run: RunDir) -> list[str]:
    node = SEED_DEVICE_ID
    filename = escape_opt(str(run.seed_image))
    bus = "virtio-blk-device" if machine.type == "microvm" else "virtio-blk-pci"
    return [
        "-blockdev",
        f"driver=file,node-name={node}-file,filename={filename},read-only=on",
        "-blockdev",
        f"driver=raw,node-name={node},file={node}-file,read-only=on",
        "-device",
        f"{bus},drive={node},id={node}",
    ]


def _nic_args(
    machine: Machine, index: int, nic: NicSpec, run: RunDir, no_uplink: bool
) -> list[str]:
    ident = nic_id(index, nic)
    model = "virtio-net-device" if machine.type == "microvm" else nic.model
    mac = nic.mac or stable_mac(machine.name, index)
    if nic.network is not None:
        switch = NetFiles(run.path.parent, nic.network).switch_dir
        device = f"{model},netdev={ident},mac={mac},id={ident}"
        nic_on_hub = ["-netdev", f"hubport,id={ident},hubid={index}", "-device", device]
        return nic_on_hub if no_uplink else nic_on_hub + uplink_args(ident, index, switch)
    netdev = f"user,id={ident}"
    # host port 0 stays 0: QEMU binds a port the kernel picks, read back from `info usernet`
    # (qvm.host.usernet), so two VMs started at once never race for one port
    for fwd in nic.forwards:
        netdev += f",hostfwd={fwd.protocol}:{fwd.host_addr}:{fwd.host_port}-:{fwd.guest_port}"
    return ["-netdev", netdev, "-device", f"{model},netdev={ident},mac={mac},id={ident}"]


def uplink_ids(nic: str) -> tuple[str, str]:
    """The netdevs that join a network NIC to its switch: (the vde plug, the hub port
    it sits on). Dotted: no id of the user's has a dot (ID_PATTERN), so none clashes."""
    return f"qvm.{nic}.vde", f"qvm.{nic}.up"


def uplink_args(nic: str, hub: int, switch_dir: str) -> list[str]:
    """The NIC sits on QEMU hub ``hub``, and so does its uplink, a vde plug on the
    switch: a switch that died is rejoined by replacing the uplink alone
    (``netdev_del``, ``netdev_add``), while the NIC, and the guest's view of it, stay."""
    vde, port = uplink_ids(nic)
    return [
        "-netdev",
        f"vde,id={vde},sock={escape_opt(switch_dir)}",
        "-netdev",
        f"hubport,id={port},hubid={hub},netdev={vde}",
    ]


AGENT_CHARDEV = "qga0"


def _agent_args(machine: Machine, run: RunDir) -> list[str]:
    """A virtio-serial controller with one port for the QEMU guest agent, its host end a
    unix socket in the run dir that the supervisor holds (qvm.supervisor.agent_proxy).
    On microvm the controller sits on virtio-mmio (the guest needs virtio_mmio)."""
    bus = "virtio-serial-device" if machine.type == "microvm" else "virtio-serial-pci"
    path = escape_opt(str(run.agent_chardev_socket))
    return [
        "-device",
        f"{bus},id=qvm.agent-serial",
        "-chardev",
        f"socket,id={AGENT_CHARDEV},path={path},server=on,wait=off",
        "-device",
        f"virtserialport,chardev={AGENT_CHARDEV},name={AGENT_PORT_NAME},id={AGENT_PORT_ID}",
    ]


SHARED_RAM = "qvm.ram"  # the memfd backend of a VM whose RAM is shared


def has_shared_memory(argv: Sequence[str]) -> bool:
    """Whether a QEMU command line (``launch.json``'s) runs with shared RAM: then a DIMM's
    backend must be shared too, and a live share can be plugged."""
    return any(arg.startswith(f"memory-backend-memfd,id={SHARED_RAM},") for arg in argv)


def share_chardev(share_id: str) -> str:
    return f"qvm.{share_id}"


def _share_args(ident: str, share: ShareSpec, run: RunDir) -> list[str]:
    """virtiofs: the vhost-user socket virtiofsd listens on (started before QEMU by the
    supervisor), and the device, whose tag the guest mounts. 9p: QEMU's own server;
    ``readonly`` is QEMU's to enforce; ``multidevs=remap`` keeps inode numbers unique when
    the folder holds mount points (else two files can share one in the guest)."""
    if share.via == "9p":
        readonly = ",readonly=on" if share.readonly else ""
        return [
            "-fsdev",
            f"local,id={share_chardev(ident)},path={escape_opt(str(share.host))},"
            f"security_model=none,multidevs=remap{readonly}",
            "-device",
            f"virtio-9p-pci,fsdev={share_chardev(ident)},mount_tag={ident},id={ident}",
        ]
    socket = escape_opt(str(run.share_socket(ident)))
    return [
        "-chardev",
        f"socket,id={share_chardev(ident)},path={socket}",
        "-device",
        f"vhost-user-fs-pci,chardev={share_chardev(ident)},tag={ident},id={ident}",
    ]


def _hotplug_port_args(machine: Machine) -> list[str]:
    args = []
    for index in range(pci_ports(machine.type, machine.hotplug)):
        # (chassis, slot) must be unique: chassis 1, slots 1.. (slot 0 is the default)
        port = f"pcie-root-port,id={hotplug_port_id(index)},bus=pcie.0,chassis=1,slot={index + 1}"
        args += ["-device", port]
    return args


STATE_NODE = "qvm-state"  # the block node of the run dir's state.qcow2


def _state_disk_args(run: RunDir) -> list[str]:
    filename = escape_opt(str(run.state_disk))
    return [
        "-blockdev",
        f"driver=file,node-name={STATE_NODE}-file,filename={filename}",
        "-blockdev",
        f"driver=qcow2,node-name={STATE_NODE},file={STATE_NODE}-file",
    ]


def _memory_device_args(device: MemoryDevice, shared: bool) -> list[str]:
    # a memory device's RAM is shared like the VM's (qvm.control.memory does the same)
    kind = "memory-backend-memfd,share=on" if shared else "memory-backend-ram"
    backend = f"{kind},id={device.backend},size={device.size}"
    if device.kind == DIMM.name:
        front = f"pc-dimm,id={device.id},memdev={device.backend}"
    elif device.kind != VIRTIO_MEM.name:  # a kind of qvm.layout.kinds this does not know
        raise ValueError(f"{device.id}: no command line for a {device.kind} device")
    else:
        front = f"virtio-mem-pci,id={device.id},memdev={device.backend}"
        if device.requested_size is not None:
            front += f",requested-size={device.requested_size}"
        if device.bus is not None:
            front += f",bus={device.bus}"
    return ["-object", backend, "-device", front]


def _plugged_args(device: PluggedDevice) -> list[str]:
    """The same nodes, backend and device the hotplug made (qvm.control.disk, .nic)."""
    bus = f",bus={device.bus}" if device.bus else ""
    if device.kind not in (NIC.name, DISK.name):  # a kind of qvm.layout.kinds this does not know
        raise ValueError(f"{device.id}: no command line for a {device.kind} device")
    if device.kind == NIC.name:
        return [
            "-netdev",
            f"user,id={device.id}",
            "-device",
            f"{device.model},netdev={device.id},mac={device.mac},id={device.id}{bus}",
        ]
    readonly = ",read-only=on" if device.readonly else ""
    filename = escape_opt(str(device.file))
    return [
        "-blockdev",
        f"driver=file,node-name={device.id}-file,filename={filename}{readonly}",
        "-blockdev",
        f"driver={device.format},node-name={device.id},file={device.id}-file{readonly}",
        "-device",
        f"virtio-blk-pci,drive={device.id},id={device.id}{bus}",
    ]
