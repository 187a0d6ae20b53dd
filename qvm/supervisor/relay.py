"""The supervisor's control relay: qvm's own QMP commands, run on the supervisor's connection.

A qvm command that talks QMP (``cpu add``, ``disk del``, ``qmp``...) would otherwise open
its own connection with qemu.qmp, and pay ~55 ms to import asyncio and qemu.qmp before its
first command. The supervisor already holds a qemu.qmp connection that sees every event, so
it runs the commands for the CLI, which speaks plain JSON lines over ``supervisor.sock``
(client side: ``qvm.control.session.ControlSession``). The CLI's requests and the supervisor's own
queries share one monitor safely: qemu.qmp matches replies to commands by id.

After the opening ``{"op": "control"}`` line, requests and replies are one JSON object per
line, matched by ``id``::

    {"id": 1, "execute": "device_del", "arguments": {...}, "timeout": 10,
     "deadline": T}
        -> {"id": 1, "return": ...}
         | {"id": 1, "error": {"class": ..., "desc": ...}}   QEMU refused it
         | {"id": 1, "timeout": true}                       QEMU did not answer in time
         | {"id": 1, "gone": true}                          QEMU (and the connection) ended
         | {"id": 1, "expired": true}     read after T (time.time()): the client had given
                                          up on it, so it is not sent to QEMU
    {"id": 2, "listen": ["DEVICE_DELETED"]}   (null: every event)
        -> {"id": 2, "return": {}}, then {"listener": 2, "event": {...}} for each event
    {"id": 3, "unlisten": 2}                  -> {"id": 3, "return": {}}

The lines are records of ``qvm.supervisor.wire`` (``RelayExecute``..., ``RelayReturn``...),
read and checked at both ends. Commands run concurrently (a client that timed out may send
the next one); a listener is registered before its reply is written, so an event caused by
any later command reaches it.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from typing import Any, Protocol

from qemu.qmp import EventListener, ExecuteError, QMPClient

from qvm.supervisor import wire
from qvm.supervisor.view import changes_view

# how long a control client waits for the supervisor's own QMP connection (QEMU starting
# or restarting) before it is told the VM is not running
CONNECTION_WAIT = 5.0
DEFAULT_COMMAND_TIMEOUT = 10.0


class QmpHolder(Protocol):
    """What the relay needs of the supervisor (``qvm.supervisor.process.Supervisor``): its
    QMP connection, None while QEMU does not run."""

    qmp: QMPClient | None

    async def qmp_connection(self, timeout: float) -> QMPClient | None: ...

    async def local_command(self, name: str, arguments: dict[str, Any]) -> Any:
        """One of ``wire.LOCAL_COMMANDS``, run by the supervisor itself; ValueError refuses it."""
        ...

    async def refresh_view(self, changed: bool) -> None: ...


class LineWriter(Protocol):
    """The writing half of the client's stream (``asyncio.StreamWriter``)."""

    def write(self, data: bytes) -> None: ...

    async def drain(self) -> None: ...

    def close(self) -> None: ...


class LineSource(Protocol):
    """The reading half of the client's stream (``asyncio.StreamReader``)."""

    async def readline(self) -> bytes: ...


async def serve_control(holder: QmpHolder, reader: LineSource, writer: LineWriter) -> None:
    """Serve one control client until it closes its end."""
    relay = _Relay(holder, writer)
    try:
        if not await relay.wait_connection():
            relay.send(wire.ErrorReply("QEMU is not running"))
            return
        relay.send(wire.ControlReady())
        while True:
            try:
                line = await reader.readline()
            except ValueError:  # longer than wire.MAX_LINE: the client checks, so not one of ours
                relay.send(wire.ErrorReply(f"a request longer than {wire.MAX_LINE} bytes"))
                return
            except OSError:  # the client went away while a reply was being written
                return
            if not line:
                return
            relay.handle(wire.decode_relay_request(line))
    finally:
        relay.close()
        with contextlib.suppress(Exception):
            await writer.drain()
            writer.close()


