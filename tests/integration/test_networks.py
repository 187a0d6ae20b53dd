"""Private networks on real QEMU (issue 20): three test guests booted once, node1 and
node2 on network ``lab``, node3 on ``other`` (whose definition file gives it a subnet,
and node3 a pinned address). What is checked is the guests' own word: ``ping`` by name
from inside, through the agent; and for the isolation, node3 given an address in lab's
subnet on its ``other`` NIC, so that only the switches keep it from lab (routing would
not).

Faults on the same guests: the switch killed (with the members' supervisors frozen, so
that ``net list`` and ``status`` can be seen saying so before they act), a switch that
cannot be started again (the members name the NICs that are down, and rejoin once it
can), and a NIC added to ``lab`` at run time.
"""

from __future__ import annotations

import os
import signal
from collections.abc import Iterator
from typing import Any

import pytest
from framework.harness import GUEST_DIR, Qvm, owned_qvm
from framework.jsonschema_lite import validate
from framework.wait import wait_until

from qvm.definition.subnets import derived_subnet, ip_text

pytestmark = pytest.mark.integration

LAB = derived_subnet("lab")  # no other network exists in the state dir when lab is made
INTRUDER = f"{ip_text(LAB.network + 50)}/24"  # node3's, by hand, on its NIC on other
OTHER = "192.168.77.0/24"
OTHER_ADDRESS = "192.168.77.50"


def node(qvm: Qvm, name: str, network: str, extra: str = "") -> None:
    qvm.guest_machine(
        name,
        max=1,
        memory="128M",
        extra=f'\n[[nic]]\nnetwork = "{network}"\n{extra}',
    )


@pytest.fixture(scope="module")
def cluster() -> Iterator[Qvm]:
    if not (GUEST_DIR / "vmlinuz").exists():
        pytest.fail(f"no test guest in {GUEST_DIR} (run scripts/build-test-guest)")
    with owned_qvm() as qvm:
        node(qvm, "node1", "lab")
        node(qvm, "node2", "lab")
        node(qvm, "node3", "other", f'address = "{OTHER_ADDRESS}"')
        (qvm.machines_dir / "networks").mkdir()
        (qvm.machines_dir / "networks" / "other.toml").write_text(f'subnet = "{OTHER}"\n')
        qvm("up", "node1", "node2", "node3")
        for name in ("node1", "node2", "node3"):
            qvm("wait", name, "--for", "agent", "--timeout", "120")
        for name in ("node1", "node2", "node3"):
            wait_until(lambda n=name: guest_ready(qvm, n), 60, f"{name}'s network set up")
        yield qvm


def guest_ready(qvm: Qvm, name: str) -> bool:
    return all(n["guest_configured"] for n in qvm.status(name)["networks"])


def ping(qvm: Qvm, name: str, target: str, count: int = 1) -> bool:
    done = qvm("exec", name, "--", "ping", "-c", str(count), "-W", "2", target, check=False)
    return done.returncode == 0


def networks(qvm: Qvm) -> dict[str, Any]:
    listed = qvm.json("net", "list")
    validate(listed, "net-list.json")
    return {n["name"]: n for n in listed}


def address_of(qvm: Qvm, vm: str) -> str:
    return str(qvm.status(vm)["networks"][0]["address"].split("/")[0])


def test_members_ping_each_other_by_name(cluster: Qvm) -> None:
    assert wait_until(lambda: ping(cluster, "node1", "node2"), 20, "node1 to ping node2")
    assert ping(cluster, "node2", "node1")
    hosts = cluster("exec", "node1", "--", "cat", "/etc/hosts").stdout
    assert f"{address_of(cluster, 'node2')} node2" in hosts


def test_other_networks_frames_never_arrive(cluster: Qvm) -> None:
    hosts = cluster("exec", "node3", "--", "cat", "/etc/hosts").stdout
    assert "node1" not in hosts and f"{OTHER_ADDRESS} node3" in hosts
    assert not ping(cluster, "node3", "node1")  # no such name there
    # node3 on lab's subnet by hand, on its NIC on other: its ARP for node1 reaches
    # other's switch only, and node1's for it lab's only
    cluster("exec", "node3", "--", "ip", "addr", "add", INTRUDER, "dev", "eth0")
    try:
        assert not ping(cluster, "node3", address_of(cluster, "node1"), count=2)
        assert not ping(cluster, "node1", INTRUDER.split("/")[0], count=2)
    finally:
        cluster("exec", "node3", "--", "ip", "addr", "del", INTRUDER, "dev", "eth0")


def test_net_list_and_status_say_it(cluster: Qvm) -> None:
    listed = networks(cluster)
    lab = listed["lab"]
    assert (lab["subnet"], lab["subnet_from"], lab["switch"]["state"]) == (
        str(LAB),
        "derived",
        "running",
    )
    assert lab["switch"]["pid"] > 1
    assert [(m["vm"], m["running"], m["link"]) for m in lab["members"]] == [
        ("node1", True, "joined"),
        ("node2", True, "joined"),
    ]
    other = listed["other"]
    assert other["subnet"] == OTHER and other["subnet_from"].endswith("networks/other.toml")
    assert [m["address"] for m in other["members"]] == [OTHER_ADDRESS]
    status = cluster.status("node1")
    validate(status, "status.json")
    (nic,) = status["networks"]
    assert (nic["network"], nic["switch"], nic["link"]) == ("lab", "running", "joined")
    text = cluster("status", "node1").stdout
    assert f"network     lab {nic['address']} (net0" in text


