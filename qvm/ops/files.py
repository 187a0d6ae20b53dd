"""Throwing a VM's disk state away (`qvm reset`) and the VM itself (`qvm rm`).

What each removes, exactly (docs/images.md repeats it):

- ``reset``: the overlays (``disk*.qcow2``), the cloud-init seed (``seed.iso``,
  ``user-data``, ``meta-data``, ``network-config``, ``vendor-data``), ``known_hosts``
  (the guest makes new host keys) and the run-time forwards record. The next ``up``
  starts from the base images and cloud-init runs again. Logs, ``state.json`` and a key
  pair qvm made stay.
- ``rm``: every file qvm made in the run dir (all of the above, logs, state, the key pair
  qvm made; the names are in ``qvm.layout.rundir``), then the folder, except the images
  ``qvm disk attach --new`` made there (``hotplug-*.qcow2``): they hold what the guest
  wrote, maybe a ``[[disk]]`` of the machine file; they are kept, and said so. A file
  qvm did not make stays too (and so does the folder), and is named.
- ``rm --purge``: also the machine file, only if ``qvm new`` wrote it and it is unchanged
  since (its checksum was noted in the run dir), and the images qvm downloaded for it,
  only if no other VM's run dir refers to them.

Never removed: a base image, an image file used as is, any other file the user made.
Both refuse a running VM, and a run dir that is a link or not the user's own.
"""

from __future__ import annotations

import codecs
import contextlib
import hashlib
import os
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

from qvm.errors import RecordError, VmStateError
from qvm.layout.rundir import RunDir, check_private_dir, list_run_dirs, made_by_qvm
from qvm.store.launch import LaunchRecord, read_launch
from qvm.store.new import NewRecord, read_new
from qvm.store.state import read_state


@dataclass
class Removed:
    files: list[Path] = field(default_factory=list)
    kept: list[tuple[Path, str]] = field(default_factory=list)  # (file, why it stayed)


def _require_stopped(run: RunDir, verb: str) -> None:
    from qvm.supervisor.client import (  # noqa: PLC0415 -- not for `qvm logs`
        qemu_identity_problem,
        supervisor_alive,
    )

    if supervisor_alive(run):
        raise VmStateError(
            f"{run.name}: is running; {verb} needs it stopped (hint: qvm down {run.name})"
        )
    # a QEMU whose supervisor was killed may still be using the files
    try:
        state = read_state(run.state_file)
    except RecordError:
        # reset and rm are how a broken run dir is cleared: the lock above already says
        # no supervisor runs, and a record that does not parse names no QEMU to ask about
        state = None
    if state is not None and state.qemu_pid and qemu_identity_problem(run, state) is None:
        raise VmStateError(
            f"{run.name}: its QEMU (pid {state.qemu_pid}) still runs without a supervisor; "
            f"{verb} needs it stopped (hint: qvm kill {run.name})"
        )


@contextlib.contextmanager
def _exclusive(run: RunDir, verb: str) -> Iterator[bool]:
    """The run dir checked (a link or someone else's folder is refused before anything
    in it is touched) and stopped, and its locks held meanwhile, so that no `up` starts a
    QEMU on files being removed. Yields whether the run dir exists."""
    from qvm.supervisor.client import release_run_locks, take_run_locks  # noqa: PLC0415 -- as above

    if not check_private_dir(run.path, "run dir"):
        yield False
        return
    _require_stopped(run, verb)
    had_lock_file = run.lock_file.exists()
    locks = take_run_locks(run)
    if locks is None:  # an `up` won the race
        raise VmStateError(
            f"{run.name}: is running; {verb} needs it stopped (hint: qvm down {run.name})"
        )
    try:
        yield True
    finally:
        if not had_lock_file:  # taking the lock made it: leave the folder as it was
            run.lock_file.unlink(missing_ok=True)
        release_run_locks(locks)


def reset(run: RunDir) -> Removed:
    removed = Removed()
    with _exclusive(run, "reset") as exists:
        if not exists:
            return removed
        disposable = [
            *run.overlays(),
            run.seed_image,
            run.user_data,
            run.meta_data,
            run.network_config,
            run.vendor_data,
            run.known_hosts,
            run.forwards_file,
        ]
        for path in disposable:
            with contextlib.suppress(FileNotFoundError):
                path.unlink()  # a link is removed, never followed
                removed.files.append(path)
    return removed


