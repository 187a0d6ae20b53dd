"""The supervisor's control relay (``qvm.supervisor.relay``) over a socketpair, without
QEMU: the relay serves one end in an event loop of its own, the real ``ControlSession``
(or raw lines) talks on the other, and ``FakeQmp`` plays QEMU behind a qemu.qmp-shaped
client."""

from __future__ import annotations

import asyncio
import json
import logging
import socket
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest
from framework.fake_qmp import FakeEvents, FakeQmp, device_deleted
from qemu.qmp import ExecuteError
from qemu.qmp.events import Events
from qemu.qmp.message import Message
from qemu.qmp.models import ErrorResponse

from qvm.control import session as session_module
from qvm.control.session import ControlSession
from qvm.errors import ControlError, NotRunningError, QmpTimeoutError
from qvm.layout.rundir import RunDir
from qvm.supervisor.relay import serve_control
from qvm.supervisor.wire import (
    MAX_LINE,
    RelayExpired,
    RelayGone,
    RelayRefused,
    RelayReturn,
    decode_relay_message,
)


class FakeQmpClient(Events):
    """``FakeQmp`` behind the part of ``qemu.qmp.QMPClient`` the relay uses: ``execute``
    (a refusal is qemu.qmp's ``ExecuteError``), and listeners that get the events
    ``FakeQmp`` sends after a command. Commands in ``hang`` never get an answer."""

    def __init__(self, fake: FakeQmp, hang: tuple[str, ...] = ()) -> None:
        self.logger = logging.getLogger("fake-qmp")
        super().__init__()
        self.fake = fake
        self.hang = hang
        self.sent_events = FakeEvents(None)
        fake.listeners.append(self.sent_events)

    async def execute(self, command: str, arguments: dict[str, Any] | None = None) -> Any:
        if command in self.hang:
            await asyncio.sleep(3600)
        try:
            result = self.fake.execute(command, arguments)
        except ControlError as exc:
            error = {"class": exc.qemu_class, "desc": exc.qemu_desc}
            raise ExecuteError(
                ErrorResponse(Message({"error": error})),
                Message({"execute": command}),
                Message({"error": error}),
            ) from exc
        while self.sent_events.queued:
            await self._event_dispatch(Message(self.sent_events.queued.pop(0)))
        return result


class Holder:
    """The supervisor, as the relay sees it."""

    def __init__(self, qmp: FakeQmpClient | None) -> None:
        self.qmp = qmp

    async def qmp_connection(self, timeout: float) -> FakeQmpClient | None:
        return self.qmp


@contextmanager
def relay(holder: Holder) -> Iterator[socket.socket]:
    """The client's end of a socketpair whose other end the relay serves."""
    ours, theirs = socket.socketpair()
    loop = asyncio.new_event_loop()

    async def serve() -> None:
        reader, writer = await asyncio.open_unix_connection(sock=theirs, limit=MAX_LINE)
        await serve_control(holder, reader, writer)

    thread = threading.Thread(target=loop.run_until_complete, args=(serve(),))
    thread.start()
    try:
        yield ours
    finally:
        ours.close()  # the relay ends with its client
        thread.join(10)
        assert not thread.is_alive(), "the relay did not end with its client"
        loop.close()


@pytest.fixture
def session_on(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Any]:
    """``session_on(holder)``: a ControlSession whose supervisor is the relay."""
    run = RunDir(tmp_path / "vm1")
    run.path.mkdir()
    monkeypatch.setattr(session_module, "supervisor_alive", lambda _run: True)
    # how QEMU ended is read from state.json, which no supervisor writes here
    monkeypatch.setattr(session_module, "describe_exit", lambda _run: "it ended")

    @contextmanager
    def session_on(holder: Holder) -> Iterator[ControlSession]:
        with relay(holder) as sock:
            monkeypatch.setattr(session_module, "connect_supervisor", lambda *_: sock)
            with ControlSession(run, timeout=2.0) as session:
                yield session

    yield session_on


def test_a_command_returns_qemus_answer_and_reaches_it_with_its_arguments(
    session_on: Any,
) -> None:
    fake = FakeQmp(replies={"query-status": {"status": "running"}})
    with session_on(Holder(FakeQmpClient(fake))) as session:
        assert session.execute("query-status") == {"status": "running"}
        assert session.execute("device_del", {"id": "cpu1"}) == {}
    assert fake.sent == [("query-status", {}), ("device_del", {"id": "cpu1"})]


