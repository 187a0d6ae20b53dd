"""Private networks: a VM joining them at start (``join_networks``, which `up` and
`restart` run around the supervisor's start), and ``net list`` / ``net rm``.

A join, for each network the VM's NICs name, under that network's lock: read its
definition beside the machine file (``qvm.definition.networks``), give each NIC its
stable address (``qvm.store.networks.allocate``), start the switch unless it runs, and
write the VM's ``networks.json`` for its supervisor. The lock is held until the new
supervisor holds its run dir's: a member that leaves meanwhile sees this one running
and leaves the switch alone (``qvm.supervisor.network``).
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

from qvm.base.record import Record
from qvm.definition.naming import nic_id, stable_mac
from qvm.definition.networks import load_network
from qvm.definition.schema import Machine
from qvm.definition.subnets import derived_subnet, parse_subnet
from qvm.errors import HostError, NotRunningError, QvmError, UsageError
from qvm.host.vde import ensure_switch, stop_switch, switch_problem
from qvm.layout.netfiles import NetFiles, check_network_name, network_names
from qvm.layout.rundir import RunDir
from qvm.store.netlinks import (
    NetNic,
    read_netnics,
    read_network_state,
    write_netnics,
)
from qvm.store.networks import (
    MacTaken,
    Member,
    NetworkRecord,
    SwitchRecord,
    allocate,
    member_running,
    network_lock,
    read_network,
    read_switch,
    release,
    write_network,
)
from qvm.store.state import current_qemu_run

if TYPE_CHECKING:
    from qvm.control.nic import NicAdd


def running_members(state_root: Path, record: NetworkRecord, but: str) -> frozenset[str]:
    return frozenset(
        m.vm for m in record.members if m.vm != but and member_running(state_root, m.vm)
    )


def _network_record(
    net: NetFiles, machine_dir: Path, vm: str, running: frozenset[str] | None = None
) -> NetworkRecord:
    """The network's record, made on first use; a subnet its definition changed is
    taken while no member runs (all addresses are given anew), refused otherwise."""
    state_root = Path(os.path.dirname(os.path.dirname(net.path)))
    spec = load_network(machine_dir, net.name)
    record = read_network(net)
    if record is None:
        if spec.subnet is not None:
            return NetworkRecord(net.name, spec.subnet, str(spec.file))
        taken = frozenset(
            parse_subnet(other.subnet).network
            for name in network_names(state_root)
            if name != net.name and (other := read_network(NetFiles(state_root, name)))
        )
        return NetworkRecord(net.name, str(derived_subnet(net.name, taken)), "derived")
    if spec.subnet is None or spec.subnet == record.subnet:
        return record
    if running is None:
        running = running_members(state_root, record, vm)
    if running:
        raise HostError(
            f"network {net.name}: {spec.file} says subnet {spec.subnet}, but"
            f" {', '.join(sorted(running))} run{'s' if len(running) == 1 else ''} on"
            f" {record.subnet}",
            hint="stop the network's members first; they get new addresses at their next start",
        )
    return NetworkRecord(net.name, spec.subnet, str(spec.file))


class Joined(Record):
    nics: tuple[NetNic, ...]
    notes: tuple[str, ...] = ()  # addresses that changed, and why


def plan_nics(machine: Machine) -> list[tuple[int, str, str, str | None]]:
    """(index, NIC id, MAC, pinned address) of each NIC, by network."""
    return [
        (index, nic_id(index, nic), nic.mac or stable_mac(machine.name, index), nic.address)
        for index, nic in enumerate(machine.nics)
        if nic.network is not None
    ]


def _key_of(error: QvmError, pinned: str | None) -> str:
    """The NIC's key a refused join is about."""
    if isinstance(error, MacTaken):
        return "mac"
    return "address" if pinned else "network"


