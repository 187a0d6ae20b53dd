"""NIC hotplug on a running VM: a user-mode netdev and a NIC device, and back.

Add is ``netdev_add user`` (with its ``hostfwd`` port forwards) and ``device_add`` of the
NIC (virtio-net-pci by default) on a free PCIe root port (q35) or ``pci.0`` (pc), with a
stable MAC (``qvm.cmdline.stable_mac`` of the machine's name and a fresh NIC index, as the
boot NICs get). A fixed host port already in use is refused before QEMU is asked, naming
the process (or the qvm VM) that holds it; host port 0 is bound by QEMU and read back.
Remove is ``device_del``, ``DEVICE_DELETED`` of the device itself, then ``netdev_del``.

Nothing here prints.
"""

from __future__ import annotations

import re
from collections.abc import Collection, Mapping, Sequence
from typing import TYPE_CHECKING, Any

from qvm.base.record import Record
from qvm.cmdline.argv import uplink_ids
from qvm.control import transaction
from qvm.control.forwards import forward_text, hostfwd_rule, read_back_ports, resolve_forward
from qvm.control.guard import check_device_add
from qvm.control.guest import guest_report
from qvm.control.pci import PciListing, PciPlaces, choose_pci_bus, pci_places
from qvm.control.qmp_session import QmpSession
from qvm.definition.forwards import ForwardError, parse_forward
from qvm.definition.naming import stable_mac
from qvm.definition.schema import NIC_MODELS, PortForward
from qvm.errors import ControlError, HotplugError, UsageError
from qvm.layout import kinds
from qvm.layout.rundir import RunDir
from qvm.store.devices import Command, DeviceRecord, device_records
from qvm.store.forwards import forget_forwards, read_forwards, record_forwards
from qvm.store.launch import Forward, LaunchRecord
from qvm.store.pending import PERIPHERAL, pending_ids

if TYPE_CHECKING:
    from qvm.store.snapshots import PluggedDevice

NIC_PREFIX = kinds.NIC.id_prefix
DEFAULT_UNPLUG_TIMEOUT = 10.0
NIC_TYPES = (*NIC_MODELS, "virtio-net-device")
_MAC = re.compile(r"[0-9a-f]{2}(?::[0-9a-f]{2}){5}")
NIC = transaction.Peripheral(kinds.NIC.noun)


class NicInfo(Record, transaction.ListedDevice):
    id: str
    origin: str  # "boot" (the machine file), "qvm" (added by qvm), "other" (qvm qmp)
    model: str
    mac: str | None
    # boot NICs': from launch.json; since changed at run time: forwards.json
    forwards: tuple[Forward, ...] = ()
    bus: str | None = None
    pending: bool = False

    def forwards_text(self) -> list[str]:
        return [forward_text(f) for f in self.forwards]

    def as_json(self) -> dict[str, Any]:
        return {**transaction.listed_json(self), "forwards": [f.to_json() for f in self.forwards]}


# `nic list`: the guest's names for what it has are its interfaces, from its serial console
NicList = PciListing[NicInfo]
LISTING_KEYS = ("nics", "guest_net")  # their names in JSON (schemas/nic-list.json)


def nics_from(
    name: str,
    peripherals: dict[str, str],
    macs: dict[str, str | None],
    records: Mapping[str, DeviceRecord],
    pending: Collection[str],
    boot_ids: Collection[str],
    forwards: Sequence[Forward],
    places: PciPlaces,
    guest: dict[str, str] | None = None,
) -> NicList:
    """``NicList`` from the peripheral devices (id -> type), their MACs, qvm's records
    (of NICs) by id and the VM's current port forwards (each naming its NIC)."""
    nics = []
    for dev_id, dev_type in sorted(peripherals.items()):
        if dev_type not in NIC_TYPES:
            continue
        record = records.get(dev_id)
        nics.append(
            NicInfo(
                id=dev_id,
                origin=transaction.origin_of(dev_id, record, boot_ids),
                model=dev_type,
                mac=macs.get(dev_id),
                forwards=tuple(f for f in forwards if f.nic == dev_id),
                bus=record.bus if record else None,
                pending=dev_id in pending,
            )
        )
    return PciListing(name, LISTING_KEYS, nics, places, transaction.guest_names(guest, "net"))


