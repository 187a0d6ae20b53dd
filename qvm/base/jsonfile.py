"""JSON files that are read while they are rewritten: atomic writes, forgiving reads.

Only ``os`` and ``json``: the supervisor's entry point writes the first state record with
it before anything heavier is imported.
"""

from __future__ import annotations

import json
import os
from typing import Any


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
