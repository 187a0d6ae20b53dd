"""Internal snapshots in qcow2 images through ``qemu-img``, for a stopped VM (and to
read which snapshots an image holds while QEMU has it open: ``-U``)."""

from __future__ import annotations

import json
from pathlib import Path

from qvm.errors import VmStateError
from qvm.host.tools import run_tool


def image_snapshots(path: Path) -> tuple[str, ...]:
    """The tags of the internal snapshots in an image (read even while QEMU holds it)."""
    out = run_tool(
        ["qemu-img", "info", "-U", "--output=json", str(path)],
        "qemu-utils",
        timeout=60,
        what=f"qemu-img info {path}",
    )
    try:
        info = json.loads(out)
    except ValueError as error:
        raise VmStateError(f"qemu-img info {path}: not JSON ({error})") from error
    return tuple(str(s.get("name")) for s in info.get("snapshots") or ())


def qemu_img_snapshot(flag: str, tag: str, path: Path) -> None:
    run_tool(
        ["qemu-img", "snapshot", flag, tag, str(path)],
        "qemu-utils",
        timeout=300,
        what=f"qemu-img snapshot {flag} {tag} {path}",
    )
