"""Network members through a guest's life (issue 20): a reboot inside the guest, a clone
and a throwaway run from a snapshot. Two test guests on ``lab`` (``src``, ``peer``), booted
once; at most three VMs at a time. What is checked is the guests' own word, through the
agent: their boot id, the MAC and address of their interface, ``/etc/hosts``, and pings by
name; beside it what ``net list`` and ``status`` say.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from typing import Any

import pytest
from framework.harness import Qvm, need_test_guest, owned_qvm
from framework.jsonschema_lite import validate
from framework.wait import wait_until

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def lab() -> Iterator[Qvm]:
    need_test_guest()
    with owned_qvm() as qvm:
        for name in ("src", "peer"):
            qvm.guest_machine(name, max=1, memory="128M", extra='\n[[nic]]\nnetwork = "lab"\n')
        qvm("up", "src", "peer")
        for name in ("src", "peer"):
            qvm("wait", name, "--for", "agent", "--timeout", "120")
            wait_until(lambda n=name: configured(qvm, n), 60, f"{name}'s network set up")
        yield qvm


def configured(qvm: Qvm, name: str) -> bool:
    return all(n["guest_configured"] for n in qvm.status(name)["networks"])


def sh(qvm: Qvm, name: str, script: str, check: bool = True) -> str:
    return qvm("exec", name, "--", "sh", "-c", script, check=check).stdout


def ping(qvm: Qvm, name: str, target: str) -> bool:
    done = qvm("exec", name, "--", "ping", "-c", "1", "-W", "2", target, check=False)
    return done.returncode == 0


def members(qvm: Qvm) -> dict[str, dict[str, Any]]:
    listed = qvm.json("net", "list")
    validate(listed, "net-list.json")
    (lab,) = [n for n in listed if n["name"] == "lab"]
    return {m["vm"]: m for m in lab["members"]}


def guest_link(qvm: Qvm, name: str) -> tuple[str, list[str]]:
    """The guest's own word on eth0: its MAC and its IPv4 addresses (CIDR)."""
    mac = sh(qvm, name, "cat /sys/class/net/eth0/address").strip()
    lines = sh(qvm, name, "ip -o -4 addr show dev eth0").split("\n")
    return mac, [line.split()[3] for line in lines if " inet " in line]


def hosts_of(qvm: Qvm, name: str) -> str:
    return sh(qvm, name, "cat /etc/hosts")


def test_a_guest_rebooted_from_inside_is_set_up_again(lab: Qvm) -> None:
    before = sh(lab, "peer", "cat /proc/sys/kernel/random/boot_id").strip()
    address = members(lab)["peer"]["address"]
    # in the background: the agent's guest-exec must return before the guest goes
    sh(lab, "peer", "(sleep 1; reboot -f) >/dev/null 2>&1 </dev/null &")
    wait_until(lambda: not configured(lab, "peer"), 30, "status to say peer's setup is gone")
    wait_until(lambda: configured(lab, "peer"), 90, "peer's status to say set up again")
    assert sh(lab, "peer", "cat /proc/sys/kernel/random/boot_id").strip() != before
    # the guest's own word: its address back, the members' names, pings both ways
    assert guest_link(lab, "peer")[1] == [f"{address}/24"]
    assert f"{members(lab)['src']['address']} src" in hosts_of(lab, "peer")
    assert wait_until(lambda: ping(lab, "peer", "src"), 20, "peer to ping src by name")
    assert ping(lab, "src", "peer")
    assert lab.status("peer")["networks"][0]["guest_configured"]


def test_a_clone_and_a_run_from_a_snapshot_get_their_own_mac_and_address(lab: Qvm) -> None:
    lab("snapshot", "save", "src", "ready")
    lab("new", "c1", "--from", "src@ready")
    lab("up", "c1")
    lab("wait", "c1", "--for", "agent", "--timeout", "60")
    wait_until(lambda: configured(lab, "c1"), 60, "c1's network set up")
    listed = members(lab)
    source, clone = listed["src"], listed["c1"]
    assert clone["mac"] != source["mac"] and clone["address"] != source["address"], listed
    assert clone["running"] and source["running"]
    # the guests' own word: each has its own MAC and address only (the clone resumed the
    # source's memory, so it had the source's until qvm gave it its own)
    assert guest_link(lab, "c1") == (clone["mac"], [f"{clone['address']}/24"])
    assert guest_link(lab, "src") == (source["mac"], [f"{source['address']}/24"])
    assert f"{clone['address']} c1" in hosts_of(lab, "src")
    assert wait_until(lambda: ping(lab, "c1", "src"), 20, "c1 to ping src by name")
    assert ping(lab, "src", "c1") and ping(lab, "peer", "c1")

    # the source restored in place: its memory is the save's, from before c1 joined
    restored = lab("snapshot", "restore", "src", "ready").stdout
    assert "loaded in place" in restored, restored
    wait_until(lambda: f"{clone['address']} c1" in hosts_of(lab, "src"), 30, "c1 in src's hosts")
    wait_until(lambda: configured(lab, "src"), 30, "src's status to say set up")
    assert ping(lab, "src", "c1")
    lab("kill", "c1")

    # a throwaway from the same snapshot: a clone too, with a name of its own
    done = lab(
        "run", "src", "--from", "src@ready", "--json", "--",
        "sh", "-c", "cat /sys/class/net/eth0/address; ip -o -4 addr show dev eth0;"
        " ping -c 1 -W 2 src && ping -c 1 -W 2 peer",
        check=False,
    )  # fmt: skip
    result = json.loads(done.stdout)
    assert result["exit_code"] == 0, result
    mac, addresses = result["stdout"].split("\n")[:2]
    assert mac != source["mac"] and f" {source['address']}/" not in addresses, result
    assert mac.startswith("52:54:00:") and " inet " in addresses, result
    # destroyed, it gave its address back: only the VMs that remain are members
    assert sorted(members(lab)) == ["c1", "peer", "src"]
