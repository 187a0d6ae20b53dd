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

Commands run concurrently (a client that timed out may send the next one); a listener is
registered before its reply is written, so an event caused by any later command reaches it.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import time
from typing import TYPE_CHECKING, Any

from qemu.qmp import EventListener, ExecuteError

from qvm.supervisor.wire import MAX_LINE, ControlReady, ErrorReply

if TYPE_CHECKING:
    from qvm.supervisor.process import Supervisor

# how long a control client waits for the supervisor's own QMP connection (QEMU starting
# or restarting) before it is told the VM is not running
CONNECTION_WAIT = 5.0
DEFAULT_COMMAND_TIMEOUT = 10.0


async def serve_control(supervisor: Supervisor, reader: Any, writer: Any) -> None:
    """Serve one control client until it closes its end."""
    relay = _Relay(supervisor, writer)
    try:
        if not await relay.wait_connection():
            relay.send(ErrorReply("QEMU is not running").to_json())
            return
        relay.send(ControlReady().to_json())
        while True:
            try:
                line = await reader.readline()
            except ValueError:  # longer than MAX_LINE: the client checks, so not one of ours
                relay.send(ErrorReply(f"a request longer than {MAX_LINE} bytes").to_json())
                return
            if not line:
                return
            try:
                request = json.loads(line)
            except ValueError:
                relay.send({"error": "not JSON"})
                continue
            relay.handle(request)
    finally:
        relay.close()
        with contextlib.suppress(Exception):
            await writer.drain()
            writer.close()


class _Relay:
    def __init__(self, supervisor: Supervisor, writer: Any) -> None:
        self.supervisor = supervisor
        self.writer = writer
        self.client: Any = None  # the QMPClient this session's listeners are on
        self.listeners: dict[int, tuple[Any, asyncio.Task[None]]] = {}
        self.commands: set[asyncio.Task[None]] = set()

    async def wait_connection(self) -> bool:
        self.client = await self.supervisor.qmp_connection(CONNECTION_WAIT)
        return self.client is not None

    def send(self, message: dict[str, Any]) -> None:
        with contextlib.suppress(Exception):  # the client went away: nothing to tell
            self.writer.write(json.dumps(message).encode() + b"\n")

    def handle(self, request: dict[str, Any]) -> None:
        request_id = request.get("id")
        if "execute" in request:
            task = asyncio.create_task(self._execute(request))
            self.commands.add(task)
            task.add_done_callback(self.commands.discard)
        elif "listen" in request:
            self._listen(request_id, request["listen"])
        elif "unlisten" in request:
            self._unlisten(request["unlisten"])
            self.send({"id": request_id, "return": {}})
        else:
            self.send({"id": request_id, "error": {"class": "qvm", "desc": "unknown request"}})

    async def _execute(self, request: dict[str, Any]) -> None:
        request_id = request.get("id")
        client = self.supervisor.qmp
        if client is None or client is not self.client:
            self.send({"id": request_id, "gone": True})  # QEMU ended (or was restarted)
            return
        deadline = request.get("deadline")
        if isinstance(deadline, (int, float)) and time.time() > deadline:
            # the supervisor was stopped or stuck while this waited: its user has been
            # told it timed out, so it must not reach QEMU now
            self.send({"id": request_id, "expired": True})
            return
        timeout = float(request.get("timeout") or DEFAULT_COMMAND_TIMEOUT)
        try:
            result = await asyncio.wait_for(
                client.execute(request["execute"], request.get("arguments")), timeout
            )
        except TimeoutError:
            self.send({"id": request_id, "timeout": True})
        except ExecuteError as exc:
            error = exc.error.error
            self.send({"id": request_id, "error": {"class": error.class_, "desc": error.desc}})
        except Exception:  # noqa: BLE001 - the connection ended: QEMU exited or crashed
            self.send({"id": request_id, "gone": True})
        else:
            self.send({"id": request_id, "return": result})

    def _listen(self, listener_id: int, names: list[str] | None) -> None:
        listener = EventListener(names)
        self.client.register_listener(listener)
        task = asyncio.create_task(self._forward(listener_id, listener))
        self.listeners[listener_id] = (listener, task)
        self.send({"id": listener_id, "return": {}})

    async def _forward(self, listener_id: int, listener: Any) -> None:
        while True:
            event = await listener.get()
            self.send({"listener": listener_id, "event": dict(event)})

    def _unlisten(self, listener_id: int) -> None:
        listener, task = self.listeners.pop(listener_id, (None, None))
        if task is not None:
            task.cancel()
        if listener is not None:
            with contextlib.suppress(Exception):  # already gone with its connection
                self.client.remove_listener(listener)

    def close(self) -> None:
        for listener_id in list(self.listeners):
            self._unlisten(listener_id)
        for task in self.commands:
            task.cancel()
