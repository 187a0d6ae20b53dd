"""Writing a live change back into the machine's TOML file, keeping the user's text.

tomlkit round-trips a document with its comments, blank lines, key order and spacing,
so only the value that changed differs afterwards (tomli-w could only write a new file).
"""

from __future__ import annotations

import os
import re
import tomllib
from collections.abc import Callable
from pathlib import Path
from typing import Any

from qvm.base.digest import file_sha256
from qvm.base.record import Record
from qvm.definition.reader import render
from qvm.errors import DefinitionError, Problem


class PersistResult(Record):
    path: Path
    key: str
    old: int | None  # None: the key was not in the file
    new: int
    # the file's sha256 before and after: a running VM's record follows qvm's own write
    sha256_before: str | None = None
    sha256_after: str | None = None

    @property
    def changed(self) -> bool:
        return self.old != self.new


def set_cpu_count_text(text: str, count: int, file: str = "<toml>") -> tuple[str, int | None]:
    """``text`` with ``[cpu] count`` set to ``count`` (table and key created if missing)."""
    import tomlkit  # noqa: PLC0415 -- 20+ ms, only for cpu --persist
    from tomlkit.exceptions import TOMLKitError  # noqa: PLC0415 -- with tomlkit

    try:
        doc = tomlkit.parse(text)
    except TOMLKitError as exc:
        raise DefinitionError([Problem(file, "", f"cannot parse TOML: {exc}")]) from exc
    cpu = doc.get("cpu")
    if cpu is None:
        cpu = tomlkit.table()
        cpu["count"] = count
        doc["cpu"] = cpu
        return tomlkit.dumps(doc), None
    if not isinstance(cpu, dict):
        raise DefinitionError([Problem(file, "cpu", "must be a table", got=repr(cpu))])
    cpu_max = cpu.get("max")
    if isinstance(cpu_max, int) and count > cpu_max:
        raise DefinitionError(
            [
                Problem(
                    file,
                    "cpu.count",
                    f"not written: {count} vCPUs would exceed cpu.max ({cpu_max}) in the file",
                    hint="the file changed since the VM started; edit it by hand",
                )
            ]
        )
    old = cpu.get("count")
    if old == count:
        return text, count
    cpu["count"] = count
    return tomlkit.dumps(doc), old if isinstance(old, int) else None


def persist_cpu_count(path: Path, count: int) -> PersistResult:
    """Write ``[cpu] count = count`` into the machine file; nothing else changes."""
    before = file_sha256(path)
    text = _read_for(path, "cpu.count")
    new_text, old = set_cpu_count_text(text, count, str(path))
    if new_text != text:
        _write_keeping_mode(path, new_text)
    return PersistResult(path, "cpu.count", old, count, before, file_sha256(path))


def _write_keeping_mode(path: Path, text: str) -> None:
    """Replace the file atomically, with its permissions (a symlink's target is written)."""
    target = path.resolve()
    tmp = target.with_name(f".{target.name}.{os.getpid()}.tmp")
    mode = target.stat().st_mode & 0o7777
    with open(tmp, "w") as handle:
        handle.write(text)
        handle.flush()
        os.fsync(handle.fileno())
    os.chmod(tmp, mode)
    os.replace(tmp, target)


# --- [[disk]] and [[nic]] entries ------------------------------------------------------
#
# tomlkit attaches a comment to the table above it, so a comment written over
# [supervisor] would end up over an appended [[disk]]: these edits work on lines
# instead, around the entries' own lines, and leave every other line as it was.

_HEADER = re.compile(r"^\s*(\[\[?)\s*([A-Za-z0-9_.-]+)\s*\]\]?\s*(#.*)?$")


class EntryPersistResult(Record):
    path: Path
    table: str  # "disk" or "nic"
    action: str  # "added", "removed" or "absent" (nothing matched: nothing written)
    entry: dict[str, Any] | None
    sha256_before: str | None = None  # as PersistResult's
    sha256_after: str | None = None

    @property
    def changed(self) -> bool:
        return self.action in ("added", "removed")


def _headers(lines: list[str]) -> list[tuple[int, str, bool]]:
    """(line index, table name, is an array of tables) of each table header, skipping
    lines inside multi-line strings."""
    found = []
    in_string: str | None = None
    for index, line in enumerate(lines):
        if in_string is None:
            match = _HEADER.match(line)
            if match:
                found.append((index, match[2], match[1] == "[["))
                continue
        for quote in ('"""', "'''"):
            if line.count(quote) % 2 and in_string in (None, quote):
                in_string = None if in_string == quote else quote
    return found


