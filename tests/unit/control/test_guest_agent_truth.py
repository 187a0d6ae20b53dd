"""The pure parts of the guest agent's word (qvm.control.guest_agent_facts, cpu_online's
agent steps, memory_blocks), the DIMM block-size check, CPU% over a real interval, and the
supervisor's guest-shutdown exchange against a fake agent on a real unix socket."""

from __future__ import annotations

import json
import socket
import threading
import time
from pathlib import Path
from typing import Any

import pytest
from framework.fake_qmp import FakeQmp

from qvm.control import cpu_online, memory_blocks
from qvm.control.cpu_online import agent_offline, agent_wait_online
from qvm.control.guest_agent_facts import (
    GuestVcpu,
    apicids_from_cpuinfo,
    blocks_of,
    match_vcpus,
    parse_memory_blocks,
    parse_vcpus,
)
from qvm.control.memory_blocks import BlockSize, agent_online_blocks, check_block_multiple
from qvm.errors import AgentCommandError, HotplugError
from qvm.layout.rundir import RunDir
from qvm.layout.runfiles import RunFiles
from qvm.store.guest import OsInfo, parse_interfaces
from qvm.store.state import ending
from qvm.supervisor import agent_shutdown as shutdown
from qvm.supervisor.facts import cpu_percent
from qvm.supervisor.wire import EndReply, StopRequest, decode_reply

MiB = 1024**2
LINUX_BLOCK = BlockSize(128 * MiB, "x86-64 Linux")

CPUINFO = """processor\t: 0
vendor_id\t: AuthenticAMD
apicid\t\t: 0
initial apicid\t: 0

processor\t: 2
vendor_id\t: AuthenticAMD
apicid\t\t: 3
initial apicid\t: 3
"""


class FakeAgent:
    """Plays qemu-ga: vCPUs by logical id, memory blocks by phys-index, /proc/cpuinfo."""

    name = "vm1"

    def __init__(
        self,
        vcpus: dict[int, tuple[bool, bool]],
        blocks: dict[int, bool] | None = None,
        cpuinfo: str | None = CPUINFO,
        refuse_set: bool = False,
    ) -> None:
        self.vcpus = dict(vcpus)  # logical -> (online, can-offline)
        self.blocks = dict(blocks or {})
        self.cpuinfo = cpuinfo
        self.refuse_set = refuse_set
        self.sent: list[tuple[str, Any]] = []
        self.appear: dict[int, tuple[bool, bool]] = {}  # added at the first guest-get-vcpus

    def execute(self, command: str, arguments: Any = None, timeout: float | None = None) -> Any:
        self.sent.append((command, arguments))
        if command == "guest-get-vcpus":
            if len([c for c in self.sent if c[0] == command]) > 1:
                self.vcpus.update(self.appear)  # the plugged vCPU shows up, once
                self.appear = {}
            return [
                {"logical-id": i, "online": on, "can-offline": can}
                for i, (on, can) in self.vcpus.items()
            ]
        if command == "guest-set-vcpus":
            if self.refuse_set:
                raise AgentCommandError("vm1: guest agent: guest-set-vcpus: busy", "x", "busy")
            for item in arguments["vcpus"]:
                self.vcpus[item["logical-id"]] = (item["online"], True)
            return len(arguments["vcpus"])
        if command == "guest-get-memory-blocks":
            return [
                {"phys-index": i, "online": on, "can-offline": True}
                for i, on in self.blocks.items()
            ]
        if command == "guest-set-memory-blocks":
            for item in arguments["mem-blks"]:
                self.blocks[item["phys-index"]] = True
            return [
                {"phys-index": i["phys-index"], "response": "success"}
                for i in arguments["mem-blks"]
            ]
        if command == "guest-file-open":
            if self.cpuinfo is None:
                raise AgentCommandError("vm1: disabled", "CommandNotFound", "has been disabled")
            return 1000
        if command == "guest-file-read":
            import base64

            return {
                "count": 1,
                "buf-b64": base64.b64encode(self.cpuinfo.encode()).decode(),
                "eof": True,
            }
        if command == "guest-file-close":
            return {}
        raise AssertionError(f"unexpected {command}")

    def execute_batch(self, commands: Any, timeout: float | None = None) -> list[Any]:
        results = []
        for command, arguments in commands:
            try:
                results.append(self.execute(command, arguments, timeout))
            except AgentCommandError as error:
                results.append(error)
        return results

    def commands(self, name: str) -> list[Any]:
        return [args for command, args in self.sent if command == name]


