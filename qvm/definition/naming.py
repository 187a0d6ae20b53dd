"""Stable names derived from a definition: device ids, node names, overlay files, MACs.
The command line, the control layer and ``--persist`` all name things through here.
"""

from __future__ import annotations

import functools

from qvm.definition.schema import (
    DEFAULT_PCI_SLOTS_Q35,
    HOTPLUG_PORT_PREFIX,
    DiskSpec,
    HotplugSpec,
    NicSpec,
)

# The ids qvm makes, by kind (qvm.layout.kinds): <prefix><N>. One kind's id may not take
# another kind's form: cpu<N> is vCPU slot N's id whether or not that slot is plugged now
# (a DIMM called cpu1 would make `qvm cpu add` fail later), and a NIC called dimm0 would
# read as memory in every list. So ids stay unique across all kinds, now and for what qvm
# adds next.
_DIGITS = frozenset("0123456789")


@functools.cache
def kind_of_prefix() -> dict[str, str]:
    """Each generated id's prefix, and the kind of device whose ids it begins."""
    # only for ids set in a file: `qvm status` and `list` of machines without any skip it
    from qvm.layout.kinds import KINDS  # noqa: PLC0415 -- see the comment above

    return {kind.id_prefix: kind.family for kind in KINDS} | {HOTPLUG_PORT_PREFIX: "PCIe root port"}


def generated_id_kind(dev_id: str) -> str | None:
    """The kind of device ("vCPU", "memory", "disk", "NIC", "PCIe root port") whose
    generated ids look like ``dev_id``, or None. (No regular expression: compiling one
    would cost every load of a machine file with an id set ~0.2 ms.)"""
    for prefix, family in kind_of_prefix().items():
        number = dev_id[len(prefix) :]
        if dev_id.startswith(prefix) and number and _DIGITS.issuperset(number):
            return family
    return None


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


def share_id(index: int) -> str:
    """The device id, and the guest's mount tag, of the ``index``-th [[share]]."""
    from qvm.layout.kinds import SHARE  # noqa: PLC0415 -- as in kind_of_prefix

    return f"{SHARE.id_prefix}{index}"


def stable_mac(machine_name: str, index: int) -> str:
    """A locally administered MAC in QEMU's 52:54:00 range, the same at every boot."""
    import hashlib  # noqa: PLC0415 -- 2 ms at start-up; only machines with NICs need it

    digest = hashlib.sha256(f"{machine_name}/{index}".encode()).digest()
    return "52:54:00:" + ":".join(f"{b:02x}" for b in digest[:3])