def test_a_refusal_carries_qemus_class_and_text(session_on: Any) -> None:
    fake = FakeQmp(refuse={"device_add": "Bus 'hp9' not found"})
    with session_on(Holder(FakeQmpClient(fake))) as session:
        with pytest.raises(ControlError) as caught:
            session.execute("device_add", {"driver": "virtio-blk-pci"})
        assert (caught.value.qemu_class, caught.value.qemu_desc) == (
            "GenericError",
            "Bus 'hp9' not found",
        )
        # the session goes on after a refusal
        assert session.execute("query-status") == {}


def test_events_reach_the_listener_opened_before_the_command(session_on: Any) -> None:
    fake = FakeQmp(events={"device_del": lambda args: [device_deleted(args["id"])]})
    with session_on(Holder(FakeQmpClient(fake))) as session:
        with session.listen(["DEVICE_DELETED"]) as events:
            session.execute("device_del", {"id": "disk1"})
            event = events.wait(lambda e: True, time.monotonic() + 2.0)
        assert event is not None
        assert (event["event"], event["data"]["device"]) == ("DEVICE_DELETED", "disk1")
        with session.listen(["SHUTDOWN"]) as events:  # a name filter holds
            session.execute("device_del", {"id": "disk2"})
            assert events.wait(lambda e: True, time.monotonic() + 0.3) is None


def test_qemu_silent_is_a_timeout_not_a_hang(session_on: Any) -> None:
    fake = FakeQmp()
    with session_on(Holder(FakeQmpClient(fake, hang=("query-status",)))) as session:
        started = time.monotonic()
        with pytest.raises(QmpTimeoutError, match="did not answer query-status within 0.2 s"):
            session.execute("query-status", timeout=0.2)
        assert time.monotonic() - started < 2.0
        assert session.execute("query-cpus-fast") == {}  # the late one does not confuse it


def test_no_qemu_is_not_running(session_on: Any) -> None:
    with pytest.raises(NotRunningError), session_on(Holder(None)):
        pass


def test_qemu_gone_during_a_command_says_so(session_on: Any) -> None:
    holder = Holder(FakeQmpClient(FakeQmp()))
    with session_on(holder) as session:
        assert session.execute("query-status") == {}
        holder.qmp = None  # QEMU ended: the supervisor dropped its connection
        with pytest.raises(ControlError, match="QEMU went away during query-status") as caught:
            session.execute("query-status")
        assert caught.value.qemu_exited


def lines(sock: socket.socket, *requests: bytes, count: int) -> list[Any]:
    """Send raw request lines; the relay's first ``count`` lines after ControlReady."""
    sock.settimeout(5.0)
    with sock.makefile("rb") as reader:
        assert json.loads(reader.readline()) == {"ready": True}
        sock.sendall(b"".join(requests))
        return [decode_relay_message(reader.readline(), "relay") for _ in range(count)]


def test_lines_the_relay_cannot_read_are_refused_by_id() -> None:
    fake = FakeQmp()
    with relay(Holder(FakeQmpClient(fake))) as sock:
        replies = lines(
            sock,
            b"not json\n",
            b'{"id": 4, "bogus": 1}\n',
            b'{"id": 5, "execute": 7}\n',
            b'{"id": 6, "listen": "DEVICE_DELETED"}\n',
            b'{"id": "7", "execute": "quit"}\n',
            count=5,
        )
    assert [(r.id, r.error_class) for r in replies] == [
        (None, "qvm"),
        (4, "qvm"),
        (5, "qvm"),
        (6, "qvm"),
        (None, "qvm"),
    ]
    assert all(isinstance(r, RelayRefused) for r in replies)
    assert "execute: must be a string, got 7" in replies[2].desc
    assert fake.sent == []  # nothing of it reached QEMU


def test_a_request_read_after_its_deadline_never_reaches_qemu() -> None:
    fake = FakeQmp()
    late = {"id": 1, "execute": "device_del", "deadline": time.time() - 1}
    in_time = {"id": 2, "execute": "query-status", "deadline": time.time() + 60}
    with relay(Holder(FakeQmpClient(fake))) as sock:
        replies = lines(sock, *(json.dumps(r).encode() + b"\n" for r in (late, in_time)), count=2)
    assert sorted(replies, key=lambda r: r.id) == [RelayExpired(1), RelayReturn(2, {})]
    assert fake.commands() == ["query-status"]


def test_a_restarted_qemu_is_gone_for_a_session_opened_before() -> None:
    holder = Holder(FakeQmpClient(FakeQmp()))
    with relay(holder) as sock, sock.makefile("rb") as reader:
        sock.settimeout(5.0)
        assert json.loads(reader.readline()) == {"ready": True}
        holder.qmp = FakeQmpClient(FakeQmp())  # a new QEMU, a new connection
        sock.sendall(b'{"id": 1, "execute": "query-status"}\n')
        assert decode_relay_message(reader.readline(), "relay") == RelayGone(1)
