"""The supervisor at rest, without asyncio or qemu.qmp: a prototype of its pure parts.

Not wired in yet (docs/design.md, "The supervisor's memory", has the measured plan): the
record that crosses the exec between the idle form and today's asyncio form
(``qvm.supervisor.process``), the splitting of the events socket's bytes into JSON lines,
and which events the idle form handles itself. It imports nothing heavier than the
records, so that the idle form stays under its memory budget.
"""

from __future__ import annotations

from qvm.base.checking import TYPE_CHECKING
from qvm.base.record import Record
from qvm.store.state import StateRecord
from qvm.supervisor.wire import MAX_LINE, decode

if TYPE_CHECKING:
    from typing import Any

    from qvm.store.fields import Fields

HANDOVER_SOURCE = "the supervisor's handover"
# events that only change the run state or the view (as ``Supervisor._on_event`` handles
# them; STOP's internal-error check included): everything else (a device's unplug, the
# agent's port, a reset, a shutdown, a panic, the power button) the full form handles,
# which the idle form execs into first, handing the event's line over unread
IDLE_EVENTS = frozenset({"STOP", "RESUME", "RTC_CHANGE"})


class IdleHandover(Record):
    """What crosses the exec, either way: the fds stay open (inherited), the rest of the
    supervisor's state is read back from the run dir as a restarted supervisor would."""

    run_path: str
    qemu_pid: int
    qemu_pidfd: int
    events_fd: int  # the events monitor's socket, already negotiated
    listen_fd: int  # supervisor.sock
    state: StateRecord
    runstate: str
    client_fd: int | None = None  # the control client that asked for the full form
    agent_listen_fd: int | None = None  # the agent proxy's agent.sock
    agent_chardev_fd: int | None = None  # ... and its connection to QEMU's chardev
    intent: str | None = None  # "stop" or "kill" once asked
    consecutive_restarts: int = 0
    unread_events: str = ""  # bytes read from events_fd and not yet handled

    @classmethod
    def read(cls, f: Fields) -> IdleHandover:
        state = StateRecord.from_json(f.object("state").data, f.source, f.hint)
        return f.declared(cls, state=state)

    def to_json(self) -> dict[str, Any]:
        return {**self._asdict(), "state": self.state.to_json()}


def read_handover(line: bytes) -> IdleHandover:
    """The handover written by the other form, checked (a RecordError if it is not one)."""
    return IdleHandover.read(decode(line, HANDOVER_SOURCE))


def take_lines(buffer: bytes) -> tuple[list[bytes], bytes]:
    """The whole lines in what the events socket gave so far, and the rest; a rest longer
    than MAX_LINE is a broken stream (a ValueError), never a buffer that grows."""
    *lines, rest = buffer.split(b"\n")
    if len(rest) > MAX_LINE:
        raise ValueError(f"an event longer than {MAX_LINE} bytes")
    return [line for line in lines if line.strip()], rest


def needs_full_form(event: str) -> bool:
    """Whether the idle form execs into the full one to handle this QEMU event."""
    return event not in IDLE_EVENTS
