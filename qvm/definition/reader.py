"""Reading TOML tables with every problem collected: ``Table`` reads one table's keys
with their types and ranges, reporting to one ``Report`` with the key's full path and the
value rendered short; unknown keys get a did-you-mean.
"""

from __future__ import annotations

import math
import os
import re
from collections.abc import Callable, Collection, Mapping, Sequence
from pathlib import Path

from qvm.base.checking import TYPE_CHECKING
from qvm.base.sizes import SizeError, parse_size
from qvm.definition.schema import ID_PATTERN, KEYS
from qvm.errors import Problem

if TYPE_CHECKING:
    from typing import Any, TypeVar

    _T = TypeVar("_T")

ID_RULE = "a letter then up to 31 letters, digits, '_' or '-'"
SIZE_HINT = 'sizes look like "512M" or "2G"; K, M, G and T are powers of 1024'
# a TOML bare key's characters; a set, not a regular expression: every key of every file
# loaded is rendered, and compiling one would cost each command ~0.2 ms
_BARE_KEY_CHARS = frozenset("ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789_-")
_NOT_SET = object()

# Longest "got ..." value and key path in a message: a 10 MB string in a file must not
# come back whole in an error line, and a line must stay readable in a terminal.
MAX_GOT = 80
MAX_KEY = 120
MAX_TEXT = 300
# Past this a float cannot hold the number; float(10**400) raises OverflowError.
_FLOAT_LIMIT = 2**1023


# --- rendering values for messages ------------------------------------------------


def render(value: Any) -> str:
    """Write a TOML value the way TOML would, so "got ..." shows what the user wrote."""
    if isinstance(value, str):
        return _quoted(value)
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, float):
        return _render_float(value)
    if isinstance(value, list):
        return "[" + ", ".join(render(item) for item in value) + "]"
    if isinstance(value, dict):
        pairs = (f"{_render_key(key)} = {render(item)}" for key, item in value.items())
        return "{" + ", ".join(pairs) + "}"
    from datetime import date, datetime, time  # noqa: PLC0415 -- only TOML dates, rarely

    if isinstance(value, datetime | date | time):
        return value.isoformat()
    return str(value)


def shorten(text: str, limit: int = MAX_GOT) -> str:
    """``text`` cut to about ``limit`` characters, saying how long it was, and with its
    control characters escaped (a NUL or an escape sequence must not reach a terminal)."""
    if len(text) > limit:
        suffix = f"... ({len(text)} characters)"
        text = text[: max(limit - len(suffix), 10)] + suffix
    if text.isprintable():
        return text
    return "".join(c if c.isprintable() else repr(c)[1:-1] for c in text)


def shown(value: Any, limit: int = MAX_GOT) -> str:
    """A TOML value rendered for a message, cut to ``limit``: what "got ..." says."""
    if isinstance(value, str) and len(value) > limit:
        # render no more of a 10 MB string than is shown
        suffix = f'..." ({len(value)} characters)'
        head = render(value[: limit - len(suffix)])[: limit - len(suffix)]
        return shorten(head, limit) + suffix
    return shorten(render(value), limit)


def find_nul(data: Mapping[str, Any], report: Report) -> None:
    """Report every key and string of the document holding a NUL character: no file
    name, command line or QEMU option can hold one. Walked without recursion, so a deeply
    nested document cannot exhaust the stack here."""
    todo: list[tuple[str, Any]] = [("", data)]
    while todo:
        where, value = todo.pop()
        if isinstance(value, str):
            if "\0" in value:
                report.add(where, "must not contain a NUL character", shown(value))
        elif isinstance(value, dict):
            for name, item in value.items():
                key = f"{where}.{_render_key(name)}" if where else _render_key(name)
                if "\0" in name:
                    report.add(key, "must not contain a NUL character (in the key)")
                todo.append((key, item))
        elif isinstance(value, list):
            todo.extend((f"{where}[{index}]", item) for index, item in enumerate(value))


def _render_float(value: float) -> str:
    if math.isnan(value):
        return "nan"
    if math.isinf(value):
        return "inf" if value > 0 else "-inf"
    return repr(value)


def _render_key(key: str) -> str:
    return key if key and _BARE_KEY_CHARS.issuperset(key) else _quoted(key)


