"""Stable names derived from a definition: device ids, node names, overlay files, MACs.
The command line, the control layer and ``--persist`` all name things through here.
"""

from __future__ import annotations

from qvm.definition.schema import (
    DEFAULT_PCI_SLOTS_Q35,
    HOTPLUG_PORT_PREFIX,
    DiskSpec,
    HotplugSpec,
    NicSpec,
)


def hotplug_port_id(index: int) -> str:
    """The id of qvm's ``index``-th spare PCIe root port: hp0, hp1, ..."""
    return f"{HOTPLUG_PORT_PREFIX}{index}"


def pci_ports(machine_type: str, hotplug: HotplugSpec) -> int:
    """How many spare PCIe root ports the machine gets: hotplug.pci_slots, by default
    DEFAULT_PCI_SLOTS_Q35 on q35 and none elsewhere."""
    if machine_type != "q35":
        return 0
    return DEFAULT_PCI_SLOTS_Q35 if hotplug.pci_slots is None else hotplug.pci_slots


def overlay_name(index: int) -> str:
    return f"disk{index}.qcow2"


def disk_node_name(index: int, disk: DiskSpec) -> str:
    return disk.id or f"disk{index}"


def nic_id(index: int, nic: NicSpec) -> str:
    return nic.id or f"net{index}"


def stable_mac(machine_name: str, index: int) -> str:
    """A locally administered MAC in QEMU's 52:54:00 range, the same at every boot."""
    import hashlib  # costs start-up time; only machines with NICs need it

    digest = hashlib.sha256(f"{machine_name}/{index}".encode()).digest()
    return "52:54:00:" + ":".join(f"{b:02x}" for b in digest[:3])
