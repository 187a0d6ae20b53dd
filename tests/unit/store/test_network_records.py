"""Address allocation (pure: hypothesis drives it), the guest's setup script, and the
records of a network and of a VM's links."""

from __future__ import annotations

from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from qvm.errors import HostError, RecordError
from qvm.layout.netfiles import NetFiles
from qvm.store.guestnet import BEGIN, END, setup_script
from qvm.store.netlinks import NetNic, read_netnics, write_netnics
from qvm.store.networks import (
    AddressTaken,
    MacTaken,
    NetworkRecord,
    SubnetFull,
    allocate,
    read_network,
    write_network,
)

EMPTY = NetworkRecord("lab", "10.64.1.0/24", "derived")
joins = st.lists(st.tuples(st.sampled_from("abcdefgh"), st.sampled_from(["net0", "net1"])))


@given(joins)
def test_addresses_are_unique_in_the_subnet_and_stable(sequence: list[tuple[str, str]]) -> None:
    record = EMPTY
    first: dict[tuple[str, str], str] = {}
    for vm, nic in sequence:
        allocation = allocate(record, vm, nic, "52:54:00:00:00:01", None, frozenset())
        record = allocation.record
        first.setdefault((vm, nic), allocation.member.address)
        assert allocation.member.address == first[(vm, nic)]  # the same at every join
    addresses = [m.address for m in record.members]
    assert len(addresses) == len(set(addresses)) == len(first)
    assert all(
        a.startswith("10.64.1.") and a not in ("10.64.1.0", "10.64.1.255") for a in addresses
    )


def test_a_full_subnet_is_refused_saying_so() -> None:
    record = EMPTY._replace(subnet="10.64.1.0/30")  # two host addresses
    for vm in ("a", "b"):
        record = allocate(record, vm, "net0", "m", None, frozenset()).record
    with pytest.raises(SubnetFull, match=r"10.64.1.0/30 is full: its 2 addresses"):
        allocate(record, "c", "net0", "m-c", None, frozenset())
    assert allocate(record, "a", "net0", "m-a", None, frozenset()).member.address == "10.64.1.1"


def test_a_pinned_address_another_member_holds() -> None:
    record = allocate(EMPTY, "a", "net0", "m-a", None, frozenset()).record  # a: .1
    with pytest.raises(AddressTaken, match="is a's .net0., which runs"):
        allocate(record, "b", "net0", "m-b", "10.64.1.1", frozenset({"a"}))
    taken = allocate(record, "b", "net0", "m-b", "10.64.1.1", frozenset())  # a is stopped
    assert taken.member.address == "10.64.1.1" and taken.member.pinned
    again = allocate(taken.record, "a", "net0", "m-a", None, frozenset({"b"}))
    assert again.member.address == "10.64.1.2"
    assert again.note == "10.64.1.1 was taken by b's pinned address; a now has 10.64.1.2"
    assert [m.address for m in again.record.members] == ["10.64.1.1", "10.64.1.2"]
    with pytest.raises(HostError, match="not a host address"):
        allocate(record, "c", "net0", "m-c", "10.64.1.255", frozenset())


def test_the_records_read_back_and_a_bad_one_names_its_key(tmp_path: Path) -> None:
    net = NetFiles(tmp_path, "lab")
    Path(net.path).mkdir(parents=True)
    record = allocate(EMPTY, "a", "net0", "52:54:00:00:00:01", None, frozenset()).record
    write_network(net, record)
    assert read_network(net) == record
    Path(net.network_file).write_text(
        '{"name": "lab", "subnet": "1.2.3.0/24", "subnet_from": "derived"}'
    )
    with pytest.raises(RecordError, match="subnet: .* is not private"):
        read_network(net)
    nics = (NetNic("net0", "lab", "52:54:00:00:00:01", "10.64.1.1", 24, 0),)
    write_netnics(tmp_path / "networks.json", nics)
    assert read_netnics(tmp_path / "networks.json") == nics


def test_the_setup_script_finds_each_nic_by_mac_and_keeps_the_users_hosts_lines() -> None:
    nic = NetNic("net0", "lab", "52:54:00:00:00:01", "10.64.1.1", 24, 0)
    script = setup_script([nic], [("10.64.1.1", "a"), ("10.64.1.2", "b")])
    assert '[ "$a" = 52:54:00:00:00:01 ]' in script
    assert "ip addr add 10.64.1.1/24" in script
    assert f"sed '/^{BEGIN}$/,/^{END}$/d' /etc/hosts" in script
    assert "10.64.1.1 a\\n10.64.1.2 b\\n" in script
    with pytest.raises(ValueError, match="not a safe word"):
        setup_script([nic], [("10.64.1.1", "a; rm -rf /")])


def test_a_mac_a_running_member_has_is_refused() -> None:
    record = allocate(EMPTY, "a", "net0", "52:54:00:aa:bb:cc", None, frozenset()).record
    with pytest.raises(
        MacTaken, match="MAC 52:54:00:AA:BB:CC on network .* is a's .net0., which runs"
    ):
        allocate(record, "b", "net0", "52:54:00:AA:BB:CC", None, frozenset({"a"}))
    # a stopped: no frames to mix up; its own next start is refused instead
    assert allocate(record, "b", "net0", "52:54:00:aa:bb:cc", None, frozenset()).member
