"""The guest agent client (qvm.control.agent) against a fake qemu-ga on a unix socket."""

from __future__ import annotations

import json
import os
import socket
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from qvm.base.jsonfile import write_json_atomic
from qvm.control.agent import (
    AgentClient,
    AgentCommandError,
    AgentError,
    AgentInfo,
    AgentNotAnswering,
    AgentNotConfigured,
    open_agent,
)
from qvm.errors import NotRunningError
from qvm.layout.locks import try_lock, try_lock_dir
from qvm.layout.rundir import RunDir

INFO = {
    "version": "7.2.22",
    "supported_commands": [
        {"enabled": True, "name": "guest-exec", "success-response": True},
        {"enabled": True, "name": "guest-ping", "success-response": True},
        {"enabled": False, "name": "guest-fsfreeze-freeze", "success-response": True},
        {"enabled": True, "name": "guest-shutdown", "success-response": False},
    ],
}


class FakeAgent:
    """qemu-ga's side of the channel, as far as the client can tell: one JSON request a
    line, one reply a line; a 0xFF byte makes its parser drop what it holds and reply
    with an error; guest-sync-delimited's reply starts with 0xFF.

    ``silent``: never replies. ``stale``: lines waiting before the first reply (what an
    earlier client left). ``delay``: per command, seconds before its reply. ``hold``:
    no reply before that many requests are in (a client that waits for each reply before
    it sends the next request never gets one)."""

    def __init__(
        self, sock: socket.socket, silent: bool = False, stale: bytes = b"", hold: int = 0
    ) -> None:
        self.sock = sock
        self.silent = silent
        self.stale = stale
        self.hold = hold
        self.held = b""
        self.delay: dict[str, float] = {}
        self.received: list[dict] = []
        self.thread = threading.Thread(target=self._serve, daemon=True)
        self.thread.start()

    def _reply(self, data: bytes) -> None:
        if not self.silent:
            if self.stale:
                data, self.stale = self.stale + data, b""
            if len(self.received) < self.hold:
                self.held += data
                return
            data, self.held = self.held + data, b""
            self.sock.sendall(data)

    def _serve(self) -> None:
        buffer = b""
        while True:
            try:
                data = self.sock.recv(65536)
            except OSError:
                return
            if not data:
                return
            buffer += data
            while True:
                if b"\xff" in buffer.split(b"\n", 1)[0]:
                    buffer = buffer.split(b"\xff", 1)[1]
                    self._reply(b'{"error": {"class": "GenericError", "desc": "stray"}}\n')
                    continue
                if b"\n" not in buffer:
                    break
                line, buffer = buffer.split(b"\n", 1)
                if line.strip():
                    self._handle(json.loads(line))

    def _handle(self, request: dict) -> None:
        self.received.append(request)
        command = request["execute"]
        if command in self.delay:
            time.sleep(self.delay.pop(command))
        if command == "guest-sync-delimited":
            reply = b"\xff" + json.dumps({"return": request["arguments"]["id"]}).encode()
        elif command == "guest-ping":
            reply = b'{"return": {}}'
        elif command == "guest-info":
            reply = json.dumps({"return": INFO}).encode()
        elif command == "guest-shutdown":
            return
        elif command == "guest-echo":
            reply = json.dumps({"return": request["arguments"]}).encode()
        else:
            error = {
                "class": "CommandNotFound",
                "desc": f"The command {command} has not been found",
            }
            reply = json.dumps({"error": error}).encode()
        self._reply(reply + b"\n")


@pytest.fixture
def pair() -> Iterator[tuple[socket.socket, socket.socket]]:
    one, two = socket.socketpair()
    yield one, two
    one.close()
    two.close()


def test_sync_then_commands_with_a_typed_reply(pair) -> None:
    client_end, agent_end = pair
    agent = FakeAgent(agent_end)
    client = AgentClient(client_end, "vm1")
    client.ping(timeout=2)
    info = client.info(timeout=2)
    assert info == AgentInfo.from_reply(INFO, "vm1")
    assert info.version == "7.2.22"
    assert info.supports("guest-exec") and not info.supports("guest-fsfreeze-freeze")
    assert info.to_json()["commands"] == ["guest-exec", "guest-ping", "guest-shutdown"]
    assert [r["execute"] for r in agent.received] == [
        "guest-sync-delimited",
        "guest-ping",
        "guest-info",
    ]


