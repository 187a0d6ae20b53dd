"""Groups of machines: ``group = "web"`` in a machine file puts it in group ``web``, and
`qvm up @web` means every machine file of the machines folders whose ``group`` says so.

Membership is read from each file's top-level ``name`` and ``group`` only, not from a
full load: a member whose file has another problem is still a member, and the command
acting on it reports that problem for that VM, as it would for the VM by name. A file
that is not even TOML has no group anyone can read, and is in none.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from qvm.base.record import Record
from qvm.definition.discovery import list_machine_files
from qvm.definition.parsed import parse_toml
from qvm.layout.names import is_vm_name


class Listed(Record):
    """A machine file as a group command sees it."""

    name: str  # the VM's name: the file's ``name``, else the file's name without .toml
    path: Path
    group: str | None

    @property
    def spec(self) -> str:
        """What names this machine on the command line: its name, which lookup finds as
        NAME.toml, or else (a file whose ``name`` differs from its file name) its path."""
        return self.name if self.path.stem == self.name else str(self.path)


def listed_machines(search_dirs: Sequence[Path]) -> list[Listed]:
    """Every machine file lookup finds (``list_machine_files``), with its name and group."""
    listed = []
    for path in list_machine_files(search_dirs):
        top = _top_level(path)
        name, group = top.get("name"), top.get("group")
        listed.append(
            Listed(
                name if isinstance(name, str) and is_vm_name(name) else path.stem,
                path,
                group if isinstance(group, str) else None,
            )
        )
    return listed


def group_members(group: str, search_dirs: Sequence[Path]) -> list[Listed]:
    """The machines of ``group``, by name."""
    return [machine for machine in listed_machines(search_dirs) if machine.group == group]


def group_names(search_dirs: Sequence[Path]) -> list[str]:
    """Every group a machine file names, sorted."""
    return sorted({m.group for m in listed_machines(search_dirs) if m.group is not None})


def _top_level(path: Path) -> dict[str, object]:
    """The file's parsed TOML, or nothing when it cannot be read or is not TOML."""
    try:
        text = path.read_text(encoding="utf-8")
        return parse_toml(text, str(path))
    except (OSError, ValueError, RecursionError):
        return {}
