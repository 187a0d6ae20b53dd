"""A [[nic]]'s network and address, network definition files, and the subnet arithmetic
(pure: hypothesis drives it)."""

from __future__ import annotations

import re
import textwrap
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from qvm.definition.load import load_machine
from qvm.definition.networks import load_network
from qvm.definition.subnets import (
    DERIVED_COUNT,
    DERIVED_FIRST,
    SubnetError,
    derived_subnet,
    ip_text,
    parse_ip,
    parse_subnet,
)
from qvm.errors import DefinitionError
from qvm.layout.netfiles import MAX_NETWORK_NAME, check_network_name, is_network_name

NAME = re.compile(r"[a-z]([a-z0-9-]{0,30}[a-z0-9])?")


@given(st.text(max_size=40))
def test_a_network_name_is_exactly_the_rule(text: str) -> None:
    assert is_network_name(text) == bool(NAME.fullmatch(text))


@given(st.from_regex(NAME, fullmatch=True))
def test_every_name_the_rule_allows_is_taken(name: str) -> None:
    assert len(name) <= MAX_NETWORK_NAME and check_network_name(name) == name


def machine_file(tmp_path: Path, nic: str) -> Path:
    path = tmp_path / "vm1.toml"
    path.write_text(textwrap.dedent(nic))
    return path


@pytest.mark.parametrize(
    "nic,key,problem",
    [
        ('network = "Lab_1"', "nic[0].network", "must be a network name"),
        ('network = "-x"', "nic[0].network", "must be a network name"),
        ('network = "a/../b"', "nic[0].network", "must be a network name"),
        ("network = 7", "nic[0].network", "must be a string"),
        ('address = "10.1.2.3"', "nic[0].address", "needs network"),
        ('network = "lab"\naddress = "10.1.2"', "nic[0].address", "not an IPv4 address"),
        ('network = "lab"\nforwards = ["tcp:2222:22"]', "nic[0].forwards", "user-mode"),
    ],
)
def test_a_bad_network_key_is_one_line_naming_file_and_key(
    tmp_path: Path, nic: str, key: str, problem: str
) -> None:
    path = machine_file(tmp_path, f"[[nic]]\n{nic}\n")
    with pytest.raises(DefinitionError) as caught:
        load_machine(path)
    (found,) = caught.value.problems
    assert (found.file, found.key) == (str(path), key) and problem in found.problem
    assert caught.value.exit_code == 2 and "\n" not in str(caught.value)


def test_a_network_nic_loads(tmp_path: Path) -> None:
    path = machine_file(tmp_path, '[[nic]]\nnetwork = "lab"\naddress = "10.9.9.9"\n')
    (nic,) = load_machine(path).nics
    assert (nic.network, nic.address, nic.forwards) == ("lab", "10.9.9.9", ())


def test_a_network_definition_beside_the_machines(tmp_path: Path) -> None:
    assert load_network(tmp_path, "lab").subnet is None  # none: derived
    (tmp_path / "networks").mkdir()
    (tmp_path / "networks" / "lab.toml").write_text('subnet = "192.168.50.0/24"\n')
    spec = load_network(tmp_path, "lab")
    assert (spec.subnet, spec.file) == ("192.168.50.0/24", tmp_path / "networks" / "lab.toml")
    (tmp_path / "networks" / "lab.toml").write_text('subnet = "8.8.8.0/24"\nsubnt = 1\n')
    with pytest.raises(DefinitionError) as caught:
        load_network(tmp_path, "lab")
    keys = [(p.key, p.problem) for p in caught.value.problems]
    assert keys[0][0] == "subnt" and keys[1] == (
        "subnet",
        "'8.8.8.0/24' is not private (10/8, 172.16/12 or 192.168/16)",
    )


@given(st.integers(0, 2**32 - 1))
def test_an_address_reads_back(value: int) -> None:
    assert parse_ip(ip_text(value)) == value


@given(st.text(max_size=20))
def test_parse_subnet_takes_private_subnets_or_says_why(text: str) -> None:
    try:
        subnet = parse_subnet(text)
    except SubnetError:
        return
    assert str(parse_subnet(str(subnet))) == str(subnet)
    assert len(subnet.hosts()) == subnet.size - 2 >= 2


@given(st.integers(8, 30), st.integers(0, 2**24 - 1))
def test_every_private_network_address_parses(prefix: int, bits: int) -> None:
    network = ((10 << 24) | bits) & ~((1 << (32 - prefix)) - 1) & 0xFFFFFFFF
    assert parse_subnet(f"{ip_text(network)}/{prefix}").network == network


@given(st.text(min_size=1, max_size=32), st.sets(st.integers(0, DERIVED_COUNT - 1), max_size=50))
def test_a_derived_subnet_is_stable_private_and_free(name: str, taken_slots: set[int]) -> None:
    taken = frozenset(DERIVED_FIRST + (slot << 8) for slot in taken_slots)
    subnet = derived_subnet(name, taken)
    assert subnet == derived_subnet(name, taken)  # stable
    assert subnet.network not in taken and subnet.prefix == 24
    assert parse_subnet(str(subnet)) == subnet
