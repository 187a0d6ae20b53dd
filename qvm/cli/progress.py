"""Download progress bars and spinners, drawn on stderr only when it is a terminal."""

from __future__ import annotations

import sys
import time

from qvm.cli.output import human_bytes

SPINNER = "|/-\\"


class DownloadBar:
    """A callback for the core's fetch progress: ``bar(url, done, total)``."""

    def __init__(self) -> None:
        self.enabled = sys.stderr.isatty()
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
        sys.stderr.write(f"\r\033[K{line}{end}")
        sys.stderr.flush()


class Spinner:
    """``tick()`` redraws "<frame> <label> <seconds>s"; ``done()`` clears the line."""

    def __init__(self, label: str) -> None:
        self.label = label
        self.enabled = sys.stderr.isatty()
        self.frame = 0
        self.start = time.monotonic()

    def tick(self) -> None:
        if not self.enabled:
            return
        self.frame = (self.frame + 1) % len(SPINNER)
        seconds = time.monotonic() - self.start
        sys.stderr.write(f"\r\033[K{SPINNER[self.frame]} {self.label} {seconds:.0f}s")
        sys.stderr.flush()

    def done(self) -> None:
        if self.enabled:
            sys.stderr.write("\r\033[K")
            sys.stderr.flush()