def _quoted(text: str) -> str:
    """``text`` as a TOML basic string (JSON's quoting)."""
    # messages only: json compiles regular expressions at import, which a machine that
    # loads without a problem never pays for
    import json  # noqa: PLC0415

    return json.dumps(text, ensure_ascii=False)


_TILDE_HINT = "write ~/... for your own home folder, or an absolute path"


def expand_path(text: str, base_dir: Path) -> Path | None:
    """``text`` as a path: ``~`` expanded, relative to ``base_dir``; None if it names the
    home folder of a user this host does not have (``~nosuchuser/x``)."""
    try:
        expanded = Path(text).expanduser()
    except RuntimeError:  # pathlib's "Could not determine home directory."
        return None
    # base_dir / an absolute path is that absolute path, so one expression does both.
    return Path(os.path.normpath(base_dir / expanded))


def did_you_mean(word: str, choices: Collection[str]) -> str | None:
    import difflib  # noqa: PLC0415 -- 6 ms, only on error paths

    matches = difflib.get_close_matches(word, list(choices), n=3, cutoff=0.6)
    if not matches:
        return None
    return "did you mean " + ", ".join(f"'{match}'" for match in matches) + "?"


def _must_be_one_of(choices: Sequence[str]) -> str:
    if len(choices) == 1:
        return f"must be {render(choices[0])}"
    return "must be one of " + ", ".join(render(choice) for choice in choices)


def is_int(value: Any) -> bool:
    # TOML booleans arrive as Python bools, which are ints: "count = true" is a mistake.
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value: Any) -> bool:
    return is_int(value) or isinstance(value, float)


def _is_table_like(value: Any) -> bool:
    if isinstance(value, dict):
        return True
    return isinstance(value, list) and bool(value) and all(isinstance(v, dict) for v in value)


# --- reading tables ---------------------------------------------------------------


class Report:
    """The problems found so far in one file."""

    def __init__(self, file: str) -> None:
        self.file = file
        self.problems: list[Problem] = []

    def add(self, key: str, problem: str, got: str | None = None, hint: str | None = None) -> None:
        """Every part is cut to a bounded length: keys and values come from the file."""
        self.problems.append(
            Problem(
                self.file,
                shorten(key, MAX_KEY),
                shorten(problem, MAX_TEXT),
                None if got is None else shorten(got, MAX_GOT),
                None if hint is None else shorten(hint, MAX_TEXT),
            )
        )


