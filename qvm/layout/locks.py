"""flock-based locks: held by a live process, released by the kernel when it dies, so
"is it alive?" never depends on a pid.

A supervisor holds two: the run dir itself (an ``O_DIRECTORY`` fd), which cannot be
deleted apart from the folder it is, and ``supervisor.lock``, which qvm versions before it
look at. Deleting ``supervisor.lock`` therefore cannot make a live supervisor look dead.
"""

from __future__ import annotations

import fcntl
import os

from qvm.base.checking import TYPE_CHECKING

if TYPE_CHECKING:
    from collections.abc import Callable
    from types import TracebackType


def try_lock(path: str | os.PathLike[str]) -> int | None:
    """Take an exclusive flock without waiting; return the fd, or None if someone holds it."""
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC | os.O_NOFOLLOW, 0o600)
    return _flock_or_close(fd)


def try_lock_dir(path: str | os.PathLike[str]) -> int | None:
    """The same, on a folder: the lock lives on the folder's inode, so no file inside it
    can be deleted to release it. Raises OSError if the folder cannot be opened."""
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC | os.O_NOFOLLOW)
    return _flock_or_close(fd)


class waiting_lock:  # noqa: N801 - used as the function it was: `with waiting_lock(path):`
    """Hold an exclusive flock on file ``path``, waiting for whoever holds it first. A
    class, not a contextlib.contextmanager: every query imports this module, and
    contextlib would be 0.4 ms of it."""

    __slots__ = ("path", "fd")

    def __init__(self, path: str | os.PathLike[str]) -> None:
        self.path = path
        self.fd: int | None = None

    def __enter__(self) -> None:
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC | os.O_NOFOLLOW, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
        except BaseException:
            os.close(fd)
            raise
        self.fd = fd

    def __exit__(
        self,
        kind: type[BaseException] | None,
        error: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        if self.fd is not None:
            os.close(self.fd)
            self.fd = None


def _flock_or_close(fd: int) -> int | None:
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        return None
    except BaseException:
        os.close(fd)
        raise
    return fd


def is_locked(path: str | os.PathLike[str]) -> bool:
    """True while a live process holds the lock on file ``path``."""
    return os.path.exists(path) and _held(try_lock, path)


def is_dir_locked(path: str | os.PathLike[str]) -> bool:
    """True while a live process holds the lock on folder ``path``."""
    return _held(try_lock_dir, path)


def _held(
    take: Callable[[str | os.PathLike[str]], int | None], path: str | os.PathLike[str]
) -> bool:
    try:
        fd = take(path)
    except OSError:
        return False
    if fd is None:
        return True
    os.close(fd)
    return False


def supervisor_lock_held(
    run_path: str | os.PathLike[str], lock_file: str | os.PathLike[str]
) -> bool:
    """A supervisor of this run dir is alive: it holds the folder's lock, or (one started
    by an earlier qvm) the lock file's."""
    return is_dir_locked(run_path) or is_locked(lock_file)