def _query(session: QmpSession, run: RunDir, launch: LaunchRecord) -> NicList:
    peripherals = transaction.peripheral_types(session)
    records = transaction.reconcile_devices(session, run, set(peripherals), (kinds.NIC.name,))
    macs: dict[str, str | None] = {}
    for dev_id, dev_type in peripherals.items():
        if dev_type in NIC_TYPES:
            try:
                macs[dev_id] = str(
                    session.execute("qom-get", {"path": PERIPHERAL + dev_id, "property": "mac"})
                )
            except ControlError as error:
                if error.qemu_exited:
                    raise
                macs[dev_id] = None
    nics = [i for i, kind in peripherals.items() if kind in NIC_TYPES]
    forwards = read_forwards(run)
    if any(f.nic not in nics for f in forwards):  # of a NIC gone since
        for nic in {f.nic for f in forwards} - set(nics):
            forget_forwards(run, nic)
        forwards = read_forwards(run)
    return nics_from(
        run.name,
        peripherals,
        macs,
        records,
        pending_ids(run),
        transaction.boot_device_ids(launch.argv),
        forwards,
        pci_places(session, launch),
        guest_report(run),
    )


def list_nics(run: RunDir) -> NicList:
    with transaction.opened(run) as (session, launch):
        return _query(session, run, launch)


# --- checks ------------------------------------------------------------------------------


def parse_forwards(name: str, texts: list[str]) -> list[PortForward]:
    forwards = []
    for text in texts:
        try:
            forwards.append(parse_forward(text))
        except ForwardError as error:
            raise UsageError(
                f'{name}: nic add: --forward: {error} (hint: forwards look like "tcp:2222:22", '
                '"tcp:0:22" for any free host port, or "udp:0.0.0.0:5353:53")'
            ) from None
    return forwards


def check_mac(name: str, mac: str) -> str:
    mac = mac.lower()
    if not _MAC.fullmatch(mac) or int(mac[:2], 16) & 1:
        raise UsageError(
            f"{name}: nic add: --mac must be a unicast MAC address like 52:54:00:12:34:56 "
            f"(an even first byte), got {mac!r}"
        )
    return mac


# --- add -------------------------------------------------------------------------------


class NicAdd(Record):
    name: str
    nic: NicInfo
    places: PciPlaces  # after the add
    forwards_asked: tuple[str, ...] = ()  # as given (host port 0 stays 0, for --persist)
    forced_after_unplug: bool = False
    hub: int | None = None  # a network NIC's QEMU hub (qvm.cmdline.argv.uplink_args)

    def as_json(self) -> dict[str, Any]:
        return {"name": self.name, "nic": self.nic.as_json(), "pci": self.places.as_json()}


