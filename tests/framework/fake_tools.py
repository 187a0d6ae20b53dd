"""Fake host tools for unit tests of the code that runs them (sbatch, scontrol, scancel):
a shell script each, in a folder first on PATH (the ``fake_tools`` fixture), that logs
its arguments (and its stdin, if asked) to calls.log and then does what the test says."""

from __future__ import annotations

import stat
from pathlib import Path


def fake_tool(folder: Path, name: str, body: str, log_stdin: bool = False) -> None:
    path = folder / name
    log = folder / "calls.log"
    stdin = f"cat >> {log}\n" if log_stdin else ""
    path.write_text(f'#!/bin/sh\necho "{name} $*" >> {log}\n{stdin}{body}\n')
    path.chmod(path.stat().st_mode | stat.S_IXUSR)


def calls(folder: Path) -> list[str]:
    """The lines the fake tools logged, in order; none when none ran."""
    log = folder / "calls.log"
    return log.read_text().splitlines() if log.exists() else []
