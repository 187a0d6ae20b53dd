"""Text for messages: paths shown short."""

from __future__ import annotations

from pathlib import Path


def display_path(path: str | Path) -> str:
    """A path as the user would type it: relative to the current folder when inside it."""
    p = Path(path)
    try:
        return str(p.resolve().relative_to(Path.cwd().resolve()))
    except (ValueError, OSError):
        return str(p)