def _own_end(lines: list[str], start: int, next_header: int) -> int:
    """The end (exclusive) of a table's own lines, without its trailing blank lines and
    without the comment lines written right over the next header (they belong to it)."""
    end = next_header
    while end > start + 1 and lines[end - 1].lstrip().startswith("#"):
        end -= 1
    while end > start + 1 and not lines[end - 1].strip():
        end -= 1
    return end


def entry_lines(table: str, entry: dict[str, Any]) -> list[str]:
    return [f"[[{table}]]"] + [f"{key} = {render(value)}" for key, value in entry.items()]


def add_entry_text(text: str, table: str, entry: dict[str, Any]) -> str:
    """``text`` with a ``[[table]]`` entry after the last one (or at the end)."""
    lines = text.splitlines()
    headers = _headers(lines)
    ours = [i for i, (_, name, array) in enumerate(headers) if name == table and array]
    new = entry_lines(table, entry)
    if ours:
        last = ours[-1]
        start = headers[last][0]
        following = headers[last + 1][0] if last + 1 < len(headers) else len(lines)
        at = _own_end(lines, start, following)
        lines[at:at] = ["", *new]
    else:
        while lines and not lines[-1].strip():
            lines.pop()
        lines += ["", *new] if lines else new
    return "\n".join(lines) + "\n"


def remove_entry_text(
    text: str, table: str, match: Callable[[dict[str, Any]], bool], file: str = "<toml>"
) -> tuple[str, list[dict[str, Any]]]:
    """``text`` without the ``[[table]]`` entries ``match`` likes; and those entries."""
    data = _load(text, file)
    entries = data.get(table)
    if not isinstance(entries, list) or not entries:
        return text, []
    gone = [i for i, entry in enumerate(entries) if isinstance(entry, dict) and match(entry)]
    if not gone:
        return text, []
    lines = text.splitlines()
    headers = _headers(lines)
    ours = [i for i, (_, name, array) in enumerate(headers) if name == table and array]
    if len(ours) != len(entries):
        raise DefinitionError(
            [
                Problem(
                    file,
                    table,
                    "not written: its entries are not all [[" + table + "]] tables",
                    hint="edit the file by hand",
                )
            ]
        )
    for position in reversed(gone):  # the lines above an entry keep their numbers
        header = ours[position]
        start = headers[header][0]
        following = headers[header + 1][0] if header + 1 < len(headers) else len(lines)
        end = _own_end(lines, start, following)
        while end < following and not lines[end].strip():
            end += 1  # its blank lines go with it
        if end == len(lines):  # the last lines of the file: so do the blank lines above
            while start > 0 and not lines[start - 1].strip():
                start -= 1
        del lines[start:end]
        headers = _headers(lines)
        ours = [i for i, (_, name, array) in enumerate(headers) if name == table and array]
    return "\n".join(lines) + "\n", [entries[i] for i in gone]


def _load(text: str, file: str) -> dict[str, Any]:
    try:
        return tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise DefinitionError([Problem(file, "", f"cannot parse TOML: {exc}")]) from exc


def persist_entry(path: Path, table: str, entry: dict[str, Any]) -> EntryPersistResult:
    """Append a ``[[table]]`` entry to the machine file; nothing else changes."""
    before = file_sha256(path)
    text = _read_for(path, f"a [[{table}]]")
    _load(text, str(path))
    _write_keeping_mode(path, add_entry_text(text, table, entry))
    return EntryPersistResult(path, table, "added", entry, before, file_sha256(path))


def unpersist_entry(
    path: Path, table: str, match: Callable[[dict[str, Any]], bool]
) -> EntryPersistResult:
    """Remove the first ``[[table]]`` entry ``match`` likes from the machine file."""
    before = file_sha256(path)
    text = _read_for(path, f"a [[{table}]]")
    first: list[bool] = []

    def once(entry: dict[str, Any]) -> bool:
        if not first and match(entry):
            first.append(True)
            return True
        return False

    new_text, gone = remove_entry_text(text, table, once, str(path))
    if not gone:
        return EntryPersistResult(path, table, "absent", None)
    _write_keeping_mode(path, new_text)
    return EntryPersistResult(path, table, "removed", gone[0], before, file_sha256(path))


def _read_for(path: Path, what: str) -> str:
    try:
        return path.read_text()
    except OSError as exc:
        raise DefinitionError(
            [Problem(str(path), "", f"cannot read it to persist {what}: {exc.strerror}")]
        ) from exc
