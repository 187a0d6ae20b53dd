"""Download progress bars and spinners, drawn on stderr only when it is a terminal.

A wait shows a spinner once it has lasted ``SPINNER_DELAY``: a command that answers at
once draws nothing. The core never prints: a wait that polls calls ``Spinner.tick``; one
call that blocks (a supervisor's reply) runs inside ``waiting(label)``, whose spinner
turns in a thread of its own.
"""

from __future__ import annotations

import sys
import time
from collections.abc import Callable

from qvm.base.checking import TYPE_CHECKING
from qvm.cli.output import human_bytes

if TYPE_CHECKING:
    import threading
    from typing import Any, TypeVar

    Result = TypeVar("Result")

SPINNER = "|/-\\"
SPINNER_DELAY = 1.0  # seconds
FRAME_SECONDS = 0.1


class _Screen:
    """When a download bar last drew: a spinner keeps off the line while one is drawn."""

    last_bar = 0.0


_screen = _Screen()


def _drawing() -> bool:
    """stderr is a terminal, and this is the main thread: a VM's work in a thread of
    ``qvm.ops.fanout`` draws nothing, the command's one spinner turns for all of them."""
    if not sys.stderr.isatty():
        return False
    threading = sys.modules.get("threading")  # not imported: there is one thread
    return threading is None or threading.current_thread() is threading.main_thread()


class DownloadBar:
    """A callback for the core's fetch progress: ``bar(url, done, total)``."""

    def __init__(self) -> None:
        self.enabled = _drawing()
        self.started: dict[str, float] = {}

    def __call__(self, url: str, done: int, total: int | None) -> None:
        now = time.monotonic()
        first = url not in self.started
        start = self.started.setdefault(url, now)
        if not self.enabled:
            if first:
                sys.stderr.write(f"downloading {url}\n")
            return
        speed = done / max(now - start, 1e-3)
        name = url.rsplit("/", 1)[-1][:40]
        if total:
            width = 30
            filled = int(width * done / total)
            bar = "#" * filled + "-" * (width - filled)
            line = f"{name} [{bar}] {done * 100 // total:3d}% {human_bytes(done)}"
        else:
            line = f"{name} {human_bytes(done)}"
        line += f" {human_bytes(int(speed))}/s"
        end = "\n" if total is not None and done >= total else ""
        _screen.last_bar = now if not end else 0.0
        sys.stderr.write(f"\r\033[K{line}{end}")
        sys.stderr.flush()


class Spinner:
    """``tick()`` redraws "<frame> <label> <seconds>s"; ``done()`` clears the line."""

    def __init__(self, label: str) -> None:
        self.label = label
        self.enabled = _drawing()
        self.frame = 0
        self.start = time.monotonic()

        self.drawn = False

    def tick(self) -> None:
        now = time.monotonic()
        seconds = now - self.start
        if not self.enabled or seconds < SPINNER_DELAY or now - _screen.last_bar < 0.5:
            return
        self.frame = (self.frame + 1) % len(SPINNER)
        sys.stderr.write(f"\r\033[K{SPINNER[self.frame]} {self.label} {seconds:.0f}s")
        sys.stderr.flush()
        self.drawn = True

    def done(self) -> None:
        if self.drawn:
            sys.stderr.write("\r\033[K")
            sys.stderr.flush()
            self.drawn = False


class waiting:  # noqa: N801 - used as a function: ``with waiting("vm1: ..."):``
    """A spinner that turns in a thread while the ``with`` body blocks, and clears its
    line when the body ends, however it ends."""

    def __init__(self, label: str) -> None:
        self.spinner = Spinner(label)
        self.thread: threading.Thread | None = None
        self.stopped: threading.Event | None = None

    def __enter__(self) -> Spinner:
        if self.spinner.enabled:
            import threading

            self.stopped = threading.Event()
            self.thread = threading.Thread(target=self._turn, daemon=True)
            self.thread.start()
        return self.spinner

    def _turn(self) -> None:
        assert self.stopped is not None
        while not self.stopped.wait(FRAME_SECONDS):
            self.spinner.tick()

    def __exit__(self, *_: object) -> None:
        if self.thread is not None and self.stopped is not None:
            self.stopped.set()
            self.thread.join()
        self.spinner.done()


def run_waiting(label: str, call: Callable[..., Result], *args: Any, **kwargs: Any) -> Result:
    """``call(*args, **kwargs)`` with a spinner saying ``label`` once it has taken longer
    than a second."""
    with waiting(label):
        return call(*args, **kwargs)
