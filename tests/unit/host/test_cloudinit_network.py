"""A cloud image on private networks: the seed's network-config (version 2, every NIC by
its MAC) and vendor-data (the members in /etc/hosts at every boot), the instance-id that
changes with an address and not with a member, and what ``write_seed`` keeps."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path
from typing import Any

import yaml  # the parser cloud-init itself uses
from hypothesis import given
from hypothesis import strategies as st

from qvm.definition.load import load_machine
from qvm.definition.subnets import ip_text
from qvm.host.cloudinit import (
    SeedInterface,
    SeedPlan,
    instance_id,
    meta_data_text,
    network_config_text,
    read_iso,
    user_data_text,
    vendor_data_text,
    write_seed,
)
from qvm.layout.rundir import RunDir
from qvm.store.guestnet import BEGIN, END, hosts_script

KEY = "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIAABAgMEBQYHCAkKCwwNDg8QERITFBUWFxgZGhscHR4f me@h"

USER_NIC = SeedInterface("net0", "52:54:00:AA:00:01", None)
LAB_NIC = SeedInterface("net1", "52:54:00:aa:00:02", "10.70.211.1/24")


def plan(**fields: Any) -> SeedPlan:
    base = SeedPlan(
        user="qvm",
        keys=(KEY,),
        identities=(),
        generate_key=False,
        user_data_file=None,
        packages=(),
        runcmd=(),
    )
    return base._replace(**fields)


def test_network_config_is_exact() -> None:
    assert json.loads(network_config_text((USER_NIC, LAB_NIC))) == {
        "version": 2,
        "ethernets": {
            "net0": {
                "match": {"macaddress": "52:54:00:aa:00:01"},
                "set-name": "net0",
                "dhcp4": True,
            },
            "net1": {
                "match": {"macaddress": "52:54:00:aa:00:02"},
                "set-name": "net1",
                "dhcp4": False,
                "addresses": ["10.70.211.1/24"],
            },
        },
    }
    # an id that cannot name an interface: matched by MAC, its name left to the guest
    long = SeedInterface("a-very-long-nic-id", "52:54:00:aa:00:03", "10.70.211.2/24")
    entry = json.loads(network_config_text((long,)))["ethernets"]["a-very-long-nic-id"]
    assert "set-name" not in entry and entry["addresses"] == ["10.70.211.2/24"]
    # no NIC on a network: no network-config, cloud-init's default (DHCP) as before
    assert network_config_text((USER_NIC,)) == ""
    assert network_config_text(()) == ""


macs = st.lists(st.integers(0, 2**24 - 1), min_size=1, max_size=8, unique=True)


@given(macs=macs, static=st.lists(st.booleans(), min_size=8, max_size=8), net=st.integers())
def test_any_set_of_nics_is_a_document_cloud_init_reads(
    macs: list[int], static: list[bool], net: int
) -> None:
    """JSON (as written) and YAML (as cloud-init parses it) read the same; version 2;
    each NIC once, matched by its MAC, either DHCP or its one static address."""
    subnet = 0x0A400000 + (net % 64) * 256
    interfaces = tuple(
        SeedInterface(
            f"net{index}",
            "52:54:00:" + ":".join(f"{(mac >> s) & 0xFF:02X}" for s in (16, 8, 0)),
            f"{ip_text(subnet + index + 1)}/24" if static[index] else None,
        )
        for index, mac in enumerate(macs)
    )
    text = network_config_text(interfaces)
    if not any(static[: len(macs)]):
        assert text == ""
        return
    document = json.loads(text)
    assert yaml.safe_load(text) == document
    assert set(document) == {"version", "ethernets"} and document["version"] == 2
    ethernets = document["ethernets"]
    assert list(ethernets) == [i.id for i in interfaces]
    for interface in interfaces:
        entry = ethernets[interface.id]
        assert entry["match"] == {"macaddress": interface.mac.lower()}
        assert entry["set-name"] == interface.id  # the guest names it as qvm does
        if interface.address is None:
            assert entry == {"match": entry["match"], "set-name": interface.id, "dhcp4": True}
        else:
            assert entry["addresses"] == [interface.address] and entry["dhcp4"] is False


names = st.from_regex(r"[a-z][a-z0-9-]{0,20}", fullmatch=True)
members = st.dictionaries(names, st.integers(1, 254), min_size=1, max_size=12)


@given(members=members)
def test_the_hosts_command_survives_yaml_exactly(members: dict[str, int]) -> None:
    hosts = tuple((f"10.70.211.{host}", name) for name, host in sorted(members.items()))
    document = yaml.safe_load(vendor_data_text(plan(hosts=hosts)))
    assert document == {"bootcmd": [["/bin/sh", "-c", hosts_script(hosts)]]}


def test_the_hosts_command_rewrites_only_its_own_lines(tmp_path: Path) -> None:
    """Run as the guest's sh runs it (on a copy of /etc/hosts): the rest of the file is
    kept, and a second run with other members leaves one block, the new one."""
    hosts_file = tmp_path / "hosts"
    hosts_file.write_text("127.0.0.1 localhost\n127.0.1.1 node1\n")

    def run(hosts: tuple[tuple[str, str], ...]) -> str:
        command = yaml.safe_load(vendor_data_text(plan(hosts=hosts)))["bootcmd"][0]
        script = command[2].replace("/etc/hosts", str(hosts_file))
        subprocess.run([command[0], "-c", script], check=True)
        return hosts_file.read_text()

    run((("10.0.0.1", "node1"), ("10.0.0.2", "node2")))
    assert run((("10.0.0.1", "node1"), ("10.0.0.3", "node3"))) == (
        f"127.0.0.1 localhost\n127.0.1.1 node1\n{BEGIN}\n10.0.0.1 node1\n10.0.0.3 node3\n{END}\n"
    )


def test_on_a_network_cloud_init_keeps_etc_hosts_but_its_own_line() -> None:
    """``manage_etc_hosts: true`` would rewrite the file after the bootcmd each boot."""
    assert yaml.safe_load(user_data_text(plan()))["manage_etc_hosts"] is True
    on_lab = plan(hosts=(("10.0.0.1", "vm1"),))
    assert yaml.safe_load(user_data_text(on_lab))["manage_etc_hosts"] == "localhost"


def test_instance_id_follows_the_network_config_and_is_unchanged_without_one() -> None:
    # a VM without networks keeps the instance-id it had (no re-run of cloud-init)
    assert meta_data_text("vm1", "ud") == f"instance-id: {instance_id('vm1', 'ud')}\n" + (
        "local-hostname: vm1\n"
    )
    assert instance_id("vm1", "ud", "") == instance_id("vm1", "ud")
    one = network_config_text((USER_NIC, LAB_NIC))
    other = network_config_text((USER_NIC, LAB_NIC._replace(address="10.70.211.9/24")))
    assert (
        len(
            {instance_id("vm1", "ud"), instance_id("vm1", "ud", one)}
            | {instance_id("vm1", "ud", other)}
        )
        == 3
    )
    # a clone is another name: an instance of its own, whatever the config
    assert instance_id("vm2", "ud", one) != instance_id("vm1", "ud", one)


def seed_files(run: RunDir) -> dict[str, str]:
    return {name: data.decode() for name, data in read_iso(run.seed_image)[1].items()}


def test_the_seed_changes_instance_with_an_address_not_with_a_member(tmp_path: Path) -> None:
    (tmp_path / "vm1.toml").write_text("[cloud_init]\n")
    vm = load_machine(tmp_path / "vm1.toml")
    run = RunDir(tmp_path / "run")
    run.path.mkdir()
    hosts = (("10.70.211.1", "vm1"), ("10.70.211.2", "vm2"))
    first = plan(interfaces=(USER_NIC, LAB_NIC), hosts=hosts)
    assert write_seed(vm, first, run) is True
    files = seed_files(run)
    assert sorted(files) == ["meta-data", "network-config", "user-data", "vendor-data"]
    assert files["network-config"] == network_config_text((USER_NIC, LAB_NIC))
    assert files["vendor-data"] == vendor_data_text(first)
    assert run.network_config.read_text() == files["network-config"]
    ident = files["meta-data"]
    assert write_seed(vm, first, run) is False  # the same: the seed is kept

    # a member joined: the next boot writes it into /etc/hosts; the same instance
    run.known_hosts.write_text("host key\n")
    joined = first._replace(hosts=(*hosts, ("10.70.211.3", "vm3")))
    assert write_seed(vm, joined, run) is True
    assert seed_files(run)["meta-data"] == ident and run.known_hosts.exists()
    assert "10.70.211.3 vm3" in seed_files(run)["vendor-data"]

    # its address changed: a new instance, so that cloud-init applies it (new host keys)
    moved = joined._replace(interfaces=(USER_NIC, LAB_NIC._replace(address="10.70.211.4/24")))
    assert write_seed(vm, moved, run) is True
    assert seed_files(run)["meta-data"] != ident and not run.known_hosts.exists()

    # off the network: no network-config, in the seed or the run dir
    assert write_seed(vm, plan(), run) is True
    assert sorted(seed_files(run)) == ["meta-data", "user-data"]
    assert not run.network_config.exists() and not run.vendor_data.exists()
