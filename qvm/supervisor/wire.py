"""The supervisor's protocol, shared by both ends: one JSON line each way on
``supervisor.sock``. The client (``qvm.supervisor.client.ask_supervisor``, and the control
handshake of ``qvm.control.session``) and the server (``qvm.supervisor.process``,
``qvm.supervisor.relay``) encode and decode every message here, into typed records, so a
renamed key fails in a unit test, and a malformed message is a ``RecordError`` naming its
VM, never a ``KeyError``.

Requests, and the reply each one gets (or ``{"error": TEXT}``, an ``ErrorReply``)::

    {"op": "status"}                              -> StatusReply: state.json's keys, with
                                                     the live state and QEMU's facts
    {"op": "stop", "timeout": 30, "force": false} -> EndReply {"ended_by": ...}
    {"op": "kill"}                                -> EndReply
    {"op": "control"}                             -> ControlReady {"ready": true}, then
                                                     the relay's lines (qvm.supervisor.relay)

``stop`` and ``kill`` may carry ``"deadline": T`` (``time.time()``, both ends on one
host) and ``"ack": true``: the supervisor refuses a request read after T (a request the
user was told had timed out is never carried out later, e.g. after a SIGSTOP ends), and
otherwise answers ``{"accepted": true}`` at once, before the reply proper, so that a
client can tell a supervisor that is working from one that does not answer at all.

The lines keep the keys of earlier qvm versions: a supervisor started by one still
answers the next. Stdlib only (with ``qvm.store``): the spawn code reads ``LineReader``
before asyncio exists.
"""

from __future__ import annotations

import json

from qvm.base.checking import TYPE_CHECKING
from qvm.base.record import Record
from qvm.errors import RecordError
from qvm.store.fields import Fields
from qvm.store.state import StateRecord

if TYPE_CHECKING:
    import socket
    from typing import Any, Protocol, TypeVar

    _Reply = TypeVar("_Reply", covariant=True)

REQUEST_SOURCE = "supervisor request"
REPLY_HINT = "is the supervisor from another qvm version? qvm kill ends it"
# QEMU's own limit for one JSON token (MAX_TOKEN_SIZE in its JSON lexer): a QMP request
# or reply as large as QEMU takes must pass the relay whole; a longer line is not ours
MAX_LINE = 64 * 1024**2
ENDINGS = ("acpi", "agent", "quit", "kill")
# the start of the error a supervisor gives a request it read after the request's deadline
EXPIRED = "request expired"  # how a stop ended QEMU, gentlest first


class LineReader:
    """Newline-terminated messages from a socket, in order: a recv may carry the end of one
    message and the start of the next (an "accepted" and the reply right after it)."""

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        self.buffer = bytearray()

    def line(self) -> bytes:
        """The next message with its newline, or what came before the peer closed."""
        searched = 0
        while (end := self.buffer.find(b"\n", searched)) < 0:
            searched = len(self.buffer)
            chunk = self.sock.recv(65536)
            if not chunk:
                end = len(self.buffer) - 1
                break
            self.buffer += chunk
        data = bytes(self.buffer[: end + 1])
        del self.buffer[: end + 1]
        return data


def encode(message: dict[str, Any]) -> bytes:
    return json.dumps(message).encode() + b"\n"


def decode(line: bytes, source: str, hint: str | None = None) -> Fields:
    """One line as the fields of a JSON object; anything else is a RecordError."""
    if not line.strip():
        raise RecordError(source, "", "empty (the other end closed without a word)", hint)
    if len(line) > MAX_LINE:
        raise RecordError(source, "", f"longer than {MAX_LINE} bytes", hint)
    try:
        data = json.loads(line)
    except (ValueError, RecursionError) as error:
        raise RecordError(source, "", f"not valid JSON ({error})", hint) from error
    return Fields(data, source, hint)


# --- replies -------------------------------------------------------------------------


class ErrorReply(Record):
    """The supervisor could not serve the request; ``error`` says why."""

    error: str

    def to_json(self) -> dict[str, Any]:
        return {"error": self.error}


class StatusReply(Record):
    """The supervisor's state record, its ``state`` the live one, and what QEMU said
    (each None when QEMU did not run or did not answer)."""

    record: StateRecord
    runstate: str | None = None  # QEMU's own word: "running", "paused", "internal-error"...
    vcpus_present: int | None = None
    memory_bytes: int | None = None
    rss_bytes: int | None = None
    cpu_percent: float | None = None
    qmp_error: str | None = None  # why QEMU's facts are missing

    @classmethod
    def read(cls, f: Fields) -> StatusReply:
        return f.declared(cls, record=StateRecord.from_json(f.data, f.source, f.hint))

    def to_json(self) -> dict[str, Any]:
        facts = {key: value for key, value in self._asdict().items() if value is not None}
        del facts["record"]
        return {**self.record.to_json(), **facts}


