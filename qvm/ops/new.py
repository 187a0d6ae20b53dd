"""`qvm new`, the writing half: the document from ``qvm.definition.new`` becomes a machine
file next to the others, never replacing one (a hard link of a finished temporary file),
loaded back to prove it valid, and noted in the VM's run dir with its checksum, so that
``qvm rm --purge`` removes it only while it is still exactly what qvm wrote.
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path
from typing import Any

from qvm.base.urls import is_url
from qvm.definition.load import load_machine
from qvm.definition.new import render
from qvm.definition.schema import Machine
from qvm.errors import DefinitionError, QvmError
from qvm.layout.rundir import RunDir
from qvm.store.new import NewRecord, write_new_record


def write_new(doc: dict[str, Any], path: Path, run: RunDir) -> Machine:
    """Write ``path`` (never over an existing file), check it loads, note qvm made it."""
    text = render(doc)
    if path.exists():
        raise QvmError(
            f"{path}: already exists; qvm new never replaces a machine file "
            f"(hint: pick another name, or qvm rm --purge {path.stem})"
        )
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(text)
    try:
        try:
            load_machine(tmp, name=path.stem)
        except DefinitionError as exc:
            raise QvmError(str(exc).replace(str(tmp), str(path))) from None
        try:
            os.link(tmp, path)
        except FileExistsError:
            raise QvmError(
                f"{path}: already exists; qvm new never replaces a machine file"
            ) from None
    finally:
        tmp.unlink(missing_ok=True)
    run.path.mkdir(parents=True, exist_ok=True)
    os.chmod(run.path, 0o700)
    digest = hashlib.sha256(text.encode()).hexdigest()
    write_new_record(run.new_record, NewRecord(str(path.resolve()), digest))
    return load_machine(path)


# (offset, magic) of the image formats QEMU reads, and of what a raw disk image starts
# with: a partition table, an ISO 9660 or a file system written to the whole disk
IMAGE_SIGNATURES = (
    (0, b"QFI\xfb"),  # qcow2
    (0, b"QED\x00"),
    (0, b"KDMV"),  # vmdk, sparse
    (0, b"# Disk DescriptorFile"),  # vmdk, descriptor
    (0, b"vhdxfile"),
    (0, b"conectix"),  # vpc (dynamic)
    (0x40, b"\x7f\x10\xda\xbe"),  # vdi
    (510, b"\x55\xaa"),  # MBR (also a GPT's protective MBR)
    (512, b"EFI PART"),  # GPT
    (0x8001, b"CD001"),  # ISO 9660
    (1080, b"\x53\xef"),  # ext2/3/4
    (0, b"XFSB"),
    (0, b"hsqs"),  # squashfs
    (0x10040, b"_BHRfS_M"),  # btrfs
)


def check_image(image: str, cwd: Path) -> None:
    """``qvm new --image``: a local file must exist and look like a disk image (checked
    from its first bytes, as ``file`` would), before any file is written. A URL is checked
    by ``new_document`` (it needs a checksum) and when it is downloaded."""
    if is_url(image):
        return
    path = Path(image).expanduser()
    path = path if path.is_absolute() else cwd / path
    problem = _image_problem(path)
    if problem is not None:
        error = QvmError(f"--image {image}: {problem}")
        error.key, error.file = "--image", str(path)
        raise error


def _image_problem(path: Path) -> str | None:
    if not path.exists():
        return "no such file (hint: a disk image file, or an http(s) URL with --sha256)"
    if not path.is_file():
        return "not a regular file (hint: a qcow2 or raw disk image)"
    try:
        with open(path, "rb") as handle:
            head = handle.read(0x10048)
    except OSError as exc:
        return f"cannot be read: {exc.strerror}"
    if not head:
        return "is empty, not a disk image"
    if not any(head[at : at + len(magic)] == magic for at, magic in IMAGE_SIGNATURES):
        return (
            "not a disk image: no qcow2, vmdk, vdi, vhdx or vpc header, no partition table "
            "and no file system at its start (hint: check the path; `qemu-img info` tells "
            "what it is)"
        )
    return None
