"""JSON files that are read while they are rewritten: atomic writes, forgiving reads.

Only ``os``, ``json`` and the built-in ``_thread``: the supervisor's entry point writes the
first state record with it before anything heavier is imported.
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
from _thread import get_ident  # built in: no import cost, unlike threading

from qvm.base.checking import TYPE_CHECKING
from qvm.errors import HostError

if TYPE_CHECKING:
    from typing import Any

# qvm's records are a few KiB; a bigger file is not one of them
MAX_RECORD_BYTES = 4 * 1024**2


class RecordWriteError(HostError):
    """A record could not be written (a full, read-only or failing disk): one line naming
    the file. ``errno`` says which, for a writer that can do something about ENOSPC."""

    def __init__(self, path: str, error: OSError) -> None:
        self.errno = error.errno
        folder = os.path.dirname(path) or "."
        hint = {
            errno.ENOSPC: f"free some space in {folder}",
            errno.EDQUOT: f"free some space in {folder}",
            errno.EROFS: f"{folder} is on a read-only file system",
        }.get(error.errno or 0, f"check that {folder} is writable")
        super().__init__(f"{path}: cannot write: {error.strerror or error} (hint: {hint})")


def write_json_atomic(path: str | os.PathLike[str], data: dict[str, Any]) -> None:
    """Readers see the old file or the new one, never half of one; a failure (ENOSPC,
    EIO, EROFS...) leaves the old file and no temporary one, and is a RecordWriteError."""
    write_text_atomic(path, json.dumps(data, indent=2, sort_keys=True) + "\n")


def write_text_atomic(path: str | os.PathLike[str], text: str, durable: bool = True) -> None:
    """``write_json_atomic`` for a text already made; ``durable`` False for a cache, which
    a crash may lose: no fsync."""
    path = os.fspath(path)
    folder, name = os.path.split(path)
    # the thread too: `qvm up` of several VMs writes from threads (qvm.ops.fanout)
    tmp = os.path.join(folder, f".{name}.{os.getpid()}-{get_ident()}.tmp")
    try:
        # a leftover of an earlier process with our pid, or a link planted under this
        # name: never written through (O_EXCL | O_NOFOLLOW after removing it)
        _unlink_quietly(tmp)
        fd = os.open(
            tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600
        )
        try:
            with open(fd, "w", closefd=True) as handle:
                handle.write(text)
                handle.flush()
                if durable:
                    os.fsync(handle.fileno())
            os.replace(tmp, path)
        except BaseException:
            _unlink_quietly(tmp)
            raise
    except OSError as error:
        raise RecordWriteError(path, error) from error


def _unlink_quietly(path: str) -> None:
    with contextlib.suppress(OSError):
        os.unlink(path)


def read_json(path: str | os.PathLike[str]) -> dict[str, Any] | None:
    """The object in a JSON file, or None if it is missing, unreadable or not an object."""
    try:
        with open(path) as handle:
            data = json.load(handle)
    except (OSError, ValueError, RecursionError):
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
