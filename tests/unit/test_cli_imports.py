"""Plain command lines run without importing Typer, Click, asyncio or qemu.qmp: those are
most of a command's start-up time (see the README's "Speed"). Checked by what the
interpreter reports it imported, not by timing."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

HEAVY = ("typer", "click", "asyncio", "qemu.qmp")


def imported_modules(argv: list[str], tmp_path: Path) -> set[str]:
    env = dict(
        os.environ,
        QVM_MACHINES=str(tmp_path / "machines"),
        QVM_STATE_DIR=str(tmp_path / "state"),
        XDG_CONFIG_HOME=str(tmp_path / "config"),
    )
    done = subprocess.run(
        [sys.executable, "-X", "importtime", "-m", "qvm.cli", *argv],
        env=env,
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=60,
    )
    lines = [line for line in done.stderr.splitlines() if line.startswith("import time:")]
    return {line.rsplit("|", 1)[1].strip() for line in lines}


def heavy(modules: set[str]) -> set[str]:
    return {m for m in modules if any(m == h or m.startswith(h + ".") for h in HEAVY)}


@pytest.mark.parametrize(
    "argv",
    [
        ["list"],
        ["list", "--json"],
        ["status", "vm1"],
        ["up", "vm1", "--no-wait"],
        ["down", "vm1"],
        ["cpu", "list", "vm1"],
        ["cpu", "add", "vm1", "--count", "2"],
        ["cpu", "del", "vm1"],
        ["mem", "list", "vm1"],
    ],
)
def test_plain_commands_import_no_framework(argv: list[str], tmp_path: Path) -> None:
    modules = imported_modules(argv, tmp_path)
    assert "qvm.cli.parsing.fast" in modules
    assert heavy(modules) == set()


@pytest.mark.parametrize("argv", [["--help"], ["status"], ["cpu", "add", "vm1", "-n2"]])
def test_help_and_mistakes_go_through_typer(argv: list[str], tmp_path: Path) -> None:
    assert "typer" in imported_modules(argv, tmp_path)
