"""Where downloaded base images live: ``$QVM_CACHE_DIR/images``, default
``~/.cache/qvm/images``, one file per URL and checksum.
"""

from __future__ import annotations

import os
import re
from collections.abc import Mapping
from pathlib import Path


def default_cache_root(env: Mapping[str, str] | None = None) -> Path:
    """``$QVM_CACHE_DIR/images``, else ``$XDG_CACHE_HOME/qvm/images`` (~/.cache/qvm/images)."""
    env = os.environ if env is None else env
    if env.get("QVM_CACHE_DIR"):
        return Path(env["QVM_CACHE_DIR"]) / "images"
    xdg = env.get("XDG_CACHE_HOME", "")
    base = Path(xdg) if xdg and Path(xdg).is_absolute() else Path.home() / ".cache"
    return base / "qvm" / "images"


def cache_key(url: str, algorithm: str, digest: str) -> str:
    import hashlib  # lazily: definitions load on every command

    return hashlib.sha256(f"{url}\n{algorithm}:{digest.lower()}".encode()).hexdigest()[:16]


def cached_image(url: str, algorithm: str, digest: str, root: Path | None = None) -> Path:
    """Where the image at ``url`` with this checksum lives in the cache (may not exist yet)."""
    root = default_cache_root() if root is None else root
    tail = url.split("?", 1)[0].rstrip("/").rsplit("/", 1)[-1]
    tail = re.sub(r"[^A-Za-z0-9._-]+", "_", tail)[:80] or "image"
    return root / f"{cache_key(url, algorithm, digest)}-{tail}"