def apic_session(apics: dict[str, int]) -> FakeQmp:
    return FakeQmp(replies={"qom-get": lambda args: apics[args["path"].rsplit("/", 1)[-1]]})


# --- parsing -------------------------------------------------------------------------------


def test_vcpus_memory_blocks_and_cpuinfo_parse() -> None:
    vcpus = parse_vcpus(
        [
            {"logical-id": 0, "online": True, "can-offline": False},
            {"logical-id": 1, "online": False, "can-offline": True},
            {"logical-id": "x"},
            "junk",
        ]
    )
    assert vcpus == {0: GuestVcpu(0, True, False), 1: GuestVcpu(1, False, True)}
    assert parse_vcpus(None) == {}
    blocks = parse_memory_blocks([{"phys-index": 32, "online": False, "can-offline": True}])
    assert blocks[32].online is False
    assert apicids_from_cpuinfo(CPUINFO) == {0: 0, 3: 2}


def test_a_dimm_covers_the_blocks_of_its_address_range() -> None:
    assert blocks_of(4096 * MiB, 256 * MiB, 128 * MiB) == range(32, 34)
    assert blocks_of(4096 * MiB, 100 * MiB, 128 * MiB) == range(32, 33)
    assert blocks_of(0, 0, 128 * MiB) == range(0)


def test_interfaces_and_os_info() -> None:
    interfaces = parse_interfaces(
        [
            {
                "name": "eth0",
                "hardware-address": "52:54:00:8c:6b:f1",
                "ip-addresses": [
                    {"ip-address-type": "ipv4", "ip-address": "10.0.2.15", "prefix": 24}
                ],
            },
            {"name": "lo"},
            {"no-name": 1},
        ]
    )
    assert [i.name for i in interfaces] == ["eth0", "lo"]
    assert interfaces[0].as_json()["addresses"] == [
        {"address": "10.0.2.15", "prefix": 24, "family": "ipv4"}
    ]
    info = OsInfo.from_reply({"pretty-name": "Debian 12", "kernel-release": "6.1.0"})
    assert info.summary() == "Debian 12, kernel 6.1.0"
    assert OsInfo.from_reply("junk").summary() == "unknown OS"


def test_vcpus_are_matched_by_apic_id_and_offline_ones_by_count() -> None:
    vcpus = {
        0: GuestVcpu(0, True, False),
        2: GuestVcpu(2, True, True),
        1: GuestVcpu(1, False, True),
    }
    matches = match_vcpus({"cpu0": 0, "cpu3": 3, "cpu1": 1}, {0: 0, 3: 2}, vcpus)
    assert (matches["cpu3"].logical_id, matches["cpu3"].online) == (2, True)
    assert matches["cpu0"].can_offline is False
    # one vCPU not online in the guest, one offline guest CPU: it is offline
    assert (matches["cpu1"].logical_id, matches["cpu1"].online) == (None, False)
    # /proc/cpuinfo unreadable: nothing can be told
    assert match_vcpus({"cpu1": 1}, None, vcpus)["cpu1"].online is None


# --- cpu add / del through the agent -------------------------------------------------------


