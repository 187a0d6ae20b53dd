"""JSON files that are read while they are rewritten: atomic writes, forgiving reads.

Only ``os``, ``json`` and the built-in ``_thread``: the supervisor's entry point writes the
first state record with it before anything heavier is imported.

A record is decoded by json's own C scanner (``_json``, what ``json.loads`` runs), without
importing the ``json`` package: it compiles regular expressions at import, and with
``re`` and ``enum`` that is ~5 ms of a query's start-up (measured), more than reading every
record. Whatever that scanner does not accept whole goes to ``json.loads``, which then
says why, in its own words (``tests/unit/base/test_jsonfile.py`` holds the two to the same
answers).
"""

from __future__ import annotations

import errno
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
    import json  # noqa: PLC0415 -- a writer's: queries only read

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
    try:  # noqa: SIM105 - no contextlib on a query's way (0.4 ms)
        os.unlink(path)
    except OSError:
        pass


_CONSTANTS = {"-Infinity": float("-inf"), "Infinity": float("inf"), "NaN": float("nan")}


class _Decoding:
    """What ``json.JSONDecoder()`` hands its C scanner: json.loads' defaults."""

    strict = True
    object_hook = None
    object_pairs_hook = None
    parse_float = float
    parse_int = int
    parse_constant = _CONSTANTS.__getitem__


try:
    from _json import make_scanner as _make_scanner
except ImportError:  # a Python without CPython's accelerator: json.loads it is
    _scan = None
else:
    _scan = _make_scanner(_Decoding())  # type: ignore[arg-type]  # what it reads of one

_SPACE = " \t\n\r"  # json.decoder's WHITESPACE
_NOT_UTF8_START = (0x00, 0xEF, 0xFE, 0xFF)  # a BOM or UTF-16/32: json.detect_encoding's


def loads(raw: bytes) -> Any:
    """``json.loads(raw)``: the same value, or the same exception."""
    if _scan is not None and raw and raw[0] not in _NOT_UTF8_START and 0 not in raw[:4]:
        try:
            text = raw.decode("utf-8", "surrogatepass")
            start = len(text) - len(text.lstrip(_SPACE))
            value, end = _scan(text, start)
        # SystemError: the scanner's message is json.decoder's JSONDecodeError, which it
        # takes from sys.modules and does not import
        except (StopIteration, ValueError, RecursionError, SystemError):
            pass  # json.loads says why
        else:
            if not text[end:].strip(_SPACE):
                return value
    import json  # noqa: PLC0415 -- only for what the C scanner did not take whole

    return json.loads(raw)


def read_json(path: str | os.PathLike[str]) -> dict[str, Any] | None:
    """The object in a JSON file, or None if it is missing, unreadable or not an object."""
    try:
        with open(path, "rb") as handle:
            data = loads(handle.read())
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
        return loads(raw)
    except (ValueError, RecursionError) as error:
        raise ValueError(f"{os.fspath(path)}: not valid JSON ({error})") from error
