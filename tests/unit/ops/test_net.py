"""Joining networks at start (qvm.ops.net.join_networks) with the switch left out: the
records it writes, and the faults it refuses with one line naming the file and key."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from qvm.definition.load import load_machine
from qvm.definition.schema import Machine
from qvm.errors import HostError
from qvm.layout.rundir import RunDir
from qvm.ops import net
from qvm.ops.files import remove
from qvm.store.networks import SwitchRecord


@pytest.fixture(autouse=True)
def no_switch(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(net, "ensure_switch", lambda n: (SwitchRecord(2, None, 0.0), False))


def machine(tmp_path: Path, name: str, nic: str = "") -> Machine:
    path = tmp_path / "machines" / f"{name}.toml"
    path.parent.mkdir(exist_ok=True)
    path.write_text(f'[[nic]]\nnetwork = "lab"\n{nic}\n')
    return load_machine(path)


def join(tmp_path: Path, vm: Machine) -> net.Joined:
    with net.join_networks(vm, RunDir(tmp_path / "state" / vm.name)) as joined:
        return joined


def test_a_join_writes_the_vms_nics_and_keeps_the_address(tmp_path: Path) -> None:
    (tmp_path / "machines" / "networks").mkdir(parents=True)
    (tmp_path / "machines" / "networks" / "lab.toml").write_text('subnet = "10.5.0.0/16"\n')
    first = join(tmp_path, machine(tmp_path, "a"))
    assert [(n.nic, n.address, n.prefix, n.hub) for n in first.nics] == [
        ("net0", "10.5.0.1", 16, 0)
    ]
    assert join(tmp_path, machine(tmp_path, "b")).nics[0].address == "10.5.0.2"
    assert join(tmp_path, machine(tmp_path, "a")).nics == first.nics
    written = json.loads((tmp_path / "state" / "a" / "networks.json").read_text())
    assert written["nics"][0]["address"] == "10.5.0.1"


def test_a_full_subnet_names_the_file_and_key(tmp_path: Path) -> None:
    (tmp_path / "machines" / "networks").mkdir(parents=True)
    (tmp_path / "machines" / "networks" / "lab.toml").write_text('subnet = "10.5.0.0/30"\n')
    join(tmp_path, machine(tmp_path, "a"))
    join(tmp_path, machine(tmp_path, "b"))
    c = machine(tmp_path, "c")
    with pytest.raises(HostError) as caught:
        join(tmp_path, c)
    assert (caught.value.file, caught.value.key) == (str(c.path), "nic[0].network")
    assert "10.5.0.0/30 is full" in str(caught.value) and "hint:" in str(caught.value)


def test_an_address_a_running_member_holds(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    join(tmp_path, machine(tmp_path, "a"))  # a: the first address of lab's derived /24
    taken = net.read_network(net.NetFiles(tmp_path / "state", "lab")).members[0].address
    b = machine(tmp_path, "b", f'address = "{taken}"')
    monkeypatch.setattr(net, "member_running", lambda root, vm: vm == "a")
    with pytest.raises(HostError) as caught:
        join(tmp_path, b)
    assert (caught.value.file, caught.value.key) == (str(b.path), "nic[0].address")
    assert f"address {taken} on network lab is a's (net0), which runs" in str(caught.value)
    monkeypatch.setattr(net, "member_running", lambda root, vm: False)
    assert join(tmp_path, b).nics[0].address == taken  # a stopped: b takes it
    moved = join(tmp_path, machine(tmp_path, "a"))
    assert moved.nics[0].address != taken
    assert moved.notes == (
        f"network lab: {taken} was taken by b's pinned address; a now has {moved.nics[0].address}",
    )


def test_members_are_listed_by_name_whoever_joined_first(tmp_path: Path) -> None:
    join(tmp_path, machine(tmp_path, "b"))
    join(tmp_path, machine(tmp_path, "a"))
    info = net.network_info(tmp_path / "state", "lab")
    assert [m.vm for m in info.members] == ["a", "b"]


def test_a_removed_member_gives_its_address_back(tmp_path: Path) -> None:
    join(tmp_path, machine(tmp_path, "a"))
    join(tmp_path, machine(tmp_path, "b"))
    (tmp_path / "state").chmod(0o700)
    for run in ("a", "b"):
        (tmp_path / "state" / run).chmod(0o700)
    remove(RunDir(tmp_path / "state" / "a"), purge=False)
    info = net.network_info(tmp_path / "state", "lab")
    assert [m.vm for m in info.members] == ["b"]


def test_a_mac_a_running_member_has_names_the_key(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    join(tmp_path, machine(tmp_path, "a", 'mac = "52:54:00:12:34:56"'))
    b = machine(tmp_path, "b", 'mac = "52:54:00:12:34:56"')
    monkeypatch.setattr(net, "member_running", lambda root, vm: vm == "a")
    with pytest.raises(HostError) as caught:
        join(tmp_path, b)
    assert (caught.value.file, caught.value.key) == (str(b.path), "nic[0].mac")
    assert "is a's (net0), which runs" in str(caught.value)
