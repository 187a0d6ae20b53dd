"""Resolving the names on the command line into definitions and run dirs, and checking
the arguments that become waits: every VM name passes ``check_vm_name`` before a path is
built from it, and the state dir is checked once before any run dir in it is read."""

from __future__ import annotations

import os

from qvm.base.checking import TYPE_CHECKING
from qvm.cli.parsing.declare import Option
from qvm.errors import QvmError, UsageError
from qvm.layout.names import check_vm_name, is_vm_name, shown
from qvm.layout.rundir import (
    RunDir,
    check_private_dir,
    default_state_location,
    path_text,
    run_dir_for,
)
from qvm.layout.runfiles import LAUNCH_FILE, NEW_RECORD

if TYPE_CHECKING:
    from pathlib import Path

    from qvm.definition.schema import Machine


class Settings:
    """What the global options say; ``configure`` sets it. A plain class, not a dataclass:
    every command imports this module, and importing ``dataclasses`` costs start-up time."""

    __slots__ = ("machines_dir", "state_root", "checked_root", "vms")

    def __init__(self, machines_dir: Path | None = None, state_root: Path | None = None) -> None:
        self.machines_dir = machines_dir
        self.state_root = state_root
        self.checked_root: str | None = None  # the state root once it passed its check
        self.vms: dict[str, None] = {}  # every VM whose run dir was looked up, in order


settings = Settings()


def configure(machines_dir: Path | None, state_root: Path | None) -> None:
    settings.machines_dir = machines_dir
    settings.state_root = state_root
    settings.checked_root = None


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
    """The state root, refused (UnsafeStateError, HostError: one line) if it is a file, a
    link, someone else's or open to others; a missing one is fine, `up` makes it. Every
    command reaches its run dirs through here, so none reads /dev/null/NAME/state.json."""
    from pathlib import Path

    return Path(state_location())


def state_location() -> str:
    """``state_root()`` as a string: the queries' (``qvm.layout.rundir`` says why)."""
    if settings.checked_root is not None:
        return settings.checked_root
    root = (
        path_text(settings.state_root)
        if settings.state_root is not None
        else default_state_location()
    )
    check_private_dir(root, "state dir")
    settings.checked_root = root
    return root


def search_dirs() -> list[Path]:
    from pathlib import Path

    from qvm.definition.discovery import machine_search_dirs

    return machine_search_dirs(settings.machines_dir, os.environ, Path.cwd())


def search_locations() -> list[str]:
    """``search_dirs()`` as strings: `qvm list`'s (``qvm.layout.rundir`` says why)."""
    from qvm.definition.discovery import machine_search_locations

    return machine_search_locations(settings.machines_dir, os.environ, os.getcwd())


def load(name_or_path: str) -> Machine:
    """The machine a name or a path on the command line means. A name is looked up in
    ``search_dirs()``, then in the VM's run dir, which records the file it was last
    started from (or that `qvm new` wrote): so a VM is found by name from any folder."""
    from qvm.definition.discovery import find_machine
    from qvm.definition.load import load_machine

    try:
        path = find_machine(name_or_path, search_dirs())
    except QvmError:
        if is_path(name_or_path) or not is_vm_name(name_or_path):
            raise
        path = recorded_definition(name_or_path, no_such_vm(name_or_path))
    return load_machine(path)


class NoSuchVm(QvmError):
    """A VM name no machine file and no run dir knows: most often a typo."""


def no_such_vm(name: str) -> NoSuchVm:
    """``no VM named 'dmeo' (did you mean 'demo'?) (looked in: ...)``: the closest name
    qvm knows, and every folder it looked in, absolute or from ~, so the line says where
    wherever it is read."""
    from difflib import get_close_matches  # only on the way to this error

    from qvm.definition.discovery import list_machine_files
    from qvm.layout.rundir import list_run_dirs

    dirs = search_dirs()
    known = {path.stem for path in list_machine_files(dirs)}
    try:
        root = state_location()
    except QvmError:  # an unsafe state dir: its own error comes when a command reads it
        root = path_text(settings.state_root or default_state_location())
    else:
        known |= {run.name for run in list_run_dirs(root)}
    close = get_close_matches(name, sorted(known), n=1)
    guess = f" (did you mean {close[0]!r}?)" if close else ""
    looked = ", ".join(_from_home(d) for d in dirs)
    runs = _from_home(root)
    hint = None if close else f"qvm new {name} --image FILE, or pass --machines DIR"
    error = NoSuchVm(
        f"no VM named {shown(name)}{guess} (looked in: {looked}; run dirs in {runs})", hint=hint
    )
    error.vm = name  # a field only: the line names it already
    return error


