"""qvm's cache: ``$QVM_CACHE_DIR``, default ``~/.cache/qvm``. Downloaded base images live
in its ``images`` folder, one file per URL and checksum; parsed machine files in
``definitions`` (``qvm.definition.parsed``).
"""

from __future__ import annotations

import os
import re
from collections.abc import Mapping
from pathlib import Path


def qvm_cache_home(env: Mapping[str, str] | None = None) -> str | None:
    """``$QVM_CACHE_DIR``, else ``$XDG_CACHE_HOME/qvm``, else ``~/.cache/qvm``; None when
    there is no home to put it in."""
    env = os.environ if env is None else env
    if env.get("QVM_CACHE_DIR"):
        return env["QVM_CACHE_DIR"]
    xdg = env.get("XDG_CACHE_HOME", "")
    if xdg and os.path.isabs(xdg):
        return os.path.join(xdg, "qvm")
    home = os.path.expanduser("~")
    return None if home == "~" else os.path.join(home, ".cache", "qvm")


def default_cache_root(env: Mapping[str, str] | None = None) -> Path:
    """The images' folder: ``images`` in ``qvm_cache_home``."""
    home = qvm_cache_home(env)
    return (Path(home) if home is not None else Path.home() / ".cache" / "qvm") / "images"


def cache_key(url: str, algorithm: str, digest: str) -> str:
    import hashlib  # noqa: PLC0415 -- 2 ms; definitions load on every command

    return hashlib.sha256(f"{url}\n{algorithm}:{digest.lower()}".encode()).hexdigest()[:16]


def cached_image(url: str, algorithm: str, digest: str, root: Path | None = None) -> Path:
    """Where the image at ``url`` with this checksum lives in the cache (may not exist yet)."""
    root = default_cache_root() if root is None else root
    tail = url.split("?", 1)[0].rstrip("/").rsplit("/", 1)[-1]
    tail = re.sub(r"[^A-Za-z0-9._-]+", "_", tail)[:80] or "image"
    return root / f"{cache_key(url, algorithm, digest)}-{tail}"