class EndReply(Record):
    """How a stop or kill ended QEMU: one of ENDINGS, or None when it was not running."""

    ended_by: str | None
    message: str | None = None

    @classmethod
    def read(cls, f: Fields) -> EndReply:
        return cls(ended_by=f.one_of("ended_by", ENDINGS, None), message=f.str("message", None))

    def to_json(self) -> dict[str, Any]:
        data: dict[str, Any] = {"ended_by": self.ended_by}
        if self.message is not None:
            data["message"] = self.message
        return data


class Accepted(Record):
    """The supervisor has read a request with ``ack`` in time and is carrying it out."""

    @staticmethod
    def matches(f: Fields) -> bool:
        return f.data.get("accepted") is True and "ended_by" not in f.data

    def to_json(self) -> dict[str, Any]:
        return {"accepted": True}


class ControlReady(Record):
    """The supervisor has a QMP connection: the relay's lines follow."""

    @classmethod
    def read(cls, f: Fields) -> ControlReady:
        if f.bool("ready") is not True:
            raise f.fail("ready", "must be true")
        return cls()

    def to_json(self) -> dict[str, Any]:
        return {"ready": True}


# --- requests ------------------------------------------------------------------------


if TYPE_CHECKING:  # what the client asks for; checked by the type checker only

    class Request(Protocol[_Reply]):
        def to_json(self) -> dict[str, Any]: ...

        def read_reply(self, f: Fields) -> _Reply: ...


class StatusRequest(Record):
    def to_json(self) -> dict[str, Any]:
        return {"op": "status"}

    def read_reply(self, f: Fields) -> StatusReply:
        return StatusReply.read(f)


class StopRequest(Record):
    """ACPI power button for up to ``timeout`` seconds (none with ``force``), then QMP
    quit, then SIGKILL. Not carried out if read after ``deadline`` (``time.time()``)."""

    timeout: float = 30.0
    force: bool = False
    deadline: float | None = None

    def to_json(self) -> dict[str, Any]:
        data = {"op": "stop", "timeout": self.timeout, "force": self.force}
        return _with_deadline(data, self.deadline)

    def read_reply(self, f: Fields) -> EndReply:
        return EndReply.read(f)


class KillRequest(Record):
    deadline: float | None = None

    def to_json(self) -> dict[str, Any]:
        return _with_deadline({"op": "kill"}, self.deadline)

    def read_reply(self, f: Fields) -> EndReply:
        return EndReply.read(f)


class ControlRequest(Record):
    def to_json(self) -> dict[str, Any]:
        return {"op": "control"}

    def read_reply(self, f: Fields) -> ControlReady:
        return ControlReady.read(f)


def _with_deadline(data: dict[str, Any], deadline: float | None) -> dict[str, Any]:
    if deadline is not None:
        data.update(deadline=deadline, ack=True)
    return data


def expired(request: AnyRequest, now: float) -> bool:
    """The client gave up on ``request`` before the supervisor read it."""
    deadline = getattr(request, "deadline", None)
    return deadline is not None and now > deadline


AnyRequest = StatusRequest | StopRequest | KillRequest | ControlRequest
OPS = ("status", "stop", "kill", "control")


def decode_request(line: bytes) -> AnyRequest:
    """The server's side: a request line as its record; anything else a RecordError."""
    f = decode(line, REQUEST_SOURCE)
    op = f.one_of("op", OPS)
    if op == "status":
        return StatusRequest()
    if op == "stop":
        timeout = f.float("timeout", 30.0)
        if timeout < 0:
            raise f.fail("timeout", "must not be negative")
        deadline = f.float("deadline", None)
        return StopRequest(timeout=timeout, force=f.bool("force", False), deadline=deadline)
    if op == "kill":
        return KillRequest(deadline=f.float("deadline", None))
    return ControlRequest()


def decode_reply(
    request: Request[_Reply], line: bytes, source: str
) -> _Reply | ErrorReply | Accepted:
    """The client's side: the reply to ``request``, the supervisor's ``ErrorReply``, or
    (to a request with ``ack``) ``Accepted`` before the reply. Anything else is a
    RecordError naming ``source`` (e.g. "vm1: supervisor reply")."""
    f = decode(line, source, REPLY_HINT)
    if Accepted.matches(f):
        return Accepted()
    if "error" in f.data:
        return ErrorReply(str(f.str("error")))
    return request.read_reply(f)


# --- the control relay's lines, after ControlReady ------------------------------------
# (the lines are drawn in qvm.supervisor.relay; the client is qvm.control.session)

RELAY_REQUEST_SOURCE = "control request"


# qvm's own commands on the relay, run by the supervisor instead of QEMU: the virtiofsd of
# a live share is the supervisor's child, started and stopped in order with the QMP steps of
# its hotplug (qvm.control.transaction's steps and undos; qvm.supervisor.shares)
SHARE_START = "qvm-share-start"
SHARE_STOP = "qvm-share-stop"
SHARE_MOUNTED = "qvm-share-mounted"  # the guest's mount of a share, as its agent said
LOCAL_COMMANDS = (SHARE_START, SHARE_STOP, SHARE_MOUNTED)