@contextlib.contextmanager
def join_networks(machine: Machine, run: RunDir) -> Iterator[Joined]:
    """Join the VM's networks (see the module's docstring); the locks are held until the
    ``with`` block, which starts the supervisor, ends. A failure in the block stops a
    switch this join started that no member uses."""
    names = sorted({nic.network for nic in machine.nics if nic.network is not None})
    state_root = run.path.parent
    nets = [NetFiles(state_root, name) for name in names]
    started: list[NetFiles] = []
    with contextlib.ExitStack() as stack:
        for net in nets:  # in name order: two joins never wait for each other's
            stack.enter_context(network_lock(net))
        nics: list[NetNic] = []
        notes: list[str] = []
        for net in nets:
            record = read_network(net)
            running = running_members(state_root, record, machine.name) if record else frozenset()
            record = _network_record(net, machine.path.parent, machine.name, running)
            prefix = parse_subnet(record.subnet).prefix
            for index, dev_id, mac, pinned in plan_nics(machine):
                if machine.nics[index].network != net.name:
                    continue
                try:
                    allocation = allocate(record, machine.name, dev_id, mac, pinned, running)
                except QvmError as error:
                    raise type(error)(
                        error.problem,
                        file=str(machine.path),
                        key=f"nic[{index}].{_key_of(error, pinned)}",
                        hint=error.hint,
                    ) from None
                record = allocation.record
                if allocation.note:
                    notes.append(f"network {net.name}: {allocation.note}")
                member = allocation.member
                nics.append(NetNic(dev_id, net.name, mac, member.address, prefix, index))
            write_network(net, record)
            if ensure_switch(net)[1]:
                started.append(net)
        run.create()
        write_netnics(run.networks_file, tuple(nics))
        try:
            yield Joined(tuple(nics), tuple(notes))
        except BaseException:
            for net in started:
                now = read_network(net)
                if now is None or not running_members(state_root, now, machine.name):
                    with contextlib.suppress(QvmError):
                        stop_switch(net)
            raise


def member_hosts(state_root: Path, networks: list[str]) -> list[tuple[str, str]]:
    """(address, name) of every member of ``networks``, each VM once (by its first
    network in name order), sorted by name: the guest's /etc/hosts lines."""
    hosts: dict[str, str] = {}
    for name in networks:
        record = read_network(NetFiles(state_root, name))
        for address, vm in record.hosts_lines() if record else []:
            hosts.setdefault(vm, address)
    return [(address, vm) for vm, address in sorted(hosts.items())]


# --- nic add --network ------------------------------------------------------------------


class NetworkNicAdd(Record):
    added: NicAdd
    member: NetNic


def add_network_nic(
    run: RunDir,
    network: str,
    model: str = "virtio-net-pci",
    mac: str | None = None,
    dev_id: str | None = None,
    force: bool = False,
) -> NetworkNicAdd:
    """Hotplug a NIC on ``network`` into a running VM: the switch started if need be, the
    NIC plugged with its uplink, then its stable address given and told to the VM's
    supervisor (``networks.json``), which sets the guest up."""
    from qvm.control.nic import add_nic  # noqa: PLC0415 -- the CLI's nic add only
    from qvm.store.launch import read_launch  # noqa: PLC0415 -- as above

    check_network_name(network)
    launch = read_launch(run.launch_file)
    if launch is None:
        raise NotRunningError(run.name)
    vm = launch.name or run.name
    state_root = run.path.parent
    net = NetFiles(state_root, network)
    with network_lock(net):
        record = read_network(net)
        running = running_members(state_root, record, vm) if record else frozenset()
        machine_dir = Path(launch.machine_file).parent if launch.machine_file else run.path
        record = _network_record(net, machine_dir, vm, running)
        allocate(record, vm, "", "", None, running)  # a full subnet: refused before the plug
        ensure_switch(net)
        added = add_nic(run, [], model, mac, dev_id, force, switch_dir=net.switch_dir)
        assert added.hub is not None and added.nic.mac is not None
        allocation = allocate(record, vm, added.nic.id, added.nic.mac, None, running)
        write_network(net, allocation.record)
        prefix = parse_subnet(allocation.record.subnet).prefix
        member = NetNic(
            added.nic.id, network, added.nic.mac, allocation.member.address, prefix, added.hub
        )
        nics = tuple(n for n in read_netnics(run.networks_file) if n.nic != member.nic)
        write_netnics(run.networks_file, (*nics, member))
    return NetworkNicAdd(added, member)


# --- net list, net rm --------------------------------------------------------------------


class MemberInfo(Record):
    vm: str
    nic: str
    mac: str
    address: str
    running: bool
    link: str | None  # the supervisor's word while the VM runs: joined, rejoined, down
    link_error: str | None = None
    guest_configured: bool | None = None

    def as_json(self) -> dict[str, Any]:
        return dict(self._asdict())


class NetworkInfo(Record):
    name: str
    subnet: str
    subnet_from: str
    switch: str  # running, dead, stopped
    switch_pid: int | None
    switch_restarts: int
    switch_problem: str | None
    members: tuple[MemberInfo, ...]

    def as_json(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "subnet": self.subnet,
            "subnet_from": self.subnet_from,
            "switch": {
                "state": self.switch,
                "pid": self.switch_pid,
                "restarts": self.switch_restarts,
                "problem": self.switch_problem,
            },
            "members": [m.as_json() for m in self.members],
        }


