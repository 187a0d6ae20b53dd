"""The small interface the control modules need of a QMP session: run a command, and
listen to events for the length of a ``with`` block. ``qvm.control.session.ControlSession``
(through the supervisor) is the real one; the unit tests' fake QMP is the other.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from contextlib import AbstractContextManager
from typing import Any, Protocol, runtime_checkable

# A QMP event as QEMU sends it: {"event": NAME, "data": {...}, "timestamp": {...}}
Event = dict[str, Any]


@runtime_checkable
class Events(Protocol):
    """The events of some names, collected from the moment the listener opened."""

    def wait(self, accept: Callable[[Event], bool], deadline: float) -> Event | None:
        """The first event ``accept`` likes before ``deadline`` (``time.monotonic()``),
        or None; the others are dropped."""
        ...


@runtime_checkable
class QmpSession(Protocol):
    """One control session with a running VM (named ``name``)."""

    name: str

    def execute(
        self, command: str, arguments: dict[str, Any] | None = None, timeout: float | None = None
    ) -> Any:
        """QEMU's ``return`` value; ``ControlError`` when QEMU refuses or goes away."""
        ...

    def listen(self, names: Iterable[str] | None = None) -> AbstractContextManager[Events]:
        """``with session.listen(NAMES) as events:``: events from now until the block ends."""
        ...
