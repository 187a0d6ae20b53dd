"""A synchronous QMP session for qvm's own commands, run by the VM's supervisor.

The supervisor already holds a ``qemu.qmp`` connection that sees every event; a
``ControlSession`` sends it commands and listens to events through ``supervisor.sock``
(``qvm.supervisor.relay`` is the other end), in plain JSON lines with timeouts, so a command like
``qvm cpu del`` never imports asyncio or qemu.qmp itself (~55 ms). The session holds an
flock on ``control.lock`` while open, so that qvm commands on one VM take turns: two
``cpu add`` must not both pick the same free slot.

Errors, all naming the VM::

    NotRunningError     no supervisor, or no QEMU under it: nothing to talk to
    QmpTimeoutError     QEMU did not answer a command (or the lock was not free) in time
    ControlError        QEMU refused a command: ``str()`` carries QEMU's own message, and
                        ``qemu_class``/``qemu_desc`` its error class and text; or QEMU
                        went away during a command (``qemu_exited`` is True)
"""

from __future__ import annotations

import collections
import contextlib
import json
import os
import socket
import time
from collections.abc import Callable, Iterable, Iterator
from typing import Any

from qvm.errors import ControlError, NotRunningError, QmpTimeoutError, RecordError
from qvm.layout.locks import try_lock
from qvm.layout.rundir import RunDir
from qvm.store.state import read_state
from qvm.supervisor import wire
from qvm.supervisor.client import connect_supervisor, supervisor_alive

DEFAULT_TIMEOUT = 10.0  # seconds per QMP command
CONNECT_TIMEOUT = 5.0
LOCK_TIMEOUT = 60.0  # another qvm command may be waiting for a slow guest
# after QEMU dropped the connection, how long to wait for the supervisor's exit record
EXIT_RECORD_WAIT = 3.0


def parse_kv_args(pairs: Iterable[str]) -> dict[str, Any]:
    """``["id=cpu1", "core-id=1", 'x={"a":1}']`` -> arguments for a QMP command.

    Values are JSON where they parse as JSON (numbers, true/false/null, objects,
    lists, quoted strings) and plain strings otherwise.
    """
    arguments: dict[str, Any] = {}
    for pair in pairs:
        key, sep, raw = pair.partition("=")
        if not sep or not key:
            raise ValueError(f"expected key=value, got {pair!r}")
        try:
            value: Any = json.loads(raw)
        except ValueError:
            value = raw
        arguments[key] = value
    return arguments


class EventStream:
    """Events of some names, collected from the moment ``ControlSession.listen`` opened it."""

    def __init__(self, session: ControlSession, listener_id: int) -> None:
        self._session = session
        self._listener_id = listener_id
        self.closed = False

    def get(self, timeout: float) -> dict[str, Any] | None:
        """The next event, or None if none arrived within ``timeout`` seconds."""
        return self._session._next_event(self._listener_id, timeout)

    def wait(
        self, accept: Callable[[dict[str, Any]], bool], deadline: float
    ) -> dict[str, Any] | None:
        """The first event ``accept`` likes before ``deadline`` (``time.monotonic()``), or
        None; the others are dropped."""
        while True:
            event = self.get(max(deadline - time.monotonic(), 0.0))
            if event is None:
                if time.monotonic() >= deadline:
                    return None
                continue
            if accept(event):
                return event

    def close(self) -> None:
        if not self.closed:
            self.closed = True
            self._session._unlisten(self._listener_id)


