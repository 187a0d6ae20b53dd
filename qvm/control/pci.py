"""Where a hotplugged PCI device can go: a free ``pcie-root-port`` (``hp0``...) on q35,
whose ``pcie.0`` takes no hotplug; the bus ``pci.0`` itself on pc.
"""

from __future__ import annotations

import re
from typing import Any, Generic, TypeVar

from qvm.base.record import Record
from qvm.control.qmp_session import QmpSession
from qvm.control.transaction import ListedDevice, find_listed, restart_hint
from qvm.errors import HotplugError
from qvm.layout.rundir import RunDir
from qvm.store.launch import LaunchRecord

PC_BUS_SLOTS = 32  # slots on pc's pci.0, the host bridge's included


# --- PCI places ------------------------------------------------------------------------


class PciPlaces(Record):
    """Where a hotplugged PCI device can go in this VM."""

    machine_type: str
    # q35: qvm's spare root ports in order, each with the id of the device on it (or None)
    ports: tuple[tuple[str, str | None], ...] = ()
    # pc: slots in use on pci.0
    bus_slots_used: int = 0

    def free_ports(self) -> list[str]:
        return [port for port, device in self.ports if device is None]

    @property
    def free(self) -> int:
        if self.machine_type == "q35":
            return len(self.free_ports())
        if self.machine_type == "pc":
            return PC_BUS_SLOTS - self.bus_slots_used
        return 0

    def summary(self) -> str:
        if self.machine_type == "q35":
            total = len(self.ports)
            used = total - self.free
            text = f"PCIe root ports for hotplug: {self.free} of {total} free"
            taken = [f"{p} {d}" for p, d in self.ports if d is not None]
            return text + (f" ({', '.join(taken)})" if used else "")
        if self.machine_type == "pc":
            return f"PCI slots on pci.0: {self.free} of {PC_BUS_SLOTS} free"
        return f"{self.machine_type} has no PCI bus to hotplug into"

    def as_json(self) -> dict[str, Any]:
        return {
            "machine_type": self.machine_type,
            "ports": [{"id": p, "device": d} for p, d in self.ports],
            "free": self.free,
            "bus_slots_used": self.bus_slots_used if self.machine_type == "pc" else None,
        }


_Listed = TypeVar("_Listed", bound=ListedDevice)


class PciListing(Record, Generic[_Listed]):
    """A kind's PCI devices on a running VM, as ``disk list`` and ``nic list`` show them:
    the devices, the places left for more, and the guest's own names for what it has
    (None: it did not say). ``keys`` name the devices and the guest's names in JSON
    (``("disks", "guest_blk")``)."""

    name: str
    keys: tuple[str, str]
    devices: list[_Listed]
    places: PciPlaces
    guest: list[str] | None = None

    def find(self, dev_id: str) -> _Listed | None:
        return find_listed(self.devices, dev_id)

    def as_json(self) -> dict[str, Any]:
        devices, guest = self.keys
        return {
            "name": self.name,
            devices: [device.as_json() for device in self.devices],
            "pci": self.places.as_json(),
            guest: self.guest,
        }


PORT_ID = re.compile(r"hp(?P<index>[0-9]+)")


def pci_places_from(machine_type: str, pci: Any) -> PciPlaces:
    """``PciPlaces`` from ``query-pci``'s reply. qvm's spare root ports are the bridges
    on pcie.0 named ``hp<N>`` (``-device pcie-root-port,id=hp0,...``, see cmdline)."""
    buses = pci if isinstance(pci, list) else []
    root: dict[str, Any] = next((b for b in buses if b.get("bus") == 0), {"devices": []})
    if machine_type == "q35":
        ports = []
        for device in root.get("devices", []):
            qdev = device.get("qdev_id") or ""
            match = PORT_ID.fullmatch(qdev)
            if match is None or "pci_bridge" not in device:
                continue
            below = (device.get("pci_bridge") or {}).get("devices") or []
            user = (below[0].get("qdev_id") or "(a device without id)") if below else None
            ports.append((int(match["index"]), qdev, user))
        return PciPlaces(machine_type, ports=tuple((p, u) for _, p, u in sorted(ports)))
    slots = {d.get("slot") for d in root.get("devices", [])}
    return PciPlaces(machine_type, bus_slots_used=len(slots))


def pci_places(session: QmpSession, launch: LaunchRecord) -> PciPlaces:
    machine_type = launch.machine_type or "q35"
    if machine_type not in ("q35", "pc"):
        return PciPlaces(machine_type)
    return pci_places_from(machine_type, session.execute("query-pci"))


def choose_pci_bus(places: PciPlaces, run: RunDir, launch: LaunchRecord, what: str) -> str | None:
    """The bus for a new PCI device (``None``: QEMU picks a slot on pc's ``pci.0``)."""
    name = run.name
    if places.machine_type == "q35":
        free = places.free_ports()
        if free:
            return free[0]
        total = len(places.ports)
        hint = restart_hint(run, launch, "hotplug.pci_slots")
        if total == 0:
            raise HotplugError(
                f"{name}: {what}: no PCIe root port for hotplug: q35's pcie.0 takes no "
                f"hotplugged devices, and this VM was started with hotplug.pci_slots = 0 "
                f"(hint: {hint.replace('raise', 'set', 1)})"
            )
        raise HotplugError(
            f"{name}: {what}: no free PCIe root port: {total} of {total} used "
            f"(hint: remove a hotplugged device, or {hint})"
        )
    if places.machine_type == "pc":
        if places.free <= 0:
            raise HotplugError(
                f"{name}: {what}: no free PCI slot: {PC_BUS_SLOTS} of {PC_BUS_SLOTS} used on "
                "pci.0 (hint: remove a hotplugged device first)"
            )
        return None
    raise HotplugError(
        f"{name}: {what}: {places.machine_type} has no PCI bus to hotplug into "
        "(hint: use machine.type q35 or pc)"
    )
