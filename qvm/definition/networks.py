"""A NIC's ``network`` and ``address`` keys, and a network's own definition file.

A network needs no definition: its subnet is a stable /24 derived from its name
(``qvm.definition.subnets.derived_subnet``). A file ``networks/NAME.toml`` next to the
machine files that name it says otherwise::

    subnet = "192.168.50.0/24"
"""

from __future__ import annotations

from pathlib import Path

from qvm.base.record import Record
from qvm.definition.parsed import parse_toml
from qvm.definition.reader import Report, Table
from qvm.definition.subnets import SubnetError, parse_ip, parse_subnet
from qvm.errors import DefinitionError, Problem
from qvm.layout.netfiles import network_name_problem

NETWORKS_FOLDER = "networks"  # beside the machine files
NETWORK_KEYS = {
    "subnet": 'private IPv4 subnet like "192.168.50.0/24" (10/8, 172.16/12 or 192.168/16,'
    " /8 to /30) the members' addresses come from; default: a stable /24 in 10.64.0.0/10"
    " derived from the network's name",
    "description": "string; free text for people, ignored by qvm",
}
SUBNET_HINT = 'a private subnet like "192.168.50.0/24"'


def read_network_keys(nic: Table, has_forwards: bool) -> tuple[str | None, str | None]:
    """A [[nic]]'s network and address, each checked (problems go to the report)."""
    network = nic.string("network", None)
    if network is not None:
        problem = network_name_problem(network)
        if problem is not None:
            nic.fail("network", problem)
            network = None
        elif has_forwards:
            nic.fail(
                "forwards",
                "forwards need user-mode networking, not a network",
                "add a second [[nic]] without network for the forwards",
            )
    address = nic.string("address", None)
    if address is not None:
        if "network" not in nic.data:
            nic.fail("address", "needs network", 'add network = "NAME" to this [[nic]]')
            address = None
        elif network is not None:
            try:
                parse_ip(address)
            except SubnetError as error:
                nic.fail("address", str(error))
                address = None
    return network, address


class NetworkSpec(Record):
    name: str
    subnet: str | None = None  # None: derived from the name
    file: Path | None = None  # the definition that says so


def network_file(machine_dir: Path, name: str) -> Path:
    return machine_dir / NETWORKS_FOLDER / f"{name}.toml"


def load_network(machine_dir: Path, name: str) -> NetworkSpec:
    """The network ``name`` as its definition beside the machine files says, or its
    defaults when there is none. A broken definition: DefinitionError naming the key."""
    path = network_file(machine_dir, name)
    try:
        text = path.read_text()
    except FileNotFoundError:
        return NetworkSpec(name)
    except (OSError, UnicodeDecodeError) as error:
        raise DefinitionError([Problem(str(path), "", f"cannot read: {error}")]) from None
    try:
        data = parse_toml(text, str(path))
    except ValueError as error:
        raise DefinitionError([Problem(str(path), "", f"invalid TOML: {error}")]) from None
    report = Report(str(path))
    table = Table(data, "", report)
    table.reject_unknown(tuple(NETWORK_KEYS))
    table.string("description", None, allow_empty=True)
    subnet = table.string("subnet", None)
    if subnet is not None:
        try:
            subnet = str(parse_subnet(subnet))
        except SubnetError as error:
            table.fail("subnet", str(error), SUBNET_HINT)
    if report.problems:
        raise DefinitionError(report.problems)
    return NetworkSpec(name, subnet, path)
