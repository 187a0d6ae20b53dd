"""Forwards with host port 0 are bound by QEMU itself and read back from ``info usernet``.

qvm used to probe a free port and hand it to QEMU: two ``up``s at once could be handed
one port between the probe and QEMU's bind. Now QEMU is asked for port 0 (its argv says
``:0-:``), the kernel picks, and the supervisor records what QEMU lists before ``up``
says ready; a restarted QEMU's new ports are recorded too, and ``port add`` reads its port
back the same way.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
from pathlib import Path
from typing import Any

import pytest
from framework.harness import QVM_BIN, Qvm
from framework.wait import wait_until

pytestmark = pytest.mark.integration

FORWARDS = '["tcp:0:22", "tcp:0:22", "udp:0:53", "tcp:0:7777"]'


def usernet_ports(qvm: Qvm, name: str) -> set[tuple[str, int]]:
    """(protocol, host port) of every forward QEMU itself lists."""
    reply = qvm.json("qmp", name, "human-monitor-command", "command-line=info usernet")
    ports = set()
    for line in str(reply).splitlines():
        words = line.split()
        if words and words[0].endswith("[HOST_FORWARD]"):
            ports.add((words[0].split("[")[0].lower(), int(words[3])))
    return ports


def recorded(forwards: list[dict[str, Any]]) -> set[tuple[str, int]]:
    return {(f["proto"], f["host_port"]) for f in forwards}


def accepts(port: int) -> bool:
    """QEMU's slirp accepts a connection on a forwarded port (whatever the guest does)."""
    with socket.create_connection(("127.0.0.1", port), timeout=10):
        return True


def qemu_argv(pid: int) -> str:
    return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode()


def test_two_ups_at_once_get_distinct_ports_that_qemu_bound(qvm: Qvm) -> None:
    names = ("pz1", "pz2")
    for name in names:
        qvm.guest_machine(
            name,
            machine_type="pc",
            memory="128M",
            extra=f'[[nic]]\nforwards = {FORWARDS}\n\n[supervisor]\nrestart = "on-failure"\n'
            "restart_delay = 0.1\n",
        )
    ups = [
        subprocess.Popen(
            [str(QVM_BIN), "up", name, "--json"],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            env=qvm.env(),
        )
        for name in names
    ]
    results = {}
    for name, up in zip(names, ups, strict=True):
        out, err = up.communicate(timeout=120)
        assert up.returncode == 0, err.decode()
        (results[name],) = json.loads(out)
    seen: list[tuple[str, int]] = []
    for name in names:
        forwards = results[name]["forwards"]
        assert [(f["proto"], f["guest_port"]) for f in forwards] == [
            ("tcp", 22),
            ("tcp", 22),
            ("udp", 53),
            ("tcp", 7777),
        ]
        # no probe: QEMU was asked for port 0, and the ports recorded are the ones it lists
        argv = qemu_argv(results[name]["pid"])
        assert argv.count(":0-:") == 4, argv
        assert recorded(forwards) == usernet_ports(qvm, name)
        assert all(f["host_port"] > 0 for f in forwards)
        assert all(accepts(f["host_port"]) for f in forwards if f["proto"] == "tcp")
        # every reader of the records says the same ports
        assert qvm.status(name)["forwards"] == forwards
        assert qvm.json("port", "list", name) == forwards
        seen += recorded(forwards)
    assert len(set(seen)) == len(seen) == 8

    # a restarted QEMU binds new ports: the supervisor records those, not the old ones
    first = results["pz1"]["pid"]
    os.kill(first, signal.SIGKILL)

    def restarted() -> dict[str, Any] | None:
        status = qvm.status("pz1")
        new = status["state"] == "running" and status["pid"] not in (None, first)
        return status if new and all(f["host_port"] for f in status["forwards"]) else None

    status = wait_until(restarted, 30, "a new QEMU with its ports recorded")
    assert recorded(status["forwards"]) == usernet_ports(qvm, "pz1")
    assert all(accepts(f["host_port"]) for f in status["forwards"] if f["proto"] == "tcp")

    # at run time, the same: hostfwd_add with port 0, the port read back
    port = qvm.json("port", "add", "pz2", "tcp:0:22")["host_port"]
    assert port > 0 and ("tcp", port) in usernet_ports(qvm, "pz2") and accepts(port)
    assert ("tcp", port) in recorded(qvm.json("port", "list", "pz2"))
    qvm("port", "del", "pz2", str(port))
    assert ("tcp", port) not in usernet_ports(qvm, "pz2")
    assert recorded(qvm.json("port", "list", "pz2")) == recorded(results["pz2"]["forwards"])