def _from_home(where: str | os.PathLike[str]) -> str:
    """``where`` absolute, or from ``~`` when it is under the home folder."""
    from pathlib import Path

    path = Path(os.path.abspath(where))
    home = Path.home()
    return (
        f"~/{path.relative_to(home)}" if path.is_relative_to(home) and path != home else str(path)
    )


def new_machines_dir() -> Path:
    """Where `qvm new` writes, so that `qvm up NAME` finds it from any folder."""
    from pathlib import Path

    from qvm.definition.discovery import new_machines_dir as where

    return where(settings.machines_dir, os.environ, Path.cwd())


def recorded_definition(name: str, not_found: QvmError) -> Path:
    """The machine file VM ``name``'s run dir names (launch.json, else new.json);
    ``not_found`` when there is none, one line saying so when that file is gone."""
    try:
        run = run_dir(name)
        file = recorded_file(run)
    except QvmError:
        raise not_found from None
    if file is None:
        raise not_found
    from pathlib import Path

    path = Path(file)
    if not path.is_file():
        raise QvmError(
            f"its machine file {file} is gone (it was there when {name} was last started or made)",
            vm=name,
            hint=f"put it back, or qvm up path/to/{name}.toml; qvm rm {name} forgets the VM",
        )
    return path


def recorded_file(run: RunDir) -> str | None:
    """The absolute path of the machine file the run dir records, if it records one."""
    from qvm.store.launch import read_launch

    launch = read_launch(run.file(LAUNCH_FILE))
    if launch is not None and launch.machine_file:
        return launch.machine_file
    from qvm.store.new import read_new

    made = read_new(run.file(NEW_RECORD))
    return made.machine_file if made is not None else None


def definition_changed(run: RunDir) -> str | None:
    """One line if the machine file VM ``run`` was started from changed since (or is
    gone), by its contents; None if it is as it was, or nothing records it."""
    from qvm.store.launch import definition_changed as changed
    from qvm.store.launch import read_launch

    try:
        launch = read_launch(run.file(LAUNCH_FILE))
    except QvmError:
        return None
    if launch is None or not launch.machine_file or not changed(launch):
        return None
    if not os.path.lexists(launch.machine_file):
        return (
            f"{run.name}: its machine file {launch.machine_file} is gone since it was "
            f"started (hint: put it back before qvm restart {run.name})"
        )
    return (
        f"{run.name}: {launch.machine_file} changed since {run.name} was started "
        f"(hint: qvm restart {run.name} runs the new definition)"
    )


def is_path(name_or_path: str) -> bool:
    """A machine file the user named (``vm.toml``, ``machines/vm``), not a VM name."""
    return name_or_path.endswith(".toml") or "/" in name_or_path


def run_dir(name: str) -> RunDir:
    """The run dir of the VM ``name``: VmNameError (one line) unless ``name`` is a VM
    name, so ``..``, ``.``, ``''`` or a 300-character name never become a path."""
    run = run_dir_for(state_location(), name)
    settings.vms[name] = None
    return run


def only_vm() -> str | None:
    """The VM this command is about, if it looked up exactly one: an error that names no
    VM of its own is about it (``qvm.cli.output.report_error``)."""
    return next(iter(settings.vms)) if len(settings.vms) == 1 else None


def run_dir_of(name_or_path: str) -> RunDir:
    """The run dir of a VM named on the command line, by name or by its TOML file.

    A VM whose definition was deleted while it ran is still found by name; a name
    nothing knows is NoSuchVm (``no_such_vm``).
    """
    if is_path(name_or_path):
        return run_dir(load(name_or_path).name)
    check_vm_name(name_or_path)
    candidate = run_dir(name_or_path)
    if os.path.exists(candidate.location):
        return candidate
    try:
        return run_dir(load(name_or_path).name)
    except NoSuchVm:
        raise  # a typo must not read as "not running", nor `qvm rm dmeo` as done
    except QvmError:  # a machine file that does not load: its run dir all the same
        return candidate


# A wait longer than this is a typo (or inf): sleeps and socket timeouts overflow on
# values near 1e300, and a wait of months is no wait.
MAX_TIMEOUT = 30 * 86400


def timeout_seconds(value: float, option: str = "--timeout") -> float:
    """``value`` if it is a usable number of seconds; else one line and exit 2. NaN
    compares false with everything, so a deadline of NaN would never come."""
    if value == value and 0 <= value <= MAX_TIMEOUT:  # NaN is the one value that is not itself
        return value
    raise UsageError(
        f"{option}: must be a number of seconds from 0 to {MAX_TIMEOUT}, got {value:g}"
    )
