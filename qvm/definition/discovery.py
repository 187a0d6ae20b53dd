"""Where machine files are found: ``--machines DIR``, ``$QVM_MACHINES``, ``./machines``,
``$XDG_CONFIG_HOME/qvm/machines``; a name or a path to a ``.toml`` file. (After these, the
CLI asks the VM's run dir which file it was started from: ``qvm.cli.resolve.load``.)

``qvm new`` writes into the first folder that every later lookup sees from any folder:
``--machines DIR``, else the first of ``$QVM_MACHINES``, else the user's config folder.
"""

from __future__ import annotations

import os
import stat

from qvm.base.checking import TYPE_CHECKING
from qvm.errors import QvmError, VmNameError
from qvm.layout.names import NAME_RULE, is_vm_name, shown
from qvm.layout.rundir import path_text

if TYPE_CHECKING:
    from collections.abc import Mapping, Sequence
    from pathlib import Path

# `qvm list` lists the machine files with strings (machine_search_locations,
# machine_file_locations) and imports pathlib only for a machine it loads: with the
# urllib.parse and ipaddress it imports, pathlib is ~3 ms of a query (qvm.layout.rundir).


def find_machine(name_or_path: str, search_dirs: Sequence[Path]) -> Path:
    """The machine file for a name ("vm1") or a path ("vm1.toml", "machines/vm1").

    An argument ending in .toml or holding a "/" is a path; anything else is a name,
    looked up as NAME.toml in each of ``search_dirs`` in turn. Raises QvmError if there
    is no such file.
    """
    from pathlib import Path  # noqa: PLC0415 -- see the note above

    if name_or_path.endswith(".toml") or "/" in name_or_path:
        try:
            path = Path(name_or_path).expanduser()
        except RuntimeError:  # ~nosuchuser/...: pathlib cannot find that home folder
            path = Path(name_or_path)
        if not _is_file(path):
            why = _not_a_file(path)
            if why is None:
                error = QvmError(f"no machine file at {shown(name_or_path)}", hint="check the path")
            else:  # it is there: said plainly, unless it is not fit to print
                plain = name_or_path.isprintable() and len(name_or_path) <= 1024
                where = name_or_path if plain else shown(name_or_path)
                error = QvmError(why, file=where, hint="check the path")
            error.file = name_or_path
            raise error
        return path
    if name_or_path in ("", ".", "..") or "\0" in name_or_path or len(name_or_path) > 250:
        # not a file's stem: never looked up, never joined to a folder
        raise VmNameError(f"{shown(name_or_path)} is not a VM name: it must be {NAME_RULE}")
    for directory in search_dirs:
        candidate = directory / f"{name_or_path}.toml"
        if _is_file(candidate):
            return candidate
    looked = ", ".join(_for_display(directory) for directory in search_dirs) or "nowhere"
    named = is_vm_name(name_or_path)  # else it is not echoed into a file name to create
    create = _for_display(search_dirs[0] / f"{name_or_path}.toml") if search_dirs else None
    hint = f"create {create} or pass --machines DIR" if create and named else "pass --machines DIR"
    if named:
        raise QvmError(f"no such machine (looked in: {looked})", vm=name_or_path, hint=hint)
    raise QvmError(f"no machine named {shown(name_or_path)} (looked in: {looked})", hint=hint)


def _not_a_file(path: Path) -> str | None:
    """Why ``path`` is no machine file to read: a folder, a broken link, a file it may
    not look at...; None when there is nothing there."""
    try:
        mode = path.stat().st_mode
    except (OSError, ValueError) as error:
        if isinstance(error, FileNotFoundError) and path.is_symlink():
            return "a symbolic link to nothing"
        if isinstance(error, FileNotFoundError):
            return None
        strerror = getattr(error, "strerror", None)
        return f"cannot read: {strerror or error}"
    if stat.S_ISDIR(mode):
        return "a folder, not a machine file"
    return "not a regular file"


def _is_file(path: Path) -> bool:
    """``path.is_file()``, False where it raises (a NUL, a name too long for the file
    system, a folder that cannot be read) instead of a traceback."""
    try:
        return path.is_file()
    except (OSError, ValueError):
        return False


def _for_display(path: Path) -> str:
    """``path`` as short as it can be said: relative to the current folder, or to ~."""
    from pathlib import Path  # noqa: PLC0415 -- see the note above

    bases = [(Path.cwd(), Path()), (Path.home(), Path("~"))]
    holding = [(base, shown) for base, shown in bases if path.is_relative_to(base)]
    if not path.is_absolute() or not holding:
        return str(path)
    # The deepest folder holding the path gives the shortest name; on a tie, cwd wins.
    base, shown = max(holding, key=lambda pair: len(pair[0].parts))
    return str(shown / path.relative_to(base))