class ControlSession:
    """One control session with a VM, through its supervisor, used as a context manager."""

    def __init__(
        self,
        run: RunDir,
        timeout: float = DEFAULT_TIMEOUT,
        lock_timeout: float = LOCK_TIMEOUT,
    ) -> None:
        self.run = run
        self.name = run.name
        self.timeout = timeout
        self.lock_timeout = lock_timeout
        self._lock_fd: int | None = None
        self._sock: socket.socket | None = None
        self._buffer = bytearray()
        self._next_id = 0
        self._events: dict[int, collections.deque[dict[str, Any]]] = {}
        self._source = f"{self.name}: supervisor reply"

    # --- opening and closing -----------------------------------------------------------

    def __enter__(self) -> ControlSession:
        self.open()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def open(self) -> None:
        if not supervisor_alive(self.run):
            raise NotRunningError(self.name)
        self._take_lock()
        try:
            self._connect()
        except BaseException:
            self.close()
            raise

    def _take_lock(self) -> None:
        deadline = time.monotonic() + self.lock_timeout
        while True:
            fd = try_lock(self.run.control_lock_file)
            if fd is not None:
                self._lock_fd = fd
                return
            if time.monotonic() > deadline:
                raise QmpTimeoutError(
                    f"{self.name}: another qvm command has held the control session for "
                    f"{self.lock_timeout:g} s (hint: wait for it, or see 'qvm status {self.name}')"
                )
            time.sleep(0.01)

    def _connect(self) -> None:
        deadline = time.monotonic() + CONNECT_TIMEOUT
        try:
            self._sock = connect_supervisor(self.run, deadline)
        except OSError as exc:
            raise NotRunningError(self.name) from exc
        request = wire.ControlRequest()
        self._send(request)
        try:
            line = self._read_line(deadline)
        except EOFError as exc:  # the supervisor went away as we came
            raise NotRunningError(self.name) from exc
        if line is None:
            raise QmpTimeoutError(
                f"{self.name}: the supervisor did not open a control session within "
                f"{CONNECT_TIMEOUT:g} s (hint: qvm status {self.name})"
            )
        if isinstance(wire.decode_reply(request, line, self._source), wire.ErrorReply):
            raise NotRunningError(self.name)  # the supervisor has no QEMU to talk to

    def close(self) -> None:
        if self._sock is not None:
            self._sock.close()
            self._sock = None
        if self._lock_fd is not None:
            os.close(self._lock_fd)
            self._lock_fd = None

    # --- the line protocol (qvm.supervisor.relay is the other end) -----------------------

    def _send(
        self,
        message: wire.ControlRequest | wire.RelayExecute | wire.RelayListen | wire.RelayUnlisten,
    ) -> None:
        assert self._sock is not None, "session is not open"
        line = wire.encode(message.to_json())
        if len(line) > wire.MAX_LINE:
            raise ControlError(
                f"{self.name}: a QMP request of {len(line)} bytes: QEMU takes at most "
                f"{wire.MAX_LINE} bytes in one message"
            )
        # if the supervisor went away, reading the reply says so
        with contextlib.suppress(OSError):
            self._sock.sendall(line)

    def _read_message(self, deadline: float) -> wire.RelayReply | wire.RelayEvent | None:
        """The next message, None when the deadline passed; EOFError when the supervisor
        closed the session (QEMU and its supervisor ended); RecordError if it is not one
        of the relay's."""
        line = self._read_line(deadline)
        return None if line is None else wire.decode_relay_message(line, self._source)

    def _read_line(self, deadline: float) -> bytes | None:
        assert self._sock is not None, "session is not open"
        searched = 0
        while (end := self._buffer.find(b"\n", searched)) < 0:
            searched = len(self._buffer)
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                return None
            self._sock.settimeout(remaining)
            try:
                chunk = self._sock.recv(65536)
            except TimeoutError:
                return None
            except OSError as exc:
                raise EOFError from exc
            if not chunk:
                raise EOFError
            self._buffer += chunk
        line = bytes(self._buffer[:end])
        del self._buffer[: end + 1]
        return line

    def _new_id(self) -> int:
        self._next_id += 1
        return self._next_id

    def _request(
        self, request: wire.RelayExecute | wire.RelayListen, wait: float
    ) -> wire.RelayReply | None:
        """Send one request; its reply, or None if none came within ``wait`` seconds.
        Events that arrive meanwhile are kept for their listeners."""
        self._send(request)
        deadline = time.monotonic() + wait
        while True:
            reply = self._read_message(deadline)
            if reply is None:
                return None
            if isinstance(reply, wire.RelayEvent):
                self._keep_event(reply)
            elif reply.id == request.id:
                return reply
            # else: the late reply to a command we stopped waiting for

    def _keep_event(self, message: wire.RelayEvent) -> None:
        queue = self._events.get(message.listener)
        if queue is not None:
            queue.append(message.event)

    # --- commands and events -----------------------------------------------------------

    def execute(
        self, command: str, arguments: dict[str, Any] | None = None, timeout: float | None = None
    ) -> Any:
        """Run one QMP command and return its ``return`` value."""
        limit = self.timeout if timeout is None else timeout
        # past the deadline the supervisor does not send it: we have stopped waiting
        request = wire.RelayExecute(self._new_id(), command, arguments, limit, time.time() + limit)
        try:
            # a little longer than the supervisor's own limit, whose answer is clearer
            reply = self._request(request, limit + 1.0)
        except EOFError as exc:
            raise self._gone(command) from exc
        if reply is None or isinstance(reply, (wire.RelayTimedOut, wire.RelayExpired)):
            raise QmpTimeoutError(
                f"{self.name}: QEMU did not answer {command} within {limit:g} s "
                f"(hint: qvm status {self.name})"
            )
        if isinstance(reply, wire.RelayRefused):
            raise ControlError(
                f"{self.name}: {command}: {reply.desc}",
                qemu_class=reply.error_class,
                qemu_desc=reply.desc,
            )
        if isinstance(reply, wire.RelayGone):
            raise self._gone(command)
        return reply.value

    def _gone(self, command: str) -> ControlError:
        how = describe_exit(self.run)
        return ControlError(
            f"{self.name}: QEMU went away during {command}: {how} "
            f"(hint: qvm status {self.name}; qvm logs {self.name} --qemu)",
            qemu_exited=True,
        )

    @contextlib.contextmanager
    def listen(self, names: Iterable[str] | None = None) -> Iterator[EventStream]:
        """Collect events from now (before sending the command they answer) until the
        ``with`` block ends: ``with session.listen(NAMES) as events: ...``."""
        request = wire.RelayListen(self._new_id(), tuple(names) if names is not None else None)
        try:
            reply = self._request(request, self.timeout)
        except EOFError as exc:
            raise self._gone("listen") from exc
        if not isinstance(reply, wire.RelayReturn):
            raise QmpTimeoutError(f"{self.name}: the supervisor did not start listening")
        listener_id = request.id
        self._events[listener_id] = collections.deque()
        events = EventStream(self, listener_id)
        try:
            yield events
        finally:
            events.close()

    def _next_event(self, listener_id: int, timeout: float) -> dict[str, Any] | None:
        queue = self._events[listener_id]
        deadline = time.monotonic() + timeout
        while not queue:
            try:
                message = self._read_message(deadline)
            except EOFError:
                return None  # QEMU ended: no more events; the caller's next command says so
            if message is None:
                return None
            if isinstance(message, wire.RelayEvent):
                self._keep_event(message)
        return queue.popleft()

    def _unlisten(self, listener_id: int) -> None:
        self._events.pop(listener_id, None)
        if self._sock is not None:
            self._send(wire.RelayUnlisten(self._new_id(), listener_id))


def describe_exit(run: RunDir, wait: float = EXIT_RECORD_WAIT) -> str:
    """How QEMU ended, from the supervisor's record (waiting briefly for it to appear)."""
    deadline = time.monotonic() + wait
    while True:
        try:
            state = read_state(run.state_file)
        except RecordError as error:
            return f"the connection closed, and {error}"
        ended = state.exit if state is not None else None
        ended_now = state is not None and state.state in ("crashed", "stopped", "restarting")
        if ended_now and ended is not None and ended.reason:
            return f"QEMU {'crashed' if ended.failed else 'exited'} ({ended.reason})"
        if time.monotonic() > deadline:
            return "the connection closed"
        time.sleep(0.05)