def add_nic(
    run: RunDir,
    forwards: list[str] | None = None,
    model: str = "virtio-net-pci",
    mac: str | None = None,
    dev_id: str | None = None,
    force: bool = False,
    switch_dir: str | None = None,
) -> NicAdd:
    """Add a user-mode NIC with these port forwards (``PROTO:[HOSTADDR:]HOSTPORT:GUESTPORT``),
    or, with ``switch_dir``, a NIC on that network's switch (``qvm.ops.net`` joins it)."""
    launch = transaction.launch_of(run)
    name = run.name
    if model not in NIC_MODELS:
        choices = ", ".join(NIC_MODELS)
        raise HotplugError(f"{name}: nic add: --model must be one of {choices}, got {model!r}")
    parsed = parse_forwards(name, list(forwards or []))
    if mac is not None:
        mac = check_mac(name, mac)
    with transaction.opened(run, launch) as (session, launch):
        forced = check_device_add(run, launch, "nic add", force)
        nics = _query(session, run, launch)
        bus = choose_pci_bus(nics.places, run, launch, "nic add")
        taken = transaction.taken_ids(session, run, (n.id for n in nics.devices))
        taken |= {r.id for r in device_records(run)}
        macs = {n.mac for n in nics.devices if n.mac}
        boot_count = sum(1 for a in launch.argv if a == "-netdev")
        machine = launch.name or name

        def fresh_mac(index: str) -> bool:
            return mac is not None or stable_mac(machine, int(index)) not in macs

        if dev_id is None:
            index, dev_id = transaction.fresh_id(
                NIC_PREFIX, taken, start=boot_count, ok=lambda i: fresh_mac(i[len(NIC_PREFIX) :])
            )
        else:
            transaction.check_new_id(run, dev_id, taken, "nic add")
            index = transaction.fresh_id("", [], start=boot_count, ok=fresh_mac)[0]
        mac = mac or stable_mac(machine, index)
        if mac in macs:
            raise HotplugError(
                f"{name}: nic add: MAC {mac} is already used by another NIC of this VM "
                f"(hint: qvm nic list {name})"
            )
        resolved = [resolve_forward(run, fwd, dev_id, "nic add") for fwd in parsed]
        netdev: dict[str, Any] = {"type": "user", "id": dev_id}
        if resolved:
            netdev["hostfwd"] = [{"str": hostfwd_rule(f)} for f in resolved]
        if switch_dir is not None:  # the NIC on hub ``index``, and its uplink
            netdev = {"type": "hubport", "id": dev_id, "hubid": index}
        device = {"driver": model, "id": dev_id, "netdev": dev_id, "mac": mac}
        steps = [transaction.Step("netdev_add", netdev, ("netdev_del", {"id": dev_id}))]
        cleanup = netdev_cleanup(dev_id)
        if switch_dir is not None:
            vde, port = uplink_ids(dev_id)
            uplink = {"type": "hubport", "id": port, "hubid": index, "netdev": vde}
            steps += [
                transaction.Step(
                    "netdev_add",
                    {"type": "vde", "id": vde, "sock": switch_dir},
                    ("netdev_del", {"id": vde}),
                ),
                transaction.Step("netdev_add", uplink, ("netdev_del", {"id": port})),
            ]
            cleanup = (("netdev_del", {"id": port}), ("netdev_del", {"id": vde}), *cleanup)
        steps.append(transaction.Step("device_add", device | ({"bus": bus} if bus else {})))

        def translate(desc: str) -> tuple[str, str | None] | None:
            if "Could not set up host forwarding rule" in desc:
                return f"netdev_add {dev_id}: {desc}", "a host port is taken; pick another"
            return None

        record = DeviceRecord(
            dev_id,
            kinds.NIC.name,
            cleanup=cleanup,
            bus=bus,
            model=model,
            mac=mac,
            index=index,
        )
        transaction.plug(session, run, transaction.Plug("nic add", steps, record, translate))
        bound = read_back_ports(session, run, resolved)  # a new netdev: nothing known on it
        record_forwards(run, bound)
        after = _query(session, run, launch)
        nic = after.find(dev_id) or NicInfo(dev_id, "qvm", model, mac, bound, bus)
        hub = index if switch_dir is not None else None
        return NicAdd(name, nic, after.places, tuple(forwards or ()), forced, hub)


def netdev_cleanup(dev_id: str) -> tuple[Command, ...]:
    """What deletes a hotplugged NIC's netdev once the device is gone."""
    return (("netdev_del", {"id": dev_id}),)


def restored_record(saved: PluggedDevice, now: float) -> DeviceRecord:
    """The record of a NIC a snapshot's start put on QEMU's command line, as if qvm had
    hotplugged it (``nic list``, ``nic del`` know it)."""
    return DeviceRecord(**saved._asdict(), cleanup=netdev_cleanup(saved.id), added=now)


# --- remove ------------------------------------------------------------------------------


def remove_nic(
    run: RunDir, dev_id: str, timeout: float = DEFAULT_UNPLUG_TIMEOUT
) -> transaction.Removal[NicInfo]:
    """Unplug a NIC qvm added, wait for the guest, then delete its netdev (and forwards)."""
    with transaction.opened(run) as (session, launch):
        nics = _query(session, run, launch).devices
        removal = transaction.remove_hotplugged(session, run, launch, NIC, dev_id, nics, timeout)
        if removal.unplug.outcome == "removed":
            forget_forwards(run, dev_id)
        return removal


# --- the machine file ----------------------------------------------------------------------


def nic_entry(nic: NicInfo, forwards: tuple[str, ...], with_id: bool) -> dict[str, Any]:
    """The ``[[nic]]`` that gives this NIC at the next boot (``--persist``): its model
    (unless the default), its MAC (so the guest sees the same NIC), its forwards as
    given (a host port 0 picks a free one at each start), and the id if the user chose it."""
    entry: dict[str, Any] = {}
    if nic.model != "virtio-net-pci":
        entry["model"] = nic.model
    if nic.mac:
        entry["mac"] = nic.mac
    if forwards:
        entry["forwards"] = list(forwards)
    if with_id:
        entry["id"] = nic.id
    return entry


def nic_entry_matches(entry: dict[str, Any], nic: NicInfo) -> bool:
    """True if a ``[[nic]]`` of the machine file is this NIC: the same id, or the same MAC."""
    if entry.get("id") is not None:
        return bool(entry.get("id") == nic.id)
    mac = entry.get("mac")
    return isinstance(mac, str) and nic.mac is not None and mac.lower() == nic.mac.lower()