class _Relay:
    def __init__(self, holder: QmpHolder, writer: LineWriter) -> None:
        self.holder = holder
        self.writer = writer
        self.client: QMPClient | None = None  # the connection this session's listeners are on
        self.listeners: dict[int, tuple[EventListener, asyncio.Task[None]]] = {}
        self.commands: set[asyncio.Task[None]] = set()

    async def wait_connection(self) -> bool:
        self.client = await self.holder.qmp_connection(CONNECTION_WAIT)
        return self.client is not None

    def send(
        self, message: wire.RelayReply | wire.RelayEvent | wire.ErrorReply | wire.ControlReady
    ) -> None:
        with contextlib.suppress(Exception):  # the client went away: nothing to tell
            self.writer.write(wire.encode(message.to_json()))

    def handle(self, request: wire.RelayRequest) -> None:
        if isinstance(request, wire.RelayExecute):
            task = asyncio.create_task(self._execute(request))
            self.commands.add(task)
            task.add_done_callback(self.commands.discard)
        elif isinstance(request, wire.RelayListen):
            self._listen(request)
        elif isinstance(request, wire.RelayUnlisten):
            self._unlisten(request.listener)
            self.send(wire.RelayReturn(request.id, {}))
        else:
            self.send(wire.RelayRefused(request.id, "qvm", request.problem))

    async def _execute(self, request: wire.RelayExecute) -> None:
        client = self.holder.qmp
        if client is None or client is not self.client:
            self.send(wire.RelayGone(request.id))  # QEMU ended (or was restarted)
            return
        if request.deadline is not None and time.time() > request.deadline:
            # the supervisor was stopped or stuck while this waited: its user has been
            # told it timed out, so it must not reach QEMU now
            self.send(wire.RelayExpired(request.id))
            return
        timeout = request.timeout or DEFAULT_COMMAND_TIMEOUT
        if request.execute in wire.LOCAL_COMMANDS:
            await self._local(request, timeout)
            return
        try:
            result = await asyncio.wait_for(
                client.execute(request.execute, request.arguments), timeout
            )
        except TimeoutError:
            self.send(wire.RelayTimedOut(request.id))
        except ExecuteError as exc:
            error = exc.error.error
            self.send(wire.RelayRefused(request.id, error.class_, error.desc))
        except Exception:  # noqa: BLE001 - the connection ended: QEMU exited or crashed
            self.send(wire.RelayGone(request.id))
        else:
            # before the reply, so that the client's next query reads the change: its
            # own, or one an event announced (a vCPU's DEVICE_DELETED, which `cpu del`
            # waits for and then confirms with a query)
            with contextlib.suppress(Exception):
                await self.holder.refresh_view(changes_view(request.execute))
            self.send(wire.RelayReturn(request.id, result))

    async def _local(self, request: wire.RelayExecute, timeout: float) -> None:
        try:
            result = await asyncio.wait_for(
                self.holder.local_command(request.execute, request.arguments or {}), timeout
            )
        except TimeoutError:
            self.send(wire.RelayTimedOut(request.id))
        except ValueError as error:
            self.send(wire.RelayRefused(request.id, "qvm", str(error)))
        else:
            self.send(wire.RelayReturn(request.id, result))

    def _listen(self, request: wire.RelayListen) -> None:
        assert self.client is not None  # wait_connection came first
        listener = EventListener(request.names)
        self.client.register_listener(listener)
        task = asyncio.create_task(self._forward(request.id, listener))
        self.listeners[request.id] = (listener, task)
        self.send(wire.RelayReturn(request.id, {}))

    async def _forward(self, listener_id: int, listener: EventListener) -> None:
        while True:
            event = await listener.get()
            self.send(wire.RelayEvent(listener_id, dict(event)))

    def _unlisten(self, listener_id: int) -> None:
        entry = self.listeners.pop(listener_id, None)
        if entry is None:
            return
        listener, task = entry
        task.cancel()
        if self.client is not None:
            with contextlib.suppress(Exception):  # already gone with its connection
                self.client.remove_listener(listener)

    def close(self) -> None:
        for listener_id in list(self.listeners):
            self._unlisten(listener_id)
        for task in self.commands:
            task.cancel()
