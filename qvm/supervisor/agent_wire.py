"""The guest agent's protocol (QEMU's QGA over a stream socket), written once for both
ends of qvm that speak it: ``qvm.control.agent`` (every qvm command, through the
supervisor's ``agent.sock``) and ``qvm.supervisor.agent_shutdown`` (`qvm down`'s
``guest-shutdown``, in the supervisor itself).

QEMU's end of the channel serves one client at a time and the agent answers in order
with nothing to tie a reply to its request, so:

- every client holds an flock on ``agent.lock`` for as long as it is connected
  (``take_agent_lock``): they take turns, never interleave;
- each connection starts by resynchronising with ``guest-sync-delimited``: a 0xFF byte
  first, which the agent's JSON parser rejects, so that it drops any half-sent request
  (its error reply is discarded with the rest); then the sync request with a random id,
  whose reply the agent prefixes with a 0xFF byte. Everything before that byte, and any
  sync reply with another id (a late answer to an earlier client), is discarded. After a
  command timed out the client resynchronises the same way before its next command,
  since the late reply may still come.

Blocking socket code, stdlib only and without pathlib (the supervisor imports it).
Errors are ``qvm.errors``' agent classes, each one line naming the VM.
"""

from __future__ import annotations

import contextlib
import json
import os
import socket
import time
from collections.abc import Iterator, Sequence

from qvm.base.checking import TYPE_CHECKING
from qvm.base.record import Record
from qvm.errors import AgentCommandError, AgentError, AgentNotAnswering
from qvm.layout.locks import try_lock
from qvm.layout.runfiles import AGENT_LOCK, AGENT_SOCKET, RunFiles

if TYPE_CHECKING:
    from typing import Any

SENTINEL = b"\xff"
DEFAULT_TIMEOUT = 10.0  # seconds per command
SYNC_TIMEOUT = 5.0  # seconds for the agent to answer guest-sync-delimited
CONNECT_TIMEOUT = 5.0
MAX_LINE = 64 * 1024**2  # a guest-exec-status or guest-file-read reply carries base64 data
RECV_SIZE = 1024**2


@contextlib.contextmanager
def held_agent(run: RunFiles, lock_timeout: float, timeout: float) -> Iterator[AgentClient | None]:
    """The supervisor's own client of ``agent.sock`` under ``agent.lock``, not yet
    synchronised; None when another client held the lock for ``lock_timeout`` s (without
    a lock file, it goes on without the lock: QEMU is what matters). OSError: no channel."""
    try:
        lock = take_agent_lock(run.file(AGENT_LOCK), lock_timeout)
    except OSError:
        lock = -1
    if lock is None:
        yield None
        return
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC) as sock:
            sock.settimeout(timeout)
            sock.connect(run.file(AGENT_SOCKET))
            yield AgentClient(sock, os.path.basename(run.path))
    finally:
        if lock >= 0:
            os.close(lock)


def take_agent_lock(path: str, timeout: float) -> int | None:
    """The flock on ``agent.lock`` (its fd), waited for up to ``timeout`` s; None when
    another client held it all that time. OSError when the file cannot be opened."""
    deadline = time.monotonic() + timeout
    while True:
        fd = try_lock(path)
        if fd is not None:
            return fd
        if time.monotonic() >= deadline:
            return None
        time.sleep(0.05)


class AgentCommand(Record):
    name: str
    enabled: bool
    success_response: bool


class AgentInfo(Record):
    """``guest-info``: the agent's version and the commands it knows."""

    version: str
    commands: tuple[AgentCommand, ...]

    @classmethod
    def from_reply(cls, data: Any, source: str) -> AgentInfo:
        if not isinstance(data, dict) or not isinstance(data.get("version"), str):
            raise AgentError(f"{source}: guest-info: unexpected reply {_short(data)}")
        commands = []
        for item in data.get("supported_commands") or []:
            if isinstance(item, dict) and isinstance(item.get("name"), str):
                commands.append(
                    AgentCommand(
                        item["name"],
                        bool(item.get("enabled", True)),
                        bool(item.get("success-response", True)),
                    )
                )
        return cls(data["version"], tuple(commands))

    def enabled(self) -> list[str]:
        return sorted(c.name for c in self.commands if c.enabled)

    def supports(self, command: str) -> bool:
        return any(c.name == command and c.enabled for c in self.commands)

    def to_json(self) -> dict[str, Any]:
        return {
            "version": self.version,
            "commands": self.enabled(),
            "disabled_commands": sorted(c.name for c in self.commands if not c.enabled),
        }


