"""The sha256 of a small file, as `status` and `up` compare a machine file with the one a
VM was started from.

``hashlib`` is not imported for it: its import loads OpenSSL's ``_hashlib``, about 10 ms of
a command's start-up measured here, where CPython's own ``_sha256`` (3.11; ``_sha2`` from
3.12) takes 0.04 ms and hashes a machine file as fast.
"""

from __future__ import annotations

import os

try:
    from _sha256 import sha256  # type: ignore[import-not-found,unused-ignore]
except ImportError:  # Python 3.12+
    try:
        from _sha2 import sha256  # type: ignore[import-not-found,no-redef,unused-ignore]
    except ImportError:  # a Python without CPython's own modules
        from hashlib import sha256  # type: ignore[assignment,unused-ignore]


def sha256_digest(data: bytes) -> bytes:
    """``hashlib.sha256(data).digest()``."""
    digest: bytes = sha256(data).digest()
    return digest


def file_sha256(path: str | os.PathLike[str] | None) -> str | None:
    """The file's sha256 in hex; None for no path or a file that cannot be read."""
    if not path:
        return None
    try:
        with open(path, "rb") as handle:
            data = handle.read()
    except OSError:
        return None
    digest: str = sha256(data).hexdigest()
    return digest