class Table:
    """One TOML table being read.

    Getters return the default after reporting a problem instead of raising, so reading
    goes on and finds every problem. ``invalid`` remembers the keys that were present but
    wrong, so rules that relate several keys skip them rather than pile on.
    """

    def __init__(self, data: Mapping[str, Any], where: str, report: Report) -> None:
        self.data = data
        self.where = where
        self.report = report
        self.invalid: set[str] = set()

    def key(self, name: str) -> str:
        return f"{self.where}.{name}" if self.where else name

    def given(self, name: str) -> bool:
        """True if the file sets ``name`` to a valid value."""
        return name in self.data and name not in self.invalid

    def ok(self, *names: str) -> bool:
        """True if none of ``names`` is set to an invalid value."""
        return not self.invalid.intersection(names)

    def fail(self, name: str, problem: str, hint: str | None = None) -> None:
        self.invalid.add(name)
        got = shown(self.data[name]) if name in self.data else None
        self.report.add(self.key(name), problem, got, hint)

    def reject_unknown(self, valid: Sequence[str]) -> None:
        for name in self.data:
            if name in valid:
                continue
            problem = "unknown table" if _is_table_like(self.data[name]) else "unknown key"
            hint = did_you_mean(name, valid) or "valid keys: " + ", ".join(valid)
            self.report.add(self.key(name), problem, hint=hint)

    def _typed(self, name: str, accept: Callable[[Any], bool], kind: str) -> Any:
        """The value of ``name`` if it has the right type; _NOT_SET if absent or wrong."""
        if name not in self.data:
            return _NOT_SET
        value = self.data[name]
        if not accept(value):
            self.fail(name, f"must be {kind}")
            return _NOT_SET
        return value

    def string(self, name: str, default: _T, *, allow_empty: bool = False) -> str | _T:
        value = self._typed(name, lambda v: isinstance(v, str), "a string")
        if value is _NOT_SET:
            return default
        if not value and not allow_empty:
            self.fail(name, "must not be empty")
            return default
        return str(value)

    def integer(
        self, name: str, default: _T, *, minimum: int | None = None, maximum: int | None = None
    ) -> int | _T:
        value = self._typed(name, is_int, "an integer")
        if value is _NOT_SET:
            return default
        if minimum is not None and maximum is not None:
            if not minimum <= value <= maximum:
                self.fail(name, f"must be between {minimum} and {maximum}")
                return default
        elif minimum is not None and value < minimum:
            self.fail(name, f"must be >= {minimum}")
            return default
        return int(value)

    def number(self, name: str, default: _T) -> float | _T:
        value = self._typed(name, _is_number, "a number")
        if value is _NOT_SET:
            return default
        if is_int(value) and abs(value) >= _FLOAT_LIMIT:
            self.fail(name, "is too large")
            return default
        return float(value)

    def boolean(self, name: str, default: _T) -> bool | _T:
        value = self._typed(name, lambda v: isinstance(v, bool), "true or false")
        return default if value is _NOT_SET else value

    def choice(
        self, name: str, choices: Sequence[str], default: _T, hint: str | None = None
    ) -> str | _T:
        value = self._typed(name, lambda v: isinstance(v, str), "a string")
        if value is _NOT_SET:
            return default
        if value not in choices:
            self.fail(name, _must_be_one_of(choices), did_you_mean(value, choices) or hint)
            return default
        return str(value)

    def size(self, name: str, default: _T) -> int | _T:
        value = self._typed(
            name, lambda v: is_int(v) or isinstance(v, str), 'a size like "512M" or a number'
        )
        if value is _NOT_SET:
            return default
        try:
            return parse_size(value)
        except SizeError as error:
            self.fail(name, error.reason, SIZE_HINT)
            return default

    def path(self, name: str, base_dir: Path) -> Path | None:
        text = self.string(name, None)
        if text is None:
            return None
        path = expand_path(text, base_dir)
        if path is None:
            self.fail(name, "starts with ~ and a user this host does not have", _TILDE_HINT)
        return path

    def identifier(self, name: str) -> str | None:
        text = self.string(name, None)
        if text is not None and not re.fullmatch(ID_PATTERN, text):
            self.fail(name, f"must be {ID_RULE}")
            return None
        return text

    def array(self, name: str, kind: str) -> list[tuple[str, Any]] | None:
        """(key path, item) for each item of the array ``name``; None if absent or wrong."""
        value = self._typed(name, lambda v: isinstance(v, list), kind)
        if value is _NOT_SET:
            return None
        return [(f"{self.key(name)}[{index}]", item) for index, item in enumerate(value)]

    def strings(self, name: str) -> tuple[str, ...] | None:
        items = self.array(name, "a list of strings")
        if items is None:
            return None
        for key, item in items:
            if not isinstance(item, str):
                self.invalid.add(name)
                self.report.add(key, "must be a string", shown(item))
        return None if name in self.invalid else tuple(item for _, item in items)

    def section(self, name: str) -> Table:
        """The sub-table ``name`` with its unknown keys reported; empty if absent or wrong."""
        value = self._typed(name, lambda v: isinstance(v, dict), "a table")
        table = Table({} if value is _NOT_SET else value, self.key(name), self.report)
        table.reject_unknown(tuple(KEYS[name]))
        return table

    def sections(self, name: str) -> list[Table]:
        """The tables of the array of tables ``name`` ([[name]]), unknown keys reported."""
        if isinstance(self.data.get(name), dict):
            self.fail(name, "must be an array of tables", f"write [[{name}]], not [{name}]")
            return []
        items = self.array(name, "an array of tables") or []
        tables = []
        for key, item in items:
            if not isinstance(item, dict):
                self.invalid.add(name)
                self.report.add(key, "must be a table", shown(item))
                continue
            table = Table(item, key, self.report)
            table.reject_unknown(tuple(KEYS[name]))
            tables.append(table)
        return tables