def _message(command: str, arguments: dict[str, Any] | None) -> bytes:
    message: dict[str, Any] = {"execute": command}
    if arguments:
        message["arguments"] = arguments
    return json.dumps(message).encode() + b"\n"


def _short(data: Any, limit: int = 200) -> str:
    text = json.dumps(data) if not isinstance(data, bytes) else repr(data)
    return text if len(text) <= limit else text[: limit - 3] + "..."


class AgentClient:
    """One connection to the agent. Not thread-safe; use it through ``open_agent``, which
    holds the lock, or directly on a socket in tests."""

    def __init__(self, sock: socket.socket, name: str) -> None:
        self._sock = sock
        self.name = name  # the VM's, for messages
        self._buffer = bytearray()
        self._synced = False
        # (id, deadline, timeout) of a resync sent and not yet answered
        self._pending_sync: tuple[int, float, float] | None = None

    def close(self) -> None:
        self._sock.close()

    # --- commands ------------------------------------------------------------------------

    def execute(
        self, command: str, arguments: dict[str, Any] | None = None, timeout: float | None = None
    ) -> Any:
        """Run ``command``; return its ``return`` value, or raise AgentCommandError with the
        agent's own message, or AgentNotAnswering after ``timeout`` seconds."""
        self._ensure_synced()
        self._send(command, arguments)
        seconds = DEFAULT_TIMEOUT if timeout is None else timeout
        deadline = time.monotonic() + seconds
        self._synced = False  # until the reply is in: a late one would be taken for the next
        line = self._read_line(deadline, f"{command} (no reply within {seconds:g} s)")
        reply = self._decode(line, command)
        self._synced = True
        return self._result(reply, command)

    def execute_batch(
        self, commands: Sequence[tuple[str, dict[str, Any] | None]], timeout: float | None = None
    ) -> list[Any]:
        """Send ``commands`` at once (behind a pending resync, if any) and read their
        replies in order: one round trip through the guest instead of one per command,
        which under TCG is 5-30 ms each. Each result is the command's ``return`` value, or
        its AgentCommandError, or AgentNotAnswering for it and every later one when a reply
        does not come within ``timeout`` seconds (per reply). A resync that gets no answer
        raises AgentNotAnswering. Batch only commands that may run even then: the agent
        carries them out whoever reads the replies."""
        if not self._synced and self._pending_sync is None:
            self.begin_sync()
        self._write(b"".join(_message(command, arguments) for command, arguments in commands))
        if self._pending_sync is not None:
            self.finish_sync()
        self._synced = False  # until every reply is in
        seconds = DEFAULT_TIMEOUT if timeout is None else timeout
        results: list[Any] = []
        silent: AgentNotAnswering | None = None
        for command, _ in commands:
            if silent is not None:
                results.append(silent)
                continue
            try:
                line = self._read_line(
                    time.monotonic() + seconds, f"{command} (no reply within {seconds:g} s)"
                )
                results.append(self._result(self._decode(line, command), command))
            except AgentCommandError as error:
                results.append(error)
            except AgentNotAnswering as error:
                silent = error
                results.append(error)
        self._synced = silent is None
        return results

    def send(
        self, command: str, arguments: dict[str, Any] | None = None, error_wait: float = 0.0
    ) -> None:
        """Send a command that has no reply on success (``guest-shutdown``,
        ``guest-suspend-*``); the connection must be resynchronised before the next one.
        With ``error_wait``, an error reply that comes within that many seconds raises
        AgentCommandError (the agent answers such a command only when it fails)."""
        self._ensure_synced()
        self._send(command, arguments)
        self._synced = False
        if error_wait <= 0:
            return
        try:
            line = self._read_line(time.monotonic() + error_wait, command)
            reply = self._decode(line.lstrip(SENTINEL), command)
        except AgentError:  # nothing that soon: taken (or the channel went with the guest)
            return
        self._result(reply, command)

    def ping(self, timeout: float | None = None) -> None:
        self.execute("guest-ping", timeout=timeout)

    def info(self, timeout: float | None = None) -> AgentInfo:
        return AgentInfo.from_reply(self.execute("guest-info", timeout=timeout), self.name)

    # --- resynchronising --------------------------------------------------------------

    def sync(self, timeout: float = SYNC_TIMEOUT) -> None:
        """Resynchronise with ``guest-sync-delimited`` (see the module's docstring)."""
        self.begin_sync(timeout)
        self.finish_sync()

    def begin_sync(self, timeout: float = SYNC_TIMEOUT) -> None:
        """Send the resync request; its reply is awaited by ``finish_sync``, or by the next
        command, which may then travel in the same round trip."""
        # 1 to 2**31 - 1, from os.urandom: the random module (with hashlib's sha512 and
        # bisect) would be ~0.1 MiB of the supervisor, which holds this channel
        sync_id = int.from_bytes(os.urandom(4), "little") % (2**31 - 1) + 1
        self._buffer.clear()
        self._synced = False
        message = {"execute": "guest-sync-delimited", "arguments": {"id": sync_id}}
        self._write(SENTINEL + json.dumps(message).encode() + b"\n")
        self._pending_sync = (sync_id, time.monotonic() + timeout, timeout)

    def finish_sync(self) -> None:
        assert self._pending_sync is not None
        sync_id, deadline, timeout = self._pending_sync
        self._pending_sync = None
        what = f"guest-sync-delimited (no reply within {timeout:g} s)"
        while True:
            self._skip_to_sentinel(deadline, what)
            line = self._read_line(deadline, what)
            try:
                reply = json.loads(line)
            except ValueError:
                continue  # garbage after a stray 0xFF: look for the next one
            if isinstance(reply, dict) and reply.get("return") == sync_id:
                self._synced = True
                return
            # a sync reply for an earlier client, or an error: keep looking

    def _ensure_synced(self) -> None:
        if self._pending_sync is not None:
            self.finish_sync()
        elif not self._synced:
            self.sync()

    # --- the wire ----------------------------------------------------------------------------

    def _send(self, command: str, arguments: dict[str, Any] | None) -> None:
        self._write(_message(command, arguments))

    def _write(self, data: bytes) -> None:
        try:
            self._sock.settimeout(CONNECT_TIMEOUT)
            self._sock.sendall(data)
        except TimeoutError:
            raise AgentNotAnswering(
                f"{self.name}: guest agent not answering: the channel takes no input"
                f" {_hint(self.name)}"
            ) from None
        except OSError as error:
            raise self._closed(error) from None

    def _fill(self, deadline: float, what: str) -> None:
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            raise AgentNotAnswering(
                f"{self.name}: guest agent not answering: {what} {_hint(self.name)}"
            )
        try:
            self._sock.settimeout(remaining)
            data = self._sock.recv(RECV_SIZE)
        except TimeoutError:
            raise AgentNotAnswering(
                f"{self.name}: guest agent not answering: {what} {_hint(self.name)}"
            ) from None
        except OSError as error:
            raise self._closed(error) from None
        if not data:
            raise self._closed(None)
        self._buffer += data

    def _skip_to_sentinel(self, deadline: float, what: str) -> None:
        while True:
            index = self._buffer.find(SENTINEL)
            if index >= 0:
                del self._buffer[: index + 1]
                return
            self._buffer.clear()
            self._fill(deadline, what)

    def _read_line(self, deadline: float, what: str) -> bytes:
        scanned = 0  # a reply with output or file data is megabytes: search each byte once
        while True:
            index = self._buffer.find(b"\n", scanned)
            if index >= 0:
                line = bytes(self._buffer[:index])
                del self._buffer[: index + 1]
                scanned = 0
                if line.strip():
                    return line
                continue
            scanned = len(self._buffer)
            if scanned > MAX_LINE:
                raise AgentError(f"{self.name}: guest agent: a reply longer than {MAX_LINE} bytes")
            self._fill(deadline, what)

    def _decode(self, line: bytes, command: str) -> dict[str, Any]:
        try:
            reply = json.loads(line)
        except ValueError:
            reply = None
        if not isinstance(reply, dict) or not ("return" in reply or "error" in reply):
            raise AgentError(f"{self.name}: guest agent: {command}: not a reply: {_short(line)}")
        return reply

    def _result(self, reply: dict[str, Any], command: str) -> Any:
        if "error" in reply:
            error = reply["error"] if isinstance(reply["error"], dict) else {}
            agent_class = str(error.get("class", "GenericError"))
            desc = " ".join(str(error.get("desc", "unknown error")).split())
            raise AgentCommandError(
                f"{self.name}: guest agent: {command}: {desc}", agent_class, desc
            )
        return reply["return"]

    def _closed(self, error: OSError | None) -> AgentError:
        why = f": {error.strerror or error}" if error is not None else ""
        return AgentError(f"{self.name}: guest agent channel closed{why} (did QEMU exit?)")


def _hint(name: str) -> str:
    return (
        "(hint: is qemu-ga running in the guest? it starts late in boot: "
        f"qvm wait {name} --for agent)"
    )