def test_a_vcpu_the_guest_leaves_offline_is_onlined(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(cpu_online, "ONLINE_GRACE", 0.0)
    agent = FakeAgent({0: (True, False)})
    agent.appear = {1: (False, True)}
    agent.cpuinfo = CPUINFO.replace("apicid\t\t: 3", "apicid\t\t: 1").replace(
        "processor\t: 2", "processor\t: 1"
    )
    found = agent_wait_online(
        agent, apic_session({"cpu1": 1}), ["cpu1"], set(), {0}, 5.0, time.monotonic(), True
    )
    assert found["cpu1"].logical_id == 1
    assert found["cpu1"].online and found["cpu1"].onlined_by_qvm
    assert agent.commands("guest-set-vcpus") == [{"vcpus": [{"logical-id": 1, "online": True}]}]


def test_no_online_leaves_it_offline(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(cpu_online, "ONLINE_GRACE", 0.0)
    monkeypatch.setattr(cpu_online, "AGENT_POLL", 0.001)
    agent = FakeAgent({0: (True, False)})
    agent.appear = {1: (False, True)}
    found = agent_wait_online(
        agent, apic_session({"cpu1": 1}), ["cpu1"], set(), {0}, 0.05, time.monotonic(), False
    )
    assert (found["cpu1"].logical_id, found["cpu1"].online) == (1, False)
    assert not found["cpu1"].onlined_by_qvm
    assert agent.commands("guest-set-vcpus") == []


def test_a_guest_that_refuses_to_online_is_reported(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(cpu_online, "ONLINE_GRACE", 0.0)
    agent = FakeAgent({0: (True, False)}, refuse_set=True)
    agent.appear = {1: (False, True)}
    found = agent_wait_online(
        agent, apic_session({"cpu1": 1}), ["cpu1"], set(), {0}, 5.0, time.monotonic(), True
    )
    assert found["cpu1"].online is False
    assert "busy" in (found["cpu1"].detail or "")


def test_del_offlines_in_the_guest_first() -> None:
    agent = FakeAgent({0: (True, False), 2: (True, True)})
    done = agent_offline(
        agent, apic_session({"cpu3": 3}), "vm1", {"cpu3": "/machine/peripheral/cpu3"}
    )
    assert done is not None and done["cpu3"].logical_id == 2 and done["cpu3"].offlined
    assert agent.vcpus[2][0] is False


def test_del_of_a_vcpu_the_guest_cannot_offline_asks_nothing_of_qemu() -> None:
    agent = FakeAgent({0: (True, False), 2: (True, False)})
    session = apic_session({"cpu3": 3})
    with pytest.raises(HotplugError) as caught:
        agent_offline(agent, session, "vm1", {"cpu3": "/machine/peripheral/cpu3"})
    assert "cpu3 is guest CPU 2, which the guest says cannot be offlined" in str(caught.value)
    assert "QEMU was not asked" in str(caught.value)
    assert agent.commands("guest-set-vcpus") == []
    assert [c for c, _ in session.sent if c == "device_del"] == []


def test_del_without_cpuinfo_says_it_cannot_tell() -> None:
    agent = FakeAgent({0: (True, False), 1: (True, True)}, cpuinfo=None)
    assert agent_offline(agent, apic_session({"cpu1": 1}), "vm1", {"cpu1": "/p/cpu1"}) is None


# --- memory --------------------------------------------------------------------------------


def test_a_dimm_the_guest_cannot_use_whole_is_refused_with_the_block_size() -> None:
    check_block_multiple("vm1", 256 * MiB, LINUX_BLOCK)
    with pytest.raises(HotplugError) as caught:
        check_block_multiple("vm1", 100 * MiB, LINUX_BLOCK)
    message = str(caught.value)
    assert message.startswith("vm1: mem add 100 MiB: the guest onlines memory in blocks of 128 MiB")
    assert "nothing was added" in message and "qvm mem add vm1 128M" in message
    with pytest.raises(HotplugError, match="qvm mem add vm1 128M or 256M"):
        check_block_multiple("vm1", 200 * MiB, LINUX_BLOCK)


def test_blocks_the_guest_leaves_offline_are_onlined(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(memory_blocks, "ONLINE_GRACE", 0.0)
    agent = FakeAgent({}, blocks={0: True, 32: False, 33: False})
    result = agent_online_blocks(agent, 4096 * MiB, 256 * MiB, 128 * MiB, 5.0)
    assert result.complete and result.blocks == (32, 33) and result.onlined_by_qvm == (32, 33)
    agent = FakeAgent({}, blocks={32: False})
    monkeypatch.setattr(memory_blocks, "BLOCK_POLL", 0.001)
    result = agent_online_blocks(agent, 4096 * MiB, 128 * MiB, 128 * MiB, 0.05, online_them=False)
    assert not result.complete and result.online == ()


# --- CPU% ----------------------------------------------------------------------------------


def test_cpu_percent_is_a_rate_over_a_real_interval() -> None:
    samples = [(0.0, 0.0)]
    assert cpu_percent(samples, 2.0, 1.0, 2) == 50.0
    # 5 ms later, one more 10 ms clock tick: still over the last second or more, not 200%
    assert cpu_percent(samples, 2.005, 1.01, 2) == pytest.approx(50.4, abs=0.1)
    assert cpu_percent(samples, 3.5, 2.0, 2) == pytest.approx(66.2, abs=0.1)
    # never above 100 x the host's CPUs, never below 0
    assert cpu_percent([(0.0, 0.0)], 0.01, 0.5, 2) == 200.0
    assert cpu_percent([(0.0, 5.0)], 1.0, 1.0, 2) == 0.0


# --- stop: guest-shutdown from the supervisor ----------------------------------------------


def fake_agent_server(path: Path, answer_error: bool) -> tuple[threading.Thread, list[Any]]:
    server = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    server.bind(str(path))
    server.listen(1)
    received: list[Any] = []

    def serve() -> None:
        conn, _ = server.accept()
        with conn, server:
            data = b""
            while data.count(b"\n") < 2:
                chunk = conn.recv(4096)
                if not chunk:
                    return
                data += chunk
                if data.count(b"\n") == 1 and not received:
                    sync = json.loads(data.lstrip(b"\xff").split(b"\n")[0])
                    received.append(sync)
                    conn.sendall(b'{"error": {"desc": "stray"}}\n\xff')
                    conn.sendall(json.dumps({"return": sync["arguments"]["id"]}).encode() + b"\n")
            received.append(json.loads(data.split(b"\n")[1]))
            if answer_error:
                conn.sendall(b'{"error": {"class": "GenericError", "desc": "no /sbin/shutdown"}}\n')

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    return thread, received


@pytest.mark.parametrize("answer_error", [False, True], ids=["taken", "refused"])
def test_the_supervisor_sends_guest_shutdown(tmp_path: Path, answer_error: bool) -> None:
    run = RunDir(tmp_path)
    thread, received = fake_agent_server(run.agent_socket, answer_error)
    problem = shutdown.agent_shutdown(RunFiles(str(tmp_path)))
    thread.join(5)
    assert received[0]["execute"] == "guest-sync-delimited"
    assert received[1] == {"execute": "guest-shutdown", "arguments": {"mode": "powerdown"}}
    assert problem == ("guest-shutdown: no /sbin/shutdown" if answer_error else None)


def test_no_agent_socket_is_a_reason_not_an_error(tmp_path: Path) -> None:
    problem = shutdown.agent_shutdown(RunFiles(str(tmp_path)))
    assert problem is not None and problem.startswith("the guest agent's channel")


def test_agent_is_an_ending_on_the_wire_and_in_the_record() -> None:
    reply = decode_reply(StopRequest(), b'{"ended_by": "agent"}\n', "vm1: supervisor reply")
    assert reply == EndReply("agent")
    assert (
        ending("agent", None, "the guest powered off after guest-shutdown (guest agent)") == "agent"
    )