def machine_search_dirs(explicit: Path | None, env: Mapping[str, str], cwd: Path) -> list[Path]:
    """Where to look for machine files, first match wins.

    ``--machines DIR``, then each folder in $QVM_MACHINES (separated by os.pathsep), then
    ./machines, then $XDG_CONFIG_HOME/qvm/machines (~/.config/qvm/machines by default).
    Relative folders are taken from ``cwd`` and ~ from $HOME in ``env``; nothing is read
    from the process or the disk.
    """
    from pathlib import Path  # noqa: PLC0415 -- see the note above

    return [Path(where) for where in machine_search_locations(explicit, env, str(cwd))]


def machine_search_locations(
    explicit: str | os.PathLike[str] | None, env: Mapping[str, str], cwd: str
) -> list[str]:
    """``machine_search_dirs``, as strings (``str(Path(...))`` of each)."""
    home = _home(env)
    dirs = [] if explicit is None else [_absolute(os.fspath(explicit), home, cwd)]
    dirs += [
        _absolute(entry, home, cwd)
        for entry in env.get("QVM_MACHINES", "").split(os.pathsep)
        if entry
    ]
    dirs.append(path_text(os.path.join(cwd, "machines")))
    dirs.append(_config_machines_dir(env, home))
    return list(dict.fromkeys(dirs))


def new_machines_dir(explicit: Path | None, env: Mapping[str, str], cwd: Path) -> Path:
    """Where ``qvm new`` writes: ``--machines DIR``, else the first folder of
    $QVM_MACHINES, else $XDG_CONFIG_HOME/qvm/machines; never ./machines, which lookup
    finds only from the folder above it."""
    from pathlib import Path  # noqa: PLC0415 -- see the note above

    home = _home(env)
    if explicit is not None:
        return Path(_absolute(str(explicit), home, str(cwd)))
    first = next((entry for entry in env.get("QVM_MACHINES", "").split(os.pathsep) if entry), None)
    if first is not None:
        return Path(_absolute(first, home, str(cwd)))
    return Path(_config_machines_dir(env, home))


def _home(env: Mapping[str, str]) -> str:
    # Path.home(): the password database's when $HOME is not set
    return env["HOME"] if env.get("HOME") else os.path.expanduser("~")


def _config_machines_dir(env: Mapping[str, str], home: str) -> str:
    xdg = env.get("XDG_CONFIG_HOME", "")
    # The XDG spec says to ignore a relative XDG_CONFIG_HOME.
    config = xdg if xdg.startswith("/") else os.path.join(home, ".config")
    return path_text(os.path.join(config, "qvm", "machines"))


def _absolute(text: str, home: str, cwd: str) -> str:
    if text == "~" or text.startswith("~/"):
        return path_text(os.path.join(home, text[2:]))
    return path_text(os.path.join(cwd, text))


def list_machine_files(search_dirs: Sequence[Path]) -> list[Path]:
    """Every machine file in ``search_dirs``, sorted by name; an earlier folder wins a tie.

    Every ``*.toml`` entry counts, readable or not (a folder, a broken link, a file it
    may not read): it is listed, and reading it says what is wrong, rather than the
    entry being left out without a word. A folder that cannot be read lists nothing."""
    from pathlib import Path  # noqa: PLC0415 -- see the note above

    return [Path(file) for file in machine_file_locations(search_dirs)]


def machine_file_locations(search_dirs: Sequence[str | os.PathLike[str]]) -> list[str]:
    """``list_machine_files``, as strings."""
    found: dict[str, str] = {}
    for directory in search_dirs:
        folder = path_text(directory)
        for name in sorted(_toml_names(folder)):
            # Editors leave dotted lock and backup files next to the real ones.
            if not name.startswith("."):
                found.setdefault(name[: -len(".toml")], os.path.join(folder, name))
    return [found[stem] for stem in sorted(found)]


def machine_stem(location: str) -> str:
    """A machine file's name without ``.toml``: ``Path(location).stem``."""
    return os.path.basename(location)[: -len(".toml")]


def _toml_names(directory: str) -> list[str]:
    """The names ``Path(directory).glob("*.toml")`` gives (nothing for a folder that is
    missing or cannot be read), without the regular expression glob compiles for its
    pattern on every `qvm list`."""
    if not os.path.isdir(directory):
        return []
    try:
        with os.scandir(directory) as entries:
            names = [entry.name for entry in entries]
    except PermissionError:
        return []
    return [name for name in names if name.endswith(".toml")]