def remove(run: RunDir, purge: bool) -> Removed:
    """Remove the files qvm made in the run dir (``qvm.layout.rundir.made_by_qvm``), then
    the folder if nothing else is left in it; anything else there is kept, and said."""
    removed = Removed()
    with _exclusive(run, "rm") as exists:
        if purge:
            # both records first: one that does not parse stops rm before it removes anything
            note, launch = read_new(run.new_record), read_launch(run.launch_file)
            _purge_machine_file(note, removed)
            _purge_downloads(run, launch, removed)
        if not exists:
            return removed
        if run.networks_file.exists():
            # a removed VM's addresses go back, or its subnet fills up with the dead
            from qvm.ops.net import give_back_addresses  # noqa: PLC0415 -- networks only

            give_back_addresses(run)
        disks = set(run.new_disk_images())
        why_disk = "made by qvm disk attach --new: the guest's data; delete it yourself when done"
        for entry in sorted(os.scandir(run.path), key=lambda e: e.name):
            path = Path(entry.path)
            if path in disks:
                removed.kept.append((path, why_disk))
            elif made_by_qvm(entry.name) and not entry.is_dir(follow_symlinks=False):
                with contextlib.suppress(FileNotFoundError):
                    path.unlink()
                    if path != run.lock_file:  # rm's own lock is no news to anyone
                        removed.files.append(path)
            else:
                removed.kept.append((path, "not made by qvm"))
        _note_frozen_copies(run, removed)
        if not removed.kept or all(p.parent != run.path for p, _ in removed.kept):
            with contextlib.suppress(OSError):  # something new appeared: it stays
                os.rmdir(run.path)
                # the folder is gone: it stands for the files that were in it
                removed.files = [p for p in removed.files if p.parent != run.path]
                removed.files.append(run.path)
    return removed


def _note_frozen_copies(run: RunDir, removed: Removed) -> None:
    """A template's frozen copies for clones ($STATE/NAME@TAG) outlive it: say so."""
    from qvm.ops.frozen import clones_of, frozen_copies  # noqa: PLC0415 -- not for `qvm logs`

    for tag, frozen in frozen_copies(run):
        users = clones_of(run, tag)
        used = f"used by {', '.join(users)}" if users else "no clone uses it"
        removed.kept.append(
            (
                frozen.path,
                f"the frozen copy of {run.name}@{tag} for clones, {used}; "
                f"qvm snapshot rm {run.name} {tag} removes it once no clone uses it",
            )
        )


def _purge_machine_file(record: NewRecord | None, removed: Removed) -> None:
    if record is None:
        return
    path = Path(record.machine_file)
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        return
    if hashlib.sha256(data).hexdigest() != record.sha256:
        removed.kept.append((path, "changed since qvm new wrote it"))
        return
    path.unlink()
    removed.files.append(path)


def _purge_downloads(run: RunDir, launch: LaunchRecord | None, removed: Removed) -> None:
    from qvm.host.images import remove_cached  # noqa: PLC0415 -- rm --purge only
    from qvm.layout.cache import default_cache_root  # noqa: PLC0415 -- rm --purge only

    cache = os.path.realpath(default_cache_root())
    mine = {os.path.realpath(image.path) for image in launch.images} if launch else set()
    downloads = {p for p in mine if os.path.dirname(p) == cache}
    for path in sorted(downloads):
        users = _other_users(run, path)
        if users:
            removed.kept.append((Path(path), "used by " + ", ".join(users)))
            continue
        if os.path.exists(path):
            remove_cached(Path(path))
            removed.files.append(Path(path))


def _other_users(run: RunDir, path: str) -> list[str]:
    users = []
    for other in list_run_dirs(run.path.parent):
        if other.name == run.name:
            continue
        try:
            launch = read_launch(other.launch_file)
        except RecordError:  # it may use the image: keep it rather than guess
            users.append(f"{other.name} (its launch.json does not parse)")
            continue
        if launch and any(os.path.realpath(image.path) == path for image in launch.images):
            users.append(other.name)
    return users


# --- logs on a terminal ----------------------------------------------------------------


class TerminalSafe:
    """A guest's serial output made safe to show on a terminal: ``feed(chunk)`` returns
    what to write, ``flush()`` what is left at the end (a sequence may span chunks).

    Nothing the guest wrote can drive the terminal (ask it to report its cursor, set its
    title, redefine keys): C0 controls are shown in caret notation (ESC as ``^[``, so
    ``ESC[6n`` reads ``^[[6n``), DEL as ``^?``, other characters that are not printable
    (C1 controls such as U+009B, the 8-bit CSI) as ``\\x9b``/``\\uXXXX``, bytes that are not
    UTF-8 as ``\\xNN``. Newlines and tabs stay; a carriage return before a newline is
    dropped (serial consoles end lines with CR LF), any other shows as ``^M``.
    """

    def __init__(self) -> None:
        self._decoder = codecs.getincrementaldecoder("utf-8")(errors="backslashreplace")
        self._pending_cr = False

    def feed(self, data: bytes) -> bytes:
        return self._render(self._decoder.decode(data, final=False))

    def flush(self) -> bytes:
        text = self._render(self._decoder.decode(b"", final=True))
        if self._pending_cr:
            self._pending_cr = False
            text += b"^M"
        return text

    def _render(self, text: str) -> bytes:
        out: list[str] = []
        for char in text:
            if self._pending_cr:
                self._pending_cr = False
                if char != "\n":
                    out.append("^M")
            if char == "\r":
                self._pending_cr = True
            elif char in "\n\t" or (char.isprintable() and char != "\x7f"):
                out.append(char)
            else:
                out.append(_shown(char))
        return "".join(out).encode()


def _shown(char: str) -> str:
    code = ord(char)
    if code < 0x20:
        return "^" + chr(code + 0x40)
    if code == 0x7F:
        return "^?"
    return f"\\x{code:02x}" if code < 0x100 else f"\\u{code:04x}"