def _switch_state(
    net: NetFiles, switch: SwitchRecord | None, running: bool
) -> tuple[str, str | None]:
    problem = switch_problem(net, switch)
    if problem is None:
        return "running", None
    # a dead switch with members running is a fault (their supervisors restart it)
    return ("dead" if running else "stopped"), problem


def network_info(state_root: Path, name: str) -> NetworkInfo:
    net = NetFiles(state_root, name)
    record = read_network(net)
    if record is None:
        raise UsageError(f"no network {name!r}", hint="qvm net list shows the networks")
    switch = read_switch(net)
    # join order depends on which supervisor won the lock; readers want a stable order
    ordered = sorted(record.members, key=lambda m: (m.vm, m.nic))
    members = [_member_info(state_root, member) for member in ordered]
    state, problem = _switch_state(net, switch, any(m.running for m in members))
    return NetworkInfo(
        name,
        record.subnet,
        record.subnet_from,
        state,
        switch.pid if switch and state == "running" else None,
        switch.restarts if switch else 0,
        problem if state == "dead" else None,
        tuple(members),
    )


def _member_info(state_root: Path, member: Member) -> MemberInfo:
    running = member_running(state_root, member.vm)
    run = RunDir(state_root / member.vm)
    link = link_error = configured = None
    if running:
        with contextlib.suppress(QvmError):
            state = read_network_state(run.network_state_file, current_qemu_run(run.state_file))
            found = state.link(member.nic) if state else None
            if found is not None and state is not None:
                link, link_error = found.state, found.error
                configured = state.guest_configured
    return MemberInfo(
        member.vm,
        member.nic,
        member.mac,
        member.address,
        running,
        link,
        link_error,
        configured,
    )


def list_networks(state_root: Path) -> list[NetworkInfo]:
    return [network_info(state_root, name) for name in network_names(state_root)]


def remove_network(state_root: Path, name: str) -> NetworkInfo:
    """Remove a network's folder (its addresses, its switch's files); refused while a
    member runs."""
    check_network_name(name)
    info = network_info(state_root, name)
    net = NetFiles(state_root, name)
    with network_lock(net):
        running = [m.vm for m in info.members if member_running(state_root, m.vm)]
        if running:
            raise HostError(
                f"network {name}: {', '.join(sorted(set(running)))} still run on it",
                hint=f"stop them first (qvm down {' '.join(sorted(set(running)))})",
            )
        stop_switch(net)
        for entry in os.listdir(net.path):
            if entry != "lock":
                os.unlink(net.file(entry))
        os.unlink(net.lock)  # held by this process only: flock needs no file name
    os.rmdir(net.path)
    return info


class NicNetwork(Record):
    """A NIC on a network, as ``status`` shows it."""

    nic: str
    network: str
    mac: str
    address: str  # with its prefix length: 10.70.211.2/24
    switch: str  # running, dead, stopped
    link: str | None = None  # the supervisor's word while the VM runs
    link_error: str | None = None
    guest_configured: bool | None = None

    def as_json(self) -> dict[str, Any]:
        return dict(self._asdict())


def vm_networks(run: RunDir) -> tuple[NicNetwork, ...]:
    """A VM's NICs on networks (``networks.json``), with the supervisor's word on each
    while it runs (``network-state.json``) and whether the network's switch runs."""
    nics = read_netnics(run.networks_file)
    if not nics:
        return ()
    state = read_network_state(run.network_state_file, current_qemu_run(run.state_file))
    rows = []
    for nic in nics:
        net = NetFiles(run.path.parent, nic.network)
        switch, _ = _switch_state(net, read_switch(net), state is not None)
        link = state.link(nic.nic) if state else None
        rows.append(
            NicNetwork(
                nic.nic,
                nic.network,
                nic.mac,
                f"{nic.address}/{nic.prefix}",
                switch,
                link.state if link else None,
                link.error if link else None,
                state.guest_configured if state else None,
            )
        )
    return tuple(rows)


def give_back_addresses(run: RunDir) -> None:
    """A stopped VM that will never run again (a throwaway destroyed, a VM removed)
    leaves the records of the networks its ``networks.json`` names: its addresses are
    free for others, and ``net list`` forgets it."""
    if not run.networks_file.exists():
        return
    for name in sorted({nic.network for nic in read_netnics(run.networks_file)}):
        net = NetFiles(run.path.parent, name)
        with network_lock(net):
            record = read_network(net)
            if record is not None:
                write_network(net, release(record, run.name))
