"""Resolving the names on the command line into definitions and run dirs."""

from __future__ import annotations

import os
from pathlib import Path

from qvm.cli.parsing.declare import Option
from qvm.errors import QvmError
from qvm.layout.rundir import RunDir


class Settings:
    """What the global options say; ``configure`` sets it. A plain class, not a dataclass:
    every command imports this module, and importing ``dataclasses`` costs start-up time."""

    __slots__ = ("machines_dir", "state_root")

    def __init__(self, machines_dir: Path | None = None, state_root: Path | None = None) -> None:
        self.machines_dir = machines_dir
        self.state_root = state_root


settings = Settings()


def configure(machines_dir: Path | None, state_root: Path | None) -> None:
    settings.machines_dir = machines_dir
    settings.state_root = state_root


def global_options(
    machines: Path | None = Option(
        None, "--machines", help="Folder of machine TOML files (also $QVM_MACHINES)."
    ),
    state_dir: Path | None = Option(
        None, "--state-dir", help="Where run dirs live (also $QVM_STATE_DIR)."
    ),
) -> None:
    """The options `qvm` itself takes, before the command word."""
    configure(machines, state_dir)


def state_root() -> Path:
    if settings.state_root is not None:
        return settings.state_root
    from qvm.layout.rundir import default_state_dir

    return default_state_dir()


def search_dirs() -> list[Path]:
    from qvm.definition.discovery import machine_search_dirs

    return machine_search_dirs(settings.machines_dir, os.environ, Path.cwd())


def load(name_or_path: str):  # noqa: ANN201 - returns qvm.definition.Machine, imported lazily
    from qvm.definition.discovery import find_machine
    from qvm.definition.load import load_machine

    return load_machine(find_machine(name_or_path, search_dirs()))


def run_dir(name: str) -> RunDir:
    return RunDir(state_root() / name)


def run_dir_of(name_or_path: str) -> RunDir:
    """The run dir of a VM named on the command line, by name or by its TOML file.

    A VM whose definition was deleted while it ran is still found by name.
    """
    if name_or_path.endswith(".toml") or "/" in name_or_path:
        return run_dir(load(name_or_path).name)
    candidate = run_dir(name_or_path)
    if candidate.path.exists():
        return candidate
    try:
        return run_dir(load(name_or_path).name)
    except QvmError:
        return candidate