def supervisors(qvm: Qvm, *names: str) -> list[int]:
    return [int(qvm.status(name)["supervisor_pid"]) for name in names]


def test_a_killed_switch_is_seen_restarted_and_rejoined(cluster: Qvm) -> None:
    frozen = supervisors(cluster, "node1", "node2")
    switch = networks(cluster)["lab"]["switch"]["pid"]
    for pid in frozen:
        os.kill(pid, signal.SIGSTOP)
    try:
        os.kill(switch, signal.SIGKILL)
        lab = wait_until(
            lambda: (n := networks(cluster)["lab"])["switch"]["state"] == "dead" and n,
            10,
            "net list to say the switch is dead",
        )
        assert "no longer running" in lab["switch"]["problem"]
        assert "DEAD" in cluster("net", "list").stdout
    finally:
        for pid in frozen:
            os.kill(pid, signal.SIGCONT)
    lab = wait_until(
        lambda: (
            (n := networks(cluster)["lab"])["switch"]["state"] == "running"
            and all(m["link"] == "rejoined" for m in n["members"])
            and n
        ),
        20,
        "the members to restart the switch and rejoin it",
    )
    assert lab["switch"]["restarts"] == 1 and lab["switch"]["pid"] != switch
    assert wait_until(lambda: ping(cluster, "node1", "node2"), 20, "node1 to ping node2 again")
    (nic,) = cluster.status("node2")["networks"]
    assert (nic["switch"], nic["link"]) == ("running", "rejoined")


def test_members_that_cannot_rejoin_are_named_until_they_can(cluster: Qvm) -> None:
    lab_dir = cluster.state_dir / "_networks" / "lab"
    switch = networks(cluster)["lab"]["switch"]["pid"]
    frozen = supervisors(cluster, "node1", "node2")
    for pid in frozen:
        os.kill(pid, signal.SIGSTOP)
    try:
        os.kill(switch, signal.SIGKILL)
        wait_until(lambda: networks(cluster)["lab"]["switch"]["state"] == "dead", 10, "dead")
        (lab_dir / "mgmt.sock").unlink(missing_ok=True)
        (lab_dir / "mgmt.sock").mkdir()  # in the way of the switch's management socket
    finally:
        for pid in frozen:
            os.kill(pid, signal.SIGCONT)
    try:
        wait_until(
            lambda: all(m["link"] == "down" for m in networks(cluster)["lab"]["members"]),
            20,
            "the members to say their links are down",
        )
        (nic,) = cluster.status("node1")["networks"]
        assert nic["link"] == "down" and "mgmt.sock" in nic["link_error"]
        assert "link DOWN" in cluster("status", "node1").stdout
    finally:
        (lab_dir / "mgmt.sock").rmdir()
    wait_until(
        lambda: all(m["link"] == "rejoined" for m in networks(cluster)["lab"]["members"]),
        20,
        "the members to rejoin once the switch can start",
    )
    assert wait_until(lambda: ping(cluster, "node2", "node1"), 20, "node2 to ping node1 again")


def test_a_nic_added_live_joins_lab(cluster: Qvm) -> None:
    added = cluster.json("nic", "add", "node3", "--network", "lab")
    validate(added, "nic-add.json")
    assert added["network"]["network"] == "lab"
    address = added["network"]["address"].split("/")[0]
    assert wait_until(lambda: ping(cluster, "node3", "node1"), 30, "node3 to ping node1 on lab")
    assert wait_until(lambda: ping(cluster, "node1", "node3"), 30, "node1 to ping node3")
    shown = cluster("exec", "node3", "--", "ip", "-o", "addr").stdout
    assert f"{address}/" in shown
    lab = networks(cluster)["lab"]
    assert ("node3", added["nic"]["id"]) in [(m["vm"], m["nic"]) for m in lab["members"]]


def test_the_last_member_to_stop_stops_the_switch(cluster: Qvm) -> None:
    cluster("down", "node3", "--force")
    wait_until(
        lambda: networks(cluster)["other"]["switch"]["state"] == "stopped",
        10,
        "other's switch to stop with its last member",
    )
    assert networks(cluster)["lab"]["switch"]["state"] == "running"  # node1, node2 run on
    assert cluster("net", "rm", "lab", check=False).returncode == 1
    cluster("kill", "node1")
    cluster("kill", "node2")
    wait_until(
        lambda: networks(cluster)["lab"]["switch"]["state"] == "stopped", 10, "lab's switch to stop"
    )
    removed = cluster.json("net", "rm", "lab")
    validate(removed, "net-rm.json")
    assert "lab" not in networks(cluster)
