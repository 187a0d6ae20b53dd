"""Host port 0 is bound by QEMU and read back from HMP ``info usernet``: the parse, the
matching of the listed ports to qvm's forwards, and the supervisor's record of them."""

from __future__ import annotations

import json
import os
import socket
from pathlib import Path

import pytest
from framework.fake_qmp import state_json

from qvm.base.jsonfile import write_json_atomic
from qvm.base.proc import process_start_time
from qvm.host.usernet import BoundForward, bind_ports, parse_usernet, unbound
from qvm.layout.rundir import RunDir
from qvm.store.forwards import read_forwards
from qvm.store.launch import Forward, LaunchRecord, write_launch
from qvm.supervisor.spawn import _hmp, forwards_recorder
from qvm.supervisor.wire import LineReader

# QEMU 7.2.22's reply, as `human-monitor-command` returned it: two netdevs (net0 with a
# fixed and two port-0 forwards to guest port 22 and a UDP one; nic1 on 0.0.0.0, shown
# as "*"), newest first within each
USERNET_7_2 = (
    "Hub -1 (net0):\r\n"
    "  Protocol[State]    FD  Source Address  Port   Dest. Address  Port RecvQ SendQ\r\n"
    "  TCP[HOST_FORWARD]  12       127.0.0.1 43927       10.0.2.15    22     0     0\r\n"
    "  TCP[HOST_FORWARD]  11       127.0.0.1 41753       10.0.2.15    22     0     0\r\n"
    "  TCP[HOST_FORWARD]   8       127.0.0.1  5555       10.0.2.15    22     0     0\r\n"
    "  UDP[HOST_FORWARD]   9       127.0.0.1 47816       10.0.2.15    53     0     0\r\n"
    "Hub -1 (nic1):\r\n"
    "  Protocol[State]    FD  Source Address  Port   Dest. Address  Port RecvQ SendQ\r\n"
    "  TCP[HOST_FORWARD]  13               * 38503       10.0.2.15    80     0     0\r\n"
    "  TCP[ESTABLISHED]   21       127.0.0.1 51234       10.0.2.15    80     0     0\r\n"
)


def fwd(nic: str, proto: str, port: int, guest: int, addr: str = "127.0.0.1") -> Forward:
    return Forward(nic=nic, proto=proto, host_addr=addr, host_port=port, guest_port=guest)


def test_parse_lists_every_forward_of_every_netdev() -> None:
    assert parse_usernet(USERNET_7_2) == (
        BoundForward("net0", "tcp", "127.0.0.1", 43927, 22),
        BoundForward("net0", "tcp", "127.0.0.1", 41753, 22),
        BoundForward("net0", "tcp", "127.0.0.1", 5555, 22),
        BoundForward("net0", "udp", "127.0.0.1", 47816, 53),
        BoundForward("nic1", "tcp", "0.0.0.0", 38503, 80),  # not the connection below it
    )


def test_parse_of_nothing_or_of_an_error_lists_nothing() -> None:
    assert parse_usernet("") == ()
    assert parse_usernet("unknown command: 'info usernet'\r\n") == ()
    # a forward line before any netdev header belongs to no netdev qvm knows
    assert parse_usernet("  TCP[HOST_FORWARD] 8 127.0.0.1 41753 10.0.2.15 22 0 0\n") == ()


def test_boot_forwards_get_the_ports_qemu_bound() -> None:
    """Fixed and port-0 forwards to the same guest port: the fixed port is never handed
    to a port-0 forward, and the two port-0 forwards get distinct ports."""
    asked = (
        fwd("net0", "tcp", 0, 22),
        fwd("net0", "tcp", 0, 22),
        fwd("net0", "tcp", 5555, 22),
        fwd("net0", "udp", 0, 53),
        fwd("nic1", "tcp", 0, 80, addr="0.0.0.0"),
    )
    bound = bind_ports(asked, parse_usernet(USERNET_7_2))
    assert bound == (
        fwd("net0", "tcp", 41753, 22),  # the oldest listed: the first forward
        fwd("net0", "tcp", 43927, 22),
        fwd("net0", "tcp", 5555, 22),
        fwd("net0", "udp", 47816, 53),
        fwd("nic1", "tcp", 38503, 80, addr="0.0.0.0"),
    )
    assert unbound(bound) == ()


def test_a_forward_added_at_run_time_gets_the_new_port_not_a_known_one() -> None:
    known = (fwd("net0", "tcp", 41753, 22), fwd("net0", "tcp", 5555, 22))
    listed = parse_usernet(USERNET_7_2)
    (added,) = bind_ports([fwd("net0", "tcp", 0, 22)], listed, known)
    assert added.host_port == 43927
    # the same netdev, protocol and guest port on another netdev is not a match
    (other,) = bind_ports([fwd("nic1", "tcp", 0, 22)], listed, known)
    assert other.host_port == 0 and unbound([other]) == (other,)


def test_a_forward_qemu_does_not_list_keeps_port_zero() -> None:
    asked = [fwd("net0", "udp", 0, 53), fwd("net0", "udp", 0, 53), fwd("net0", "tcp", 0, 23)]
    bound = bind_ports(asked, parse_usernet(USERNET_7_2))
    assert [f.host_port for f in bound] == [47816, 0, 0]


# --- the supervisor's side --------------------------------------------------------------------


def test_hmp_on_the_probe_connection_skips_events() -> None:
    ours, qemu = socket.socketpair()
    ours.settimeout(10)
    lines = LineReader(ours)
    with ours, qemu:
        qemu.sendall(
            b'{"event": "NIC_RX_FILTER_CHANGED", "data": {}}\n'
            + json.dumps({"return": USERNET_7_2}).encode()
            + b"\n"
        )
        assert _hmp(ours, lines, "info usernet") == USERNET_7_2
        request = json.loads(qemu.recv(4096))
        assert request == {
            "execute": "human-monitor-command",
            "arguments": {"command-line": "info usernet"},
        }
        qemu.sendall(b'{"error": {"class": "GenericError", "desc": "no"}}\nnot json\n')
        assert _hmp(ours, lines, "info usernet") is None
        assert _hmp(ours, lines, "info usernet") is None


def test_the_supervisor_records_the_bound_ports_for_its_qemu_run(
    tmp_path: Path, capfd: pytest.CaptureFixture[str]
) -> None:
    """`status`, `port list`, `ssh` and `up` read forwards.json: the real ports, for the
    QEMU run it is stamped with (here this process stands in for QEMU)."""
    run = RunDir(tmp_path / "vm1")
    run.path.mkdir()
    asked = (fwd("net0", "tcp", 0, 22), fwd("net0", "tcp", 5555, 22), fwd("net0", "tcp", 0, 99))
    launch = LaunchRecord.from_json(
        {"name": "vm1", "argv": ["qemu"], "forwards": [f.to_json() for f in asked]}, "test"
    )
    write_launch(run.launch_file, launch)
    pid = os.getpid()
    write_json_atomic(run.state_file, state_json(pid, process_start_time(pid)))
    assert [f.host_port for f in read_forwards(run)] == [0, 5555, 0]  # before the read-back
    forwards_recorder(str(run.path), launch, pid)(USERNET_7_2)
    assert [f.host_port for f in read_forwards(run)] == [41753, 5555, 0]
    assert (
        "tcp:127.0.0.1:0:99 (net0): QEMU did not list the port it bound" in capfd.readouterr().err
    )
    # another QEMU run (a restart) is not described by this one's ports
    write_json_atomic(run.state_file, state_json(pid, 1))
    assert [f.host_port for f in read_forwards(run)] == [0, 5555, 0]
