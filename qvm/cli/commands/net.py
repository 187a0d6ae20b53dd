"""Private networks: qvm net list, qvm net rm."""

from __future__ import annotations

from typing import TYPE_CHECKING

from qvm.cli import resolve
from qvm.cli.output import emit_json, say, table
from qvm.cli.parsing.declare import AS_JSON, Argument, Commands

if TYPE_CHECKING:
    from qvm.ops.net import NetworkInfo

commands = Commands(help="List and remove the private networks VMs share ([[nic]] network).")

NETWORK = Argument(..., metavar="NETWORK", help="The network's name.")


@commands.command("list")
def list_cmd(as_json: bool = AS_JSON) -> None:
    """Every network: its switch (running, pid; dead: members' supervisors start it
    again), its subnet, and its members (VM, NIC id, MAC, address, link).

    JSON: schemas/net-list.json
    """
    from qvm.ops.net import list_networks

    networks = list_networks(resolve.state_root())
    if as_json:
        emit_json([n.as_json() for n in networks])
        return
    if not networks:
        say('no networks (a [[nic]] with network = "NAME" makes one at its VM\'s start)')
    for index, net in enumerate(networks):
        if index:
            say()
        say(f"{net.name}: subnet {net.subnet} ({_subnet_from(net)}), switch {_switch(net)}")
        rows = [
            [
                m.vm,
                m.nic,
                m.mac,
                m.address,
                _member_state(m.running, m.link, m.link_error, m.guest_configured),
            ]
            for m in net.members
        ]
        say(table(["VM", "NIC", "MAC", "ADDRESS", "STATE"], rows))


def _subnet_from(net: NetworkInfo) -> str:
    return "derived from its name" if net.subnet_from == "derived" else net.subnet_from


def _switch(net: NetworkInfo) -> str:
    restarts = f", restarted {net.switch_restarts}x" if net.switch_restarts else ""
    if net.switch == "running":
        return f"running, pid {net.switch_pid}{restarts}"
    if net.switch == "dead":
        return f"DEAD ({net.switch_problem}; its members' supervisors start it again){restarts}"
    return f"stopped (no member runs){restarts}"


def _member_state(
    running: bool, link: str | None, error: str | None, configured: bool | None
) -> str:
    if not running:
        return "stopped"
    if link == "down":
        return f"down: {error}"
    guest = "" if configured else ", guest not set up yet"
    return f"{link or 'joining'}{guest}"


@commands.command("rm")
def rm(network: str = NETWORK, as_json: bool = AS_JSON) -> None:
    """Remove a network's files (its members' addresses, its switch's folder); refused
    while a member runs. Members get new addresses at their next start.

    JSON: schemas/net-rm.json
    """
    from qvm.layout.netfiles import check_network_name
    from qvm.ops.net import remove_network

    info = remove_network(resolve.state_root(), check_network_name(network))
    if as_json:
        emit_json({"name": info.name, "removed": True, "members": len(info.members)})
        return
    say(f"{info.name}: removed (its {len(info.members)} member addresses are forgotten)")