def test_sync_sends_the_flush_byte_and_skips_what_came_before_the_sentinel(pair) -> None:
    client_end, agent_end = pair
    # a late reply to an earlier client's command and a sync reply with another id
    stale = b'{"return": {"pid": 7}}\n\xff{"return": 42}\n'
    FakeAgent(agent_end, stale=stale)
    client = AgentClient(client_end, "vm1")
    client.sync(timeout=2)
    # the fake agent answered the 0xFF with an error line: discarded too
    assert client.execute("guest-ping", timeout=2) == {}


def test_the_agents_own_error_is_one_line_with_its_class(pair) -> None:
    client_end, agent_end = pair
    FakeAgent(agent_end)
    client = AgentClient(client_end, "vm1")
    with pytest.raises(AgentCommandError) as caught:
        client.execute("guest-nope", timeout=2)
    assert str(caught.value) == (
        "vm1: guest agent: guest-nope: The command guest-nope has not been found"
    )
    assert caught.value.agent_class == "CommandNotFound"
    assert client.execute("guest-ping", timeout=2) == {}  # still in step


def test_no_agent_is_not_answering_within_the_timeout(pair) -> None:
    client_end, agent_end = pair
    FakeAgent(agent_end, silent=True)
    client = AgentClient(client_end, "vm1")
    started = time.monotonic()
    with pytest.raises(AgentNotAnswering, match=r"^vm1: guest agent not answering: guest-sync"):
        client.sync(timeout=0.3)
    assert time.monotonic() - started < 2


def test_after_a_timeout_the_late_reply_is_not_taken_for_the_next(pair) -> None:
    client_end, agent_end = pair
    agent = FakeAgent(agent_end)
    agent.delay["guest-info"] = 0.5
    client = AgentClient(client_end, "vm1")
    with pytest.raises(AgentNotAnswering, match=r"guest-info \(no reply within 0.2 s\)"):
        client.info(timeout=0.2)
    # the guest-info reply arrives late; the client resynchronises before guest-ping
    assert client.execute("guest-ping", timeout=3) == {}
    assert [r["execute"] for r in agent.received][-2:] == ["guest-sync-delimited", "guest-ping"]


def test_a_command_without_reply_then_a_resync(pair) -> None:
    client_end, agent_end = pair
    agent = FakeAgent(agent_end)
    client = AgentClient(client_end, "vm1")
    client.send("guest-shutdown", {"mode": "powerdown"})
    client.ping(timeout=2)
    assert [r["execute"] for r in agent.received] == [
        "guest-sync-delimited",
        "guest-shutdown",
        "guest-sync-delimited",
        "guest-ping",
    ]


def test_a_batch_travels_behind_the_resync_in_one_round_trip(pair) -> None:
    """Nothing is answered before the resync and all three commands are in: a client that
    waited for any reply first would time out. Replies come back in order, an error
    reply in its place."""
    client_end, agent_end = pair
    agent = FakeAgent(agent_end, stale=b'{"return": "late"}\n', hold=4)
    client = AgentClient(client_end, "vm1")
    client.begin_sync(timeout=2)
    echo, missing, info = client.execute_batch(
        [("guest-echo", {"n": 1}), ("guest-nope", None), ("guest-info", None)], timeout=2
    )
    assert echo == {"n": 1}
    assert isinstance(missing, AgentCommandError)
    assert missing.agent_class == "CommandNotFound"
    assert info == INFO
    assert [r["execute"] for r in agent.received] == [
        "guest-sync-delimited",
        "guest-echo",
        "guest-nope",
        "guest-info",
    ]
    assert client.execute("guest-ping", timeout=2) == {}  # still in step: no resync
    assert [r["execute"] for r in agent.received][-1] == "guest-ping"


def test_a_batch_reply_that_does_not_come_silences_the_rest_and_forces_a_resync(pair) -> None:
    client_end, agent_end = pair
    agent = FakeAgent(agent_end)
    agent.delay["guest-info"] = 0.6
    client = AgentClient(client_end, "vm1")
    ping, info, echo = client.execute_batch(
        [("guest-ping", None), ("guest-info", None), ("guest-echo", {"n": 2})], timeout=0.2
    )
    assert ping == {}
    assert isinstance(info, AgentNotAnswering)
    assert echo is info
    # the late replies are dropped by the resync before the next command
    assert client.execute("guest-echo", {"n": 3}, timeout=3) == {"n": 3}
    assert [r["execute"] for r in agent.received][-2:] == ["guest-sync-delimited", "guest-echo"]


