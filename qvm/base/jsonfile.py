"""JSON files that are read while they are rewritten: atomic writes, forgiving reads.

Only ``os`` and ``json``: the supervisor's entry point writes the first state record with
it before anything heavier is imported.
"""

from __future__ import annotations

import json
import os
from typing import Any

# qvm's records are a few KiB; a bigger file is not one of them
MAX_RECORD_BYTES = 4 * 1024**2


def write_json_atomic(path: str | os.PathLike[str], data: dict[str, Any]) -> None:
    """Readers see the old file or the new one, never half of one."""
    folder, name = os.path.split(os.fspath(path))
    tmp = os.path.join(folder, f".{name}.{os.getpid()}.tmp")
    with open(tmp, "w") as handle:
        json.dump(data, handle, indent=2, sort_keys=True)
        handle.write("\n")
        handle.flush()
        os.fsync(handle.fileno())
    os.replace(tmp, path)


def read_json(path: str | os.PathLike[str]) -> dict[str, Any] | None:
    """The object in a JSON file, or None if it is missing, unreadable or not an object."""
    try:
        with open(path) as handle:
            data = json.load(handle)
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None


def read_json_strict(path: str | os.PathLike[str]) -> Any:
    """The decoded JSON in a file qvm wrote, or None if the file does not exist.

    Unlike ``read_json`` it does not hide a corrupt file: an unreadable file or bad JSON
    raises ``ValueError`` naming the file, for the typed records to turn into one line.
    """
    try:
        with open(path, "rb") as handle:
            raw = handle.read(MAX_RECORD_BYTES + 1)
    except FileNotFoundError:
        return None
    except OSError as error:
        raise ValueError(f"{os.fspath(path)}: cannot read: {error.strerror or error}") from error
    if len(raw) > MAX_RECORD_BYTES:
        raise ValueError(f"{os.fspath(path)}: larger than any record qvm writes")
    try:
        return json.loads(raw)
    except (ValueError, RecursionError) as error:
        raise ValueError(f"{os.fspath(path)}: not valid JSON ({error})") from error
