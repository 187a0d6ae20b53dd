"""The one fake QMP session of the unit tests: it plays QEMU for the control modules
and satisfies ``qvm.control.qmp_session.QmpSession`` as ``ControlSession`` does.

    session = FakeQmp(
        replies={"qom-list": [...], "query-memory-devices": lambda args: [...]},
        refuse={"device_add": "Bus 'hp9' not found"},
        events={"device_del": lambda args: [deleted(args["id"])]},
    )

A reply is a value, or a function of the command's arguments; a refused command raises
``ControlError`` with QEMU's text, as the real session does. ``events[command]`` gives
the events QEMU sends after that command, queued for the listeners open then. A listener's
``wait`` takes what is queued and never sleeps: the deadline passes at once when nothing
more is queued.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterable, Iterator
from typing import Any

from qvm.errors import ControlError
from qvm.store.launch import LaunchRecord

Event = dict[str, Any]
Reply = Any | Callable[[dict[str, Any]], Any]


class FakeEvents:
    def __init__(self, names: Iterable[str] | None) -> None:
        self.names = None if names is None else set(names)
        self.queued: list[Event] = []

    def offer(self, event: Event) -> None:
        if self.names is None or event.get("event") in self.names:
            self.queued.append(event)

    def wait(self, accept: Callable[[Event], bool], deadline: float) -> Event | None:
        while self.queued:
            event = self.queued.pop(0)
            if accept(event):
                return event
        return None


class FakeQmp:
    """Plays QEMU; ``sent`` is every command in order, with its arguments."""

    def __init__(
        self,
        name: str = "vm1",
        replies: dict[str, Reply] | None = None,
        refuse: dict[str, str] | None = None,
        events: dict[str, Callable[[dict[str, Any]], list[Event]]] | None = None,
    ) -> None:
        self.name = name
        self.replies = dict(replies or {})
        self.refuse = dict(refuse or {})
        self.events = dict(events or {})
        self.sent: list[tuple[str, dict[str, Any]]] = []
        self.listeners: list[FakeEvents] = []

    def execute(
        self, command: str, arguments: dict[str, Any] | None = None, timeout: float | None = None
    ) -> Any:
        args = dict(arguments or {})
        self.sent.append((command, args))
        if command in self.refuse:
            desc = self.refuse[command]
            raise ControlError(
                f"{self.name}: {command}: {desc}", qemu_class="GenericError", qemu_desc=desc
            )
        reply = self.replies.get(command, {})
        result = reply(args) if callable(reply) else reply
        for event in self.events.get(command, lambda _: [])(args):
            for listener in self.listeners:
                listener.offer(event)
        return result

    @contextlib.contextmanager
    def listen(self, names: Iterable[str] | None = None) -> Iterator[FakeEvents]:
        listener = FakeEvents(names)
        self.listeners.append(listener)
        try:
            yield listener
        finally:
            self.listeners.remove(listener)

    def commands(self) -> list[str]:
        return [command for command, _ in self.sent]


def device_deleted(dev_id: str, path: str | None = None) -> Event:
    """QEMU's ``DEVICE_DELETED`` of a device (``path``: of a child, as for a vCPU)."""
    data = {"path": path} if path else {"device": dev_id, "path": f"/machine/peripheral/{dev_id}"}
    return {"event": "DEVICE_DELETED", "data": data}


def launch_record(**fields: Any) -> LaunchRecord:
    """A launch.json as ``qvm up`` writes it, with ``fields`` instead of its defaults."""
    data: dict[str, Any] = {
        "name": "vm1",
        "machine_file": "/nowhere/machines/vm1.toml",
        "argv": ["qemu-system-x86_64"],
        "accel": "tcg",
        "machine_type": "q35",
        **fields,
    }
    return LaunchRecord.from_json(data, "launch.json")


def state_json(qemu_pid: int | None = 100, qemu_start_time: int | None = 5, **fields: Any) -> Any:
    """A state.json of a running VM as its supervisor writes it, naming one QEMU run."""
    data: dict[str, Any] = {
        "name": "vm1",
        "machine_file": None,
        "accel": "tcg",
        "accel_reason": None,
        "supervisor_pid": 99,
        "supervisor_start_time": 1,
        "state": "running",
        "restarts": 0,
        "exit": None,
        "crash_reason": None,
        "qemu_pid": qemu_pid,
        "qemu_start_time": qemu_start_time,
        **fields,
    }
    return data
