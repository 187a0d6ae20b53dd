"""``qemu-img``: image formats, overlays on base images, new images."""

from __future__ import annotations

from pathlib import Path

from qvm.errors import HostError
from qvm.host.tools import run_tool

QCOW2_MAGIC = b"QFI\xfb"


def detect_format(path: Path) -> str:
    try:
        with open(path, "rb") as handle:
            return "qcow2" if handle.read(4) == QCOW2_MAGIC else "raw"
    except OSError:
        return "raw"


def ensure_overlay(base: Path, base_format: str, overlay: Path, size: int | None) -> None:
    """Create the per-VM copy-on-write overlay once; the base image is only ever read."""
    if overlay.exists():
        return
    qemu_img_create(overlay, size, ["-F", base_format, "-b", str(base)])


def qemu_img_create(path: Path, size: int | None, options: list[str] | None = None) -> None:
    """``qemu-img create -f qcow2 [OPTIONS] PATH [SIZE]``; a half-made file is removed."""
    argv = ["qemu-img", "create", "-q", "-f", "qcow2", *(options or []), str(path)]
    if size is not None:
        argv.append(str(size))
    try:
        run_tool(argv, "qemu-utils", timeout=60, what=f"qemu-img create {path}")
    except HostError:
        path.unlink(missing_ok=True)
        raise
