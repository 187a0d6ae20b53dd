"""``qemu-img``: image formats, overlays on base images, new images.
"""

from __future__ import annotations

from pathlib import Path

from qvm.errors import HostError

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
    import subprocess

    argv = ["qemu-img", "create", "-q", "-f", "qcow2", *(options or []), str(path)]
    if size is not None:
        argv.append(str(size))
    try:
        done = subprocess.run(argv, capture_output=True, text=True, timeout=60, check=False)
    except OSError as exc:
        raise HostError(
            f"qemu-img: cannot run it: {exc} (hint: apt-get install qemu-utils)"
        ) from exc
    if done.returncode != 0:
        path.unlink(missing_ok=True)
        raise HostError(f"qemu-img create {path}: {done.stderr.strip()}")
