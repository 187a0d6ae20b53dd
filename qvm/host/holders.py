"""Is an image this VM needs already taken by another QEMU? Asked before QEMU starts.

QEMU locks its images with OFD locks on bytes 100.. of the file (one byte per permission
it holds, and per permission it refuses to share, from byte 200). Two questions:

- which qvm VM uses the file: the other run dirs' ``launch.json`` record their images
  (older records: the ``filename=`` options of their argv) and ``devices.json`` the
  images attached since (``qvm disk attach``), so the message names the VM;
- is any process holding QEMU's locks on it (a QEMU qvm does not manage): probed with
  ``F_OFD_GETLK``, which tests a lock without taking it.
"""

from __future__ import annotations

import fcntl
import os
import struct
from collections.abc import Iterable
from pathlib import Path

from qvm.errors import RecordError
from qvm.layout.locks import supervisor_lock_held
from qvm.layout.rundir import RunDir, list_run_dirs
from qvm.store.launch import Image, LaunchRecord, read_launch
from qvm.store.state import read_state

_LOCK_PERM_BASE = 100  # QEMU's RAW_LOCK_PERM_BASE
_WRITE_BIT = 1  # BLK_PERM_WRITE
_FLOCK = "hhqqi4x"  # struct flock on x86_64: type, whence, start, len, pid


def image_records(launch: LaunchRecord) -> tuple[Image, ...]:
    """A run's images, from its record or, in a record older than its images list, its
    argv (a run without disks then lists its read-only cloud-init seed: harmless)."""
    if launch.images:
        return launch.images
    found = []
    for arg in launch.argv:
        if not arg.startswith("driver=file,"):
            continue
        opts = dict(part.split("=", 1) for part in arg.split(",") if "=" in part)
        if "filename" in opts:
            found.append(Image(opts["filename"], writable=opts.get("read-only", "off") != "on"))
    return tuple(found)


def users_of(path: Path, state_root: Path, exclude: str) -> list[tuple[str, bool]]:
    """(VM name, writes it) for every running qvm VM but ``exclude`` using ``path``."""
    real = os.path.realpath(path)
    users = []
    for run in list_run_dirs(state_root):
        if run.name == exclude or not supervisor_lock_held(run.path, run.lock_file):
            continue
        try:
            launch = read_launch(run.launch_file)
        except RecordError:  # QEMU's own image locks, probed next, still catch a conflict
            launch = None
        images = list(image_records(launch)) if launch is not None else []
        # only while another VM runs: `qvm up` of a lone VM does without the module
        from qvm.store.devices import device_records  # noqa: PLC0415 -- see the comment above

        try:  # attached since it started (qvm disk attach)
            attached = device_records(run)
        except RecordError:
            attached = ()
        images += [
            Image(d.file, writable=not d.readonly) for d in attached if d.kind == "disk" and d.file
        ]
        for image in images:
            if os.path.realpath(image.path) == real:
                users.append((run.name, image.writable))
    return users


def locked_by_someone(path: Path, write: bool) -> bool:
    """True if a process holds QEMU locks that forbid opening ``path`` this way.

    ``write``: we want to write it (then any QEMU lock conflicts); else we only read it
    and only another writer conflicts.
    """
    getlk = getattr(fcntl, "F_OFD_GETLK", None)
    if getlk is None:
        return False
    start, length = (_LOCK_PERM_BASE, 200) if write else (_LOCK_PERM_BASE + _WRITE_BIT, 1)
    try:
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    except OSError:
        return False
    try:
        request = struct.pack(_FLOCK, fcntl.F_WRLCK, os.SEEK_SET, start, length, 0)
        reply = fcntl.fcntl(fd, getlk, request)
    except OSError:
        return False
    finally:
        os.close(fd)
    held: int = struct.unpack(_FLOCK, reply)[0]
    return held != fcntl.F_UNLCK


def image_conflicts(
    images: Iterable[tuple[str, Path, bool]], run: RunDir
) -> list[tuple[str, Path, str]]:
    """(key, path, who) for each image this VM cannot open because another QEMU has it.

    ``images``: (key path in the definition, file, this VM writes it).
    """
    conflicts = []
    state_root = run.path.parent
    own_qemu = _own_qemu_pid(run)
    for key, path, write in images:
        users = users_of(path, state_root, exclude=run.name)
        blocking = [name for name, writes in users if write or writes]
        if blocking:
            names = ", ".join(f"VM {name}" for name in blocking)
            conflicts.append((key, path, f"{names} (hint: qvm down {blocking[0]})"))
        elif own_qemu is not None and _has_open(own_qemu, path):
            # this VM's own QEMU (`qvm restart` plans before it stops it; a disk attached
            # with --persist is in the definition now): its locks go with it
            continue
        elif locked_by_someone(path, write):
            conflicts.append(
                (key, path, "another process (hint: 'lslocks' or 'fuser' shows which)")
            )
    return conflicts


def _own_qemu_pid(run: RunDir) -> int | None:
    """The pid of this VM's QEMU while its supervisor runs, else None."""
    if not supervisor_lock_held(run.path, run.lock_file):
        return None
    try:
        state = read_state(run.state_file)
    except RecordError:
        return None
    return state.qemu_pid if state is not None else None


def _has_open(pid: int, path: Path) -> bool:
    """Whether process ``pid`` has ``path`` open (as far as this user may see)."""
    wanted = _real(path)
    try:
        fds = os.scandir(f"/proc/{pid}/fd")
    except OSError:
        return False
    with fds:
        for fd in fds:
            try:
                if os.readlink(fd.path) == wanted:
                    return True
            except OSError:
                continue
    return False


# --- who holds a file --------------------------------------------------------------------


def _real(path: str | Path) -> str:
    return os.path.realpath(path)


def file_holders(path: Path) -> list[tuple[int, str]]:
    """(pid, command name) of every process with ``path`` open (that this user may see)."""
    holders = []
    for entry in os.scandir("/proc"):
        if entry.name.isdigit() and _has_open(int(entry.name), path):
            holders.append((int(entry.name), _comm(int(entry.name))))
    return holders


def _comm(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/comm").read_text().strip()
    except OSError:
        return "?"


def vm_of_qemu_pid(state_root: Path, pid: int) -> str | None:
    """The qvm VM whose QEMU has this pid, if any."""
    for other in list_run_dirs(state_root):
        try:
            state = read_state(other.state_file)
        except RecordError:  # only names a holder: "pid 123 (qemu-system-x86)" will do
            continue
        if state is not None and state.qemu_pid == pid:
            return other.name
    return None


def describe_holders(state_root: Path, path: Path, exclude_pid: int | None) -> str | None:
    """``VM vm2 (pid 123)`` or ``pid 123 (qemu-io)``: who else has ``path`` open."""
    found = []
    for pid, comm in file_holders(path):
        if pid == exclude_pid:
            continue
        vm = vm_of_qemu_pid(state_root, pid)
        found.append(f"VM {vm} (pid {pid})" if vm else f"pid {pid} ({comm})")
    return ", ".join(found) or None
