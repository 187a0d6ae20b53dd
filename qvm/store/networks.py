"""A private network's records: ``network.json`` (its subnet and every member NIC's
address, stable across starts) and ``switch.json`` (the ``vde_switch`` qvm started), both
in the network's folder (``qvm.layout.netfiles``), read and written under its lock.

``allocate`` is pure (with ``qvm.definition.subnets``): the property tests drive it.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import time
from collections.abc import Iterator
from typing import Any

from qvm.base.jsonfile import write_json_atomic
from qvm.base.record import Record
from qvm.definition.subnets import ip_text, parse_ip, parse_subnet
from qvm.errors import HostError, QvmError
from qvm.layout.locks import is_dir_locked
from qvm.layout.netfiles import NetFiles
from qvm.layout.runfiles import STATE_FILE
from qvm.store.fields import Fields, PlainRecord, read_record
from qvm.store.state import read_state

LOCK_TIMEOUT = 30.0  # a join holds the lock while its VM's QEMU starts
_HINT = "qvm net rm NAME rewrites it (no member may run)"


class Member(PlainRecord):
    """One NIC on the network: whose, and its address (kept across starts)."""

    vm: str
    nic: str
    mac: str
    address: str
    pinned: bool = False  # [[nic]] address: the user chose it
    # the address it had before another VM's pinned address took it
    displaced_from: str | None = None
    displaced_by: str | None = None

    def to_json(self) -> dict[str, Any]:
        return {k: v for k, v in self._asdict().items() if v is not None}


class NetworkRecord(Record):
    name: str
    subnet: str
    subnet_from: str  # "derived", or the network definition file that says it
    members: tuple[Member, ...] = ()

    @classmethod
    def read(cls, f: Fields) -> NetworkRecord:
        record = f.declared(cls, members=f.records("members", Member.read, ()))
        try:
            parse_subnet(record.subnet)
        except ValueError as error:
            raise f.fail("subnet", str(error)) from None
        return record

    def to_json(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "subnet": self.subnet,
            "subnet_from": self.subnet_from,
            "members": [m.to_json() for m in self.members],
        }

    def member(self, vm: str, nic: str) -> Member | None:
        return next((m for m in self.members if (m.vm, m.nic) == (vm, nic)), None)

    def hosts_lines(self) -> list[tuple[str, str]]:
        """(address, name) for /etc/hosts: each VM by its first NIC on the network."""
        seen: dict[str, str] = {}
        for member in self.members:
            seen.setdefault(member.vm, member.address)
        return [(address, vm) for vm, address in seen.items()]


class AddressTaken(HostError):
    """A pinned address another member holds while it runs."""


class MacTaken(HostError):
    """A MAC another running member's NIC has: one switch would deliver their frames to
    either."""


class SubnetFull(HostError):
    """No address is left in the subnet."""


class Allocation(Record):
    record: NetworkRecord
    member: Member
    note: str | None = None  # what changed that the user should hear about


def allocate(
    record: NetworkRecord,
    vm: str,
    nic: str,
    mac: str,
    pinned: str | None,
    running: frozenset[str],
) -> Allocation:
    """Give ``vm``'s NIC ``nic`` its address: the one it had (kept across starts), the
    pinned one (``[[nic]] address``), else the lowest free host address. A pinned address
    another member holds is refused while that member's VM runs (``running``), and taken
    from it otherwise (it gets a new one when it next joins, and hears why). Pure."""
    subnet = parse_subnet(record.subnet)
    own = record.member(vm, nic)
    others = [m for m in record.members if (m.vm, m.nic) != (vm, nic)]
    twin = next((m for m in others if m.mac.lower() == mac.lower() and m.vm in running), None)
    if twin is not None:
        raise MacTaken(
            f"MAC {mac} on network {record.name} is {twin.vm}'s ({twin.nic}), which runs",
            hint="give this NIC another mac, or leave mac out (qvm derives one from the name)",
        )
    note = None
    if pinned is not None:
        value = parse_ip(pinned)
        if value not in subnet.hosts():
            raise HostError(
                f"address {pinned} is not a host address of network {record.name}'s"
                f" subnet {subnet}",
                hint=f"pick one in {subnet}, or leave address out",
            )
        holder = next((m for m in others if m.address == pinned), None)
        if holder is not None and holder.vm in running:
            raise AddressTaken(
                f"address {pinned} on network {record.name} is {holder.vm}'s ({holder.nic}),"
                " which runs",
                hint=f"pick another address, or stop {holder.vm} first",
            )
        if holder is not None:
            displaced = holder._replace(displaced_from=pinned, displaced_by=vm)
            others = [displaced if m is holder else m for m in others]
        member = Member(vm, nic, mac, pinned, pinned=True)
    elif own is not None and not own.displaced_by and not own.pinned:
        member = own._replace(mac=mac)
    else:
        held = {parse_ip(m.address) for m in others if not m.displaced_by}
        free = next((a for a in subnet.hosts() if a not in held), None)
        if free is None:
            raise SubnetFull(
                f"network {record.name}'s subnet {subnet} is full: its"
                f" {len(subnet.hosts())} addresses are all members'",
                hint="give the network a larger subnet in its definition, or remove"
                " members (qvm net rm, once none runs)",
            )
        member = Member(vm, nic, mac, ip_text(free))
        if own is not None and own.displaced_by:
            note = (
                f"{own.displaced_from} was taken by {own.displaced_by}'s pinned address;"
                f" {vm} now has {member.address}"
            )
    members = sorted((*others, member), key=lambda m: (parse_ip(m.address), m.vm, m.nic))
    return Allocation(record._replace(members=tuple(members)), member, note)


def release(record: NetworkRecord, vm: str) -> NetworkRecord:
    """The record without ``vm``'s members (the VM was removed)."""
    return record._replace(members=tuple(m for m in record.members if m.vm != vm))


