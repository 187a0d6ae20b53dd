"""A small synchronous facade over ``qemu.qmp.QMPClient`` for qvm's own commands.

The CLI is synchronous; QMPClient is asyncio. A ``ControlSession`` owns a private event
loop and runs each call to completion on it with a timeout, so callers never see a
coroutine. It talks to the run dir's ``control.sock`` (a monitor reserved for qvm) and
holds an flock on ``control.lock`` while connected: a QMP socket serves one client at a
time, so concurrent qvm commands on one VM queue instead of colliding.

Errors, all naming the VM::

    NotRunningError     no supervisor (or no control socket): nothing to talk to
    QmpTimeoutError     QEMU did not answer a command (or the lock was not free) in time
    ControlError        QEMU refused a command: ``str()`` carries QEMU's own message, and
                        ``qemu_class``/``qemu_desc`` its error class and text; or QEMU
                        went away during a command (``qemu_exited`` is True)

asyncio and qemu.qmp are imported only when a session opens: ``qvm status`` and the
other lifecycle commands never pay for them.
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Callable, Iterable
from typing import Any

from qvm.errors import ControlError, NotRunningError, QmpTimeoutError
from qvm.rundir import RunDir, read_json, try_lock

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

    def __init__(self, session: ControlSession, listener: Any) -> None:
        self._session = session
        self._listener = listener
        self.closed = False

    def get(self, timeout: float) -> dict[str, Any] | None:
        """The next event, or None if none arrived within ``timeout`` seconds."""
        import asyncio

        if timeout <= 0 and self._listener.empty():
            timeout = 0.001  # still give the reader a chance to run
        try:
            event = self._session._run(asyncio.wait_for(self._listener.get(), timeout))
        except TimeoutError:
            return None
        return dict(event)

    def wait(
        self, accept: Callable[[dict[str, Any]], bool], timeout: float
    ) -> dict[str, Any] | None:
        """The first event ``accept`` likes within ``timeout`` seconds (others are dropped)."""
        deadline = time.monotonic() + timeout
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
            self._session._remove_listener(self._listener)


class ControlSession:
    """One connection to a VM's control monitor, used as a context manager."""

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
        self._loop: Any = None
        self._client: Any = None

    # --- opening and closing -----------------------------------------------------------

    def __enter__(self) -> ControlSession:
        self.open()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def open(self) -> None:
        from qvm.lifecycle import supervisor_alive

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
                    f"{self.name}: another qvm command has held the control monitor for "
                    f"{self.lock_timeout:g} s (hint: wait for it, or see 'qvm status {self.name}')"
                )
            time.sleep(0.01)

    def _connect(self) -> None:
        import asyncio
        import logging

        from qemu.qmp import QMPClient

        if not os.environ.get("QVM_DEBUG"):
            # a QEMU that dies mid-command makes qemu.qmp log tracebacks: we report it
            # ourselves, in one line
            logger = logging.getLogger("qemu.qmp")
            logger.propagate = False
            if not logger.handlers:
                logger.addHandler(logging.NullHandler())
        self._loop = asyncio.new_event_loop()
        self._loop.set_exception_handler(lambda loop, context: None)
        self._client = QMPClient(self.name)
        deadline = time.monotonic() + CONNECT_TIMEOUT
        while True:
            remaining = deadline - time.monotonic()
            try:
                connecting = self._client.connect(str(self.run.control_socket))
                self._run(asyncio.wait_for(connecting, remaining))
                return
            except TimeoutError as exc:
                raise QmpTimeoutError(
                    f"{self.name}: QEMU's control monitor did not answer within "
                    f"{CONNECT_TIMEOUT:g} s (hint: qvm status {self.name})"
                ) from exc
            except Exception as exc:  # noqa: BLE001 - QEMU may still be creating the socket
                from qvm.lifecycle import supervisor_alive

                if not supervisor_alive(self.run):
                    raise NotRunningError(self.name) from exc
                if time.monotonic() >= deadline:
                    raise ControlError(
                        f"{self.name}: cannot connect to {self.run.control_socket}: {exc}"
                    ) from exc
                self._client = QMPClient(self.name)
                time.sleep(0.02)

    def close(self) -> None:
        import contextlib

        if self._client is not None and self._loop is not None:
            # the connection may already be gone with QEMU: nothing to report then
            with contextlib.suppress(Exception):
                self._run(self._client.disconnect())
        self._client = None
        if self._loop is not None:
            self._loop.close()
            self._loop = None
        if self._lock_fd is not None:
            os.close(self._lock_fd)
            self._lock_fd = None

    # --- commands and events -----------------------------------------------------------

    def _run(self, coro: Any) -> Any:
        return self._loop.run_until_complete(coro)

    def execute(
        self, command: str, arguments: dict[str, Any] | None = None, timeout: float | None = None
    ) -> Any:
        """Run one QMP command and return its ``return`` value."""
        import asyncio

        from qemu.qmp import ExecuteError

        limit = self.timeout if timeout is None else timeout
        try:
            return self._run(asyncio.wait_for(self._client.execute(command, arguments), limit))
        except TimeoutError as exc:
            raise QmpTimeoutError(
                f"{self.name}: QEMU did not answer {command} within {limit:g} s "
                f"(hint: qvm status {self.name})"
            ) from exc
        except ExecuteError as exc:
            desc = exc.error.error.desc
            raise ControlError(
                f"{self.name}: {command}: {desc}",
                qemu_class=exc.error.error.class_,
                qemu_desc=desc,
            ) from exc
        except Exception as exc:  # noqa: BLE001 - the connection ended: QEMU exited or crashed
            raise self._gone(command, exc) from exc

    def _gone(self, command: str, exc: BaseException) -> ControlError:
        how = describe_exit(self.run)
        return ControlError(
            f"{self.name}: QEMU went away during {command}: {how} "
            f"(hint: qvm status {self.name}; qvm logs {self.name} --qemu)",
            qemu_exited=True,
        )

    def listen(self, names: Iterable[str] | None = None) -> EventStream:
        """Start collecting events now (before sending the command they answer)."""
        from qemu.qmp import EventListener

        listener = EventListener(list(names) if names is not None else None)
        self._client.register_listener(listener)
        return EventStream(self, listener)

    def _remove_listener(self, listener: Any) -> None:
        if self._client is not None:
            import contextlib

            with contextlib.suppress(Exception):
                self._client.remove_listener(listener)


def describe_exit(run: RunDir, wait: float = EXIT_RECORD_WAIT) -> str:
    """How QEMU ended, from the supervisor's record (waiting briefly for it to appear)."""
    deadline = time.monotonic() + wait
    while True:
        state = read_json(run.state_file) or {}
        ended = state.get("exit") or {}
        if state.get("state") in ("crashed", "stopped", "restarting") and ended.get("reason"):
            verb = "crashed" if ended.get("failed") else "exited"
            return f"QEMU {verb} ({ended['reason']})"
        if time.monotonic() > deadline:
            return "the connection closed"
        time.sleep(0.05)
