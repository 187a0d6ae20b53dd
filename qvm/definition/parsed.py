"""A machine file's TOML, parsed once per text: ``parse_toml``.

Importing ``tomllib`` and parsing a definition costs ~7 ms of every command that reads
one (`qvm up`, `status`, `list` reads them all), about a sixth of `qvm status`, measured:
``tomllib`` compiles its regular expressions and imports ``string`` and ``datetime`` on
import. So the parse of each file is kept as JSON in
``$QVM_CACHE_DIR/definitions`` (default ``~/.cache/qvm/definitions``) beside the text it
came from, one entry per file, and reused only while the text is the same, character
for character: no clock or mtime decides. What cannot be kept (a TOML date, a parse
error) is parsed every time, and a cache that cannot be read or written only costs time.
The entries written longest ago go beyond ``MAX_ENTRIES`` (files deleted, test runs).
"""

from __future__ import annotations

import contextlib
import os
import zlib

from qvm.base.checking import TYPE_CHECKING
from qvm.base.jsonfile import RecordWriteError, read_json, write_text_atomic
from qvm.layout.cache import qvm_cache_home

if TYPE_CHECKING:
    from typing import Any

MAX_ENTRIES = 200


def parse_toml(text: str, path: str) -> dict[str, Any]:
    """``tomllib.loads(text)``, from the cache entry of ``path`` when its text is ``text``.
    Raises what ``tomllib.loads`` raises."""
    entry = _entry(path)
    if entry is not None:
        kept = _read(entry)
        if kept is not None and kept[0] == text:
            return kept[1]
    import tomllib  # noqa: PLC0415 -- ~15 ms, only for a text not parsed before

    data = tomllib.loads(text)
    if entry is not None:
        _write(entry, text, data)
    return data


def _entry(path: str) -> str | None:
    home = qvm_cache_home()
    if home is None:
        return None
    absolute = os.path.abspath(path)
    stem = os.path.basename(absolute)[:64]
    return os.path.join(home, "definitions", f"{stem}-{zlib.crc32(os.fsencode(absolute)):08x}.json")


def _read(entry: str) -> tuple[str, dict[str, Any]] | None:
    kept = read_json(entry)
    if (
        kept is not None
        and isinstance(kept.get("text"), str)
        and isinstance(kept.get("toml"), dict)
    ):
        return kept["text"], kept["toml"]
    return None


def _write(entry: str, text: str, data: dict[str, Any]) -> None:
    import json  # noqa: PLC0415 -- a cache miss's, with tomllib: a hit reads without it

    try:
        # JSON holds everything TOML parses to but dates and times, which fail here
        encoded = json.dumps({"text": text, "toml": data})
    except (TypeError, ValueError, RecursionError):
        return
    with contextlib.suppress(OSError, RecordWriteError):
        os.makedirs(os.path.dirname(entry), mode=0o700, exist_ok=True)
        write_text_atomic(entry, encoded, durable=False)
        _prune(os.path.dirname(entry))


def _prune(folder: str) -> None:
    with os.scandir(folder) as found:
        entries = [
            e for e in found if e.name.endswith(".json") and e.is_file(follow_symlinks=False)
        ]
    if len(entries) <= MAX_ENTRIES:
        return
    entries.sort(key=lambda e: e.stat(follow_symlinks=False).st_mtime_ns)
    for old in entries[: len(entries) - MAX_ENTRIES]:
        with contextlib.suppress(OSError):
            os.unlink(old.path)