class RelayExecute(Record):
    """Run one QMP command; not sent to QEMU if read after ``deadline`` (time.time())."""

    id: int
    execute: str
    arguments: dict[str, Any] | None = None
    timeout: float | None = None  # None: the relay's default
    deadline: float | None = None

    def to_json(self) -> dict[str, Any]:
        data: dict[str, Any] = {"id": self.id, "execute": self.execute}
        for key in ("arguments", "timeout", "deadline"):
            if getattr(self, key) is not None:
                data[key] = getattr(self, key)
        return data


class RelayListen(Record):
    """Forward events of these names (None: every event) from now on."""

    id: int
    names: tuple[str, ...] | None

    def to_json(self) -> dict[str, Any]:
        return {"id": self.id, "listen": list(self.names) if self.names is not None else None}


class RelayUnlisten(Record):
    id: int
    listener: int  # the id of the RelayListen that opened it

    def to_json(self) -> dict[str, Any]:
        return {"id": self.id, "unlisten": self.listener}


class RelayUnreadable(Record):
    """A line that is not one of the requests above: answered with a RelayRefused."""

    id: int | None  # None when even the id could not be read
    problem: str


RelayRequest = RelayExecute | RelayListen | RelayUnlisten | RelayUnreadable


def decode_relay_request(line: bytes) -> RelayRequest:
    """The relay's side: never raises, a bad line is a ``RelayUnreadable``."""
    try:
        f = decode(line, RELAY_REQUEST_SOURCE)
    except RecordError as error:
        return RelayUnreadable(None, str(error))
    try:
        request_id: int = f.int("id")
        if "execute" in f.data:
            arguments = f.mapping("arguments", None)
            timeout = f.float("timeout", None)
            return RelayExecute(
                id=request_id,
                execute=f.str("execute"),
                arguments=arguments,
                timeout=timeout if timeout else None,  # 0 (or none): the default
                deadline=f.float("deadline", None),
            )
        if "listen" in f.data:
            return RelayListen(request_id, f.str_list("listen", None))
        if "unlisten" in f.data:
            return RelayUnlisten(request_id, f.int("unlisten"))
        raise f.fail("", "neither execute, listen nor unlisten")
    except RecordError as error:
        known = f.data.get("id")  # to match the refusal to its request, if it can be
        return RelayUnreadable(known if type(known) is int else None, str(error))


class RelayReturn(Record):
    id: int
    value: Any  # QEMU's "return", read by the command's caller

    def to_json(self) -> dict[str, Any]:
        return {"id": self.id, "return": self.value}


class RelayRefused(Record):
    """QEMU refused the command (``error_class`` is QEMU's, e.g. "GenericError"), or the
    relay could not read the request (``error_class`` "qvm")."""

    id: int | None
    error_class: str
    desc: str

    def to_json(self) -> dict[str, Any]:
        return {"id": self.id, "error": {"class": self.error_class, "desc": self.desc}}


class RelayTimedOut(Record):
    """QEMU did not answer within the request's timeout."""

    id: int

    def to_json(self) -> dict[str, Any]:
        return {"id": self.id, "timeout": True}


class RelayGone(Record):
    """QEMU (and the supervisor's connection to it) ended, or was restarted."""

    id: int

    def to_json(self) -> dict[str, Any]:
        return {"id": self.id, "gone": True}


class RelayExpired(Record):
    """Read after its deadline: the client had given up, so QEMU never saw it."""

    id: int

    def to_json(self) -> dict[str, Any]:
        return {"id": self.id, "expired": True}


class RelayEvent(Record):
    """One QMP event for the listener ``listener``, as QEMU sent it."""

    listener: int
    event: dict[str, Any]

    def to_json(self) -> dict[str, Any]:
        return {"listener": self.listener, "event": self.event}


RelayReply = RelayReturn | RelayRefused | RelayTimedOut | RelayGone | RelayExpired
_FLAGS: tuple[tuple[str, type[RelayTimedOut | RelayGone | RelayExpired]], ...] = (
    ("timeout", RelayTimedOut),
    ("gone", RelayGone),
    ("expired", RelayExpired),
)


def decode_relay_message(line: bytes, source: str) -> RelayReply | RelayEvent:
    """The client's side: a reply or an event; anything else a RecordError naming
    ``source``."""
    f = decode(line, source, REPLY_HINT)
    if "listener" in f.data:
        return RelayEvent(f.int("listener"), f.object("event").data)
    error = f.object("error", None)
    if error is not None:  # maybe without an id: a line the relay could not read
        request_id = f.int("id", None)
        return RelayRefused(request_id, error.str("class", "qvm"), error.str("desc", ""))
    request_id = f.int("id")
    if "return" in f.data:
        return RelayReturn(request_id, f.any("return"))
    for key, kind in _FLAGS:
        if f.bool(key, False):
            return kind(request_id)
    raise f.fail("", "neither return, error, timeout, gone, expired nor an event")