# --- files ---------------------------------------------------------------------------------


class SwitchRecord(PlainRecord):
    """The ``vde_switch`` qvm started for the network: its identity, and its history."""

    pid: int
    start_time: int | None
    started_at: float
    restarts: int = 0  # started again after it died while members ran
    died_at: float | None = None  # when a member last found it dead

    @classmethod
    def read(cls, f: Fields) -> SwitchRecord:
        return f.declared(cls, pid=f.pid("pid"))


def member_running(state_root: str | os.PathLike[str], vm: str) -> bool:
    """A member is running while its supervisor is alive (it holds its run dir's lock)
    and has not recorded its QEMU's end: a supervisor on its way out, leaving its
    networks, does not count."""
    run = os.path.join(os.fspath(state_root), vm)
    if not is_dir_locked(run):
        return False
    try:
        state = read_state(os.path.join(run, STATE_FILE))
    except QvmError:
        return True  # a supervisor is alive: assume the worse for the switch
    return state is None or state.state not in ("stopped", "crashed")


def others_running(net: NetFiles, state_root: str | os.PathLike[str], vm: str) -> list[str]:
    """The network's members, but ``vm``, that run (under the network's lock)."""
    record = read_network(net)
    members = {m.vm for m in record.members} if record is not None else set()
    return sorted(m for m in members - {vm} if member_running(state_root, m))


def read_network(net: NetFiles) -> NetworkRecord | None:
    return read_record(
        net.network_file, lambda data, source: NetworkRecord.read(Fields(data, source, _HINT))
    )


def write_network(net: NetFiles, record: NetworkRecord) -> None:
    write_json_atomic(net.network_file, record.to_json())


def read_switch(net: NetFiles) -> SwitchRecord | None:
    return read_record(
        net.switch_file, lambda data, source: SwitchRecord.read(Fields(data, source, _HINT))
    )


def write_switch(net: NetFiles, record: SwitchRecord) -> None:
    write_json_atomic(net.switch_file, record.to_json())


def make_network_dir(net: NetFiles) -> None:
    """The network's folder, 0700 (and ``_networks`` above it, and the state root)."""
    networks = os.path.dirname(net.path)
    for path in (os.path.dirname(networks), networks, net.path):
        try:
            os.mkdir(path, 0o700)
        except FileExistsError:
            continue
        os.chmod(path, 0o700)  # mkdir's mode goes through the umask


@contextlib.contextmanager
def network_lock(net: NetFiles, timeout: float = LOCK_TIMEOUT) -> Iterator[None]:
    """Hold the network's lock: one join, leave or switch restart at a time."""
    make_network_dir(net)
    fd = os.open(net.lock, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC | os.O_NOFOLLOW, 0o600)
    try:
        deadline = time.monotonic() + timeout
        while True:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if time.monotonic() > deadline:
                    raise HostError(
                        f"network {net.name}: its lock {net.lock} was held for {timeout:g} s",
                        hint="another qvm command is starting or stopping a member; try again",
                    ) from None
                time.sleep(0.02)
        yield
    finally:
        os.close(fd)