def test_a_batch_whose_resync_gets_no_answer_raises(pair) -> None:
    client_end, agent_end = pair
    FakeAgent(agent_end, silent=True)
    client = AgentClient(client_end, "vm1")
    with pytest.raises(AgentNotAnswering, match="guest-sync-delimited"):
        client.begin_sync(timeout=0.2)
        client.execute_batch([("guest-ping", None)])


def test_a_closed_channel_says_so(pair) -> None:
    client_end, agent_end = pair
    agent_end.close()
    with pytest.raises(AgentError, match="guest agent channel closed"):
        AgentClient(client_end, "vm1").sync(timeout=1)


# --- open_agent on a run dir -----------------------------------------------------------


@pytest.fixture
def run() -> Iterator[RunDir]:
    # a short path: unix socket paths are limited to 107 bytes
    base = Path(os.environ.get("TMPDIR", "/tmp"))
    import tempfile

    path = Path(tempfile.mkdtemp(prefix="qa", dir=base))
    run = RunDir(path / "vm1")
    run.create()
    yield run
    import shutil

    shutil.rmtree(path)


def _running(run: RunDir, agent: bool = True) -> int:
    """launch.json as qvm up writes it, and the supervisor's lock held: a running VM."""
    argv = ["qemu-system-x86_64", "-device", "virtio-serial-pci,id=qvm.agent-serial"]
    if agent:
        argv += ["-device", "virtserialport,chardev=qga0,name=org.qemu.guest_agent.0"]
    write_json_atomic(run.launch_file, {"name": run.name, "argv": argv})
    fd = try_lock_dir(run.path)
    assert fd is not None
    return fd


def _serve(run: RunDir) -> tuple[socket.socket, list[FakeAgent]]:
    server = socket.socket(socket.AF_UNIX)
    server.bind(str(run.agent_socket))
    server.listen(1)
    agents: list[FakeAgent] = []

    def accept() -> None:
        conn, _ = server.accept()
        agents.append(FakeAgent(conn))

    threading.Thread(target=accept, daemon=True).start()
    return server, agents


def test_open_agent_syncs_and_holds_the_lock(run) -> None:
    fd = _running(run)
    server, _ = _serve(run)
    try:
        with open_agent(run, sync_timeout=2) as client:
            assert try_lock(run.agent_lock) is None  # others wait their turn
            assert client.info(timeout=2).version == "7.2.22"
        lock = try_lock(run.agent_lock)
        assert lock is not None
        os.close(lock)
    finally:
        server.close()
        os.close(fd)


def test_open_agent_not_configured_not_running_and_busy(run) -> None:
    with pytest.raises(NotRunningError), open_agent(run):
        pass
    fd = _running(run, agent=False)
    try:
        with pytest.raises(AgentNotConfigured) as caught, open_agent(run):
            pass
        assert str(caught.value) == (
            "vm1: guest agent not configured (hint: set [agent] enabled = true in its"
            " machine file, then qvm restart vm1)"
        )
        assert "\n" not in str(caught.value)
    finally:
        os.close(fd)
    fd = _running(run)
    lock = try_lock(run.agent_lock)
    try:
        with (
            pytest.raises(AgentNotAnswering, match="guest agent busy"),
            open_agent(run, lock_timeout=0.2),
        ):
            pass
    finally:
        os.close(lock)
        os.close(fd)


def test_wait_for_agent(run) -> None:
    from qvm.ops.access import describe_condition, parse_condition, wait_ready

    assert parse_condition("agent") == ("agent", None)
    assert describe_condition("agent", None, run) == "the guest agent to answer"
    fd = _running(run)
    server, _ = _serve(run)
    try:
        assert wait_ready(run, "agent", None, timeout=5) < 5
    finally:
        server.close()
        os.close(fd)
    fd = _running(run, agent=False)
    try:
        with pytest.raises(AgentNotConfigured):
            wait_ready(run, "agent", None, timeout=5)
    finally:
        os.close(fd)


def test_the_agent_protocol_is_written_once() -> None:
    """The resync and the port's name live in one module each, which both the commands
    (qvm.control.agent) and the supervisor's guest-shutdown use."""
    qvm = Path(__file__).resolve().parents[3] / "qvm"
    holding = {
        text: sorted(str(p.relative_to(qvm)) for p in qvm.rglob("*.py") if text in p.read_text())
        for text in ('"guest-sync-delimited"', '"org.qemu.guest_agent.0"', "SENTINEL = ")
    }
    assert holding == {
        '"guest-sync-delimited"': ["supervisor/agent_wire.py"],
        '"org.qemu.guest_agent.0"': ["layout/runfiles.py"],
        "SENTINEL = ": ["supervisor/agent_wire.py"],
    }
