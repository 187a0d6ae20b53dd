"""Base images from URLs: a download cache keyed by URL and checksum, verified once.

``cached_image`` names the file a URL's image lives in; ``fetch_image`` downloads it there
(once: a complete file in the cache is trusted, because it only appears there by a rename
after its checksum matched). A download goes to ``NAME.part`` next to it, hashed as it
arrives; a bad checksum deletes the partial file and says expected vs got. Two qvm
commands fetching the same image wait for each other on ``NAME.lock``. Progress is
reported through a callback: the core never prints.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import time
from collections.abc import Callable
from pathlib import Path

from qvm.errors import HostError

CHUNK = 1024 * 1024
CONNECT_TIMEOUT = 30.0  # seconds without a byte before a download is given up

# done bytes, total bytes (None when the server does not say)
Progress = Callable[[int, int | None], None]


def fetch_image(
    url: str,
    algorithm: str,
    digest: str,
    target: Path,
    progress: Progress | None = None,
    where: str = "",
) -> bool:
    """Make sure ``target`` holds the verified image; True if it was downloaded now.

    ``where`` prefixes messages (e.g. "machines/vm1.toml: disk[0].base").
    """
    if target.exists():
        return False
    prefix = f"{where}: " if where else ""
    target.parent.mkdir(parents=True, exist_ok=True)
    lock = os.open(target.with_name(target.name + ".lock"), os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(lock, fcntl.LOCK_EX)  # another qvm may be downloading it right now
        if target.exists():
            return False
        _download(url, algorithm, digest.lower(), target, progress, prefix)
        return True
    finally:
        os.close(lock)


def _download(
    url: str, algorithm: str, digest: str, target: Path, progress: Progress | None, prefix: str
) -> None:
    # only a download pays for these (urllib.request: ~17 ms of imports)
    import hashlib  # noqa: PLC0415 -- see the comment above
    import urllib.error  # noqa: PLC0415 -- see the comment above
    import urllib.request  # noqa: PLC0415 -- see the comment above

    part = target.with_name(target.name + ".part")
    hasher = hashlib.new(algorithm)
    done = 0
    try:
        request = urllib.request.Request(url, headers={"User-Agent": "qvm"})
        with (
            urllib.request.urlopen(request, timeout=CONNECT_TIMEOUT) as response,
            open(part, "wb") as out,
        ):
            length = response.headers.get("Content-Length")
            total = int(length) if length and length.isdigit() else None
            last_report = 0.0
            if progress:
                progress(0, total)
            while chunk := response.read(CHUNK):
                out.write(chunk)
                hasher.update(chunk)
                done += len(chunk)
                now = time.monotonic()
                if progress and now - last_report >= 0.1:
                    progress(done, total)
                    last_report = now
            if total is not None and done != total:
                raise HostError(
                    f"{prefix}download of {url} ended after {done} of {total} bytes "
                    "(hint: try again)"
                )
            out.flush()
            os.fsync(out.fileno())
        if progress:
            progress(done, total if total is not None else done)
    except urllib.error.HTTPError as exc:
        part.unlink(missing_ok=True)
        raise HostError(f"{prefix}cannot download {url}: HTTP {exc.code} {exc.reason}") from exc
    except (urllib.error.URLError, OSError, ValueError) as exc:
        part.unlink(missing_ok=True)
        reason = getattr(exc, "reason", None) or exc
        raise HostError(f"{prefix}cannot download {url}: {reason}") from exc
    except BaseException:
        part.unlink(missing_ok=True)
        raise
    got = hasher.hexdigest()
    if got != digest:
        part.unlink(missing_ok=True)
        raise HostError(
            f"{prefix}{algorithm} mismatch for {url}: expected {digest}, got {got}; "
            "deleted the download (hint: check the URL and the checksum in the machine file)"
        )
    os.replace(part, target)


def remove_cached(path: Path) -> None:
    """Delete one cached image and its lock file (only on the user's request)."""
    for file in (path, path.with_name(path.name + ".lock"), path.with_name(path.name + ".part")):
        with contextlib.suppress(FileNotFoundError):
            file.unlink()
