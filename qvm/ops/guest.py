"""`qvm exec` and `qvm cp`: a program run in the guest, files copied in and out, all
through the guest agent (no network, no ssh).

The agent serves one client at a time (``qvm.control.agent``): a command keeps it to
itself only while it needs it. `exec` holds it for the first ``HOLD_SECONDS`` (a short
command is over by then, polled on one connection: the fast case), then takes it for one
``guest-exec-status`` at a time, so that a long-running command does not shut out
`qvm status` or a hotplug. `cp` holds it for the whole copy (its file handle is the
agent's, and the copy is one request after another).

Writing on the host, `cp` writes a hidden temporary file next to the target
(``.NAME.XXXX.qvm-part``) and renames it over the target once all of it is there:
a copy that fails midway (the VM killed, the channel gone) leaves the target as it was.
"""

from __future__ import annotations

import contextlib
import os
import posixpath
import stat
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from pathlib import Path

from qvm.base.record import Record
from qvm.control import guest_exec, guest_files
from qvm.control.agent import AgentClient, open_agent
from qvm.control.guest_exec import ExecStatus
from qvm.errors import AgentCommandError, AgentError, QvmError
from qvm.layout.names import is_vm_name
from qvm.layout.rundir import RunDir
from qvm.store.launch import read_launch

HOLD_SECONDS = 1.0
# the environment a command gets with --env when the agent's own cannot be read
# (/proc/self/environ is Linux's): Debian's default PATH
FALLBACK_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"

Progress = Callable[[int, int | None], None]  # (bytes done, total or None)


# --- exec ----------------------------------------------------------------------------------


class ExecOutcome(Record):
    """How a command run in the guest ended: ``status`` (exit code, signal, output); or,
    with ``timed_out``, that it still ran when --timeout came (``running``: the agent
    said ``exited`` false at the last look)."""

    argv: tuple[str, ...]
    pid: int
    seconds: float
    status: ExecStatus | None
    timed_out: bool = False
    running: bool = False


def parse_env(items: Sequence[str]) -> dict[str, str]:
    """``--env K=V`` options as a mapping; ValueError naming the bad one."""
    env: dict[str, str] = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key or "\0" in item:
            raise ValueError(f"--env {item}: expected NAME=VALUE")
        env[key] = value
    return env


def parse_environ(data: bytes) -> dict[str, str]:
    """``/proc/PID/environ`` (NUL-separated NAME=VALUE) as a mapping."""
    env: dict[str, str] = {}
    for entry in data.decode(errors="replace").split("\0"):
        key, sep, value = entry.partition("=")
        if sep and key:
            env[key] = value
    return env


def command_environment(client: AgentClient, extra: Mapping[str, str]) -> dict[str, str]:
    """The agent's own environment with ``extra`` on top: ``guest-exec`` replaces the
    environment with what it is given, and --env means "add these"."""
    try:
        base = parse_environ(guest_files.read_small(client, "/proc/self/environ"))
    except AgentCommandError:
        base = {"PATH": FALLBACK_PATH}
    return {**base, **extra}


def run_command(
    run: RunDir,
    argv: Sequence[str],
    env: Mapping[str, str] | None = None,
    stdin: bytes | None = None,
    timeout: float | None = None,
    on_started: Callable[[int], None] | None = None,
) -> ExecOutcome:
    """Run ``argv`` in the guest and wait for it to end, or for ``timeout`` seconds.

    A program that cannot be started: the agent's AgentCommandError. ``on_started(pid)``
    is called once it runs (the CLI names the pid if it is interrupted)."""
    if stdin is not None and len(stdin) > guest_exec.MAX_INPUT:
        raise QvmError(
            f"{run.name}: --stdin: {len(stdin)} bytes is more than the agent takes in one"
            f" request ({guest_exec.MAX_INPUT // 1024**2} MiB)"
            " (hint: qvm cp the data into the guest and redirect from it there)"
        )
    started = time.monotonic()
    deadline = None if not timeout else started + timeout
    delays = guest_exec.poll_delays()
    with open_agent(run) as client:
        environment = None if env is None else command_environment(client, env)
        pid = guest_exec.start(client, argv, environment, stdin)
        if on_started is not None:
            on_started(pid)
        hold_until = started + HOLD_SECONDS
        result = _poll(
            client, pid, delays, hold_until if deadline is None else min(hold_until, deadline)
        )
    while result is None:
        now = time.monotonic()
        if deadline is not None and now >= deadline:
            return ExecOutcome(tuple(argv), pid, now - started, None, timed_out=True, running=True)
        delay = next(delays)
        time.sleep(delay if deadline is None else min(delay, deadline - now))
        with open_agent(run) as client:
            polled = guest_exec.status(client, pid)
        result = polled if polled.exited else None
    return ExecOutcome(tuple(argv), pid, time.monotonic() - started, result)


def _poll(
    client: AgentClient, pid: int, delays: Iterator[float], until: float
) -> ExecStatus | None:
    """Poll on this connection until the command ends (its status) or ``until`` (None)."""
    while True:
        time.sleep(max(0.0, min(next(delays), until - time.monotonic())))
        result = guest_exec.status(client, pid)
        if result.exited:
            return result
        if time.monotonic() >= until:
            return None


# --- cp ------------------------------------------------------------------------------------


class CopyOutcome(Record):
    source: str
    target: str
    size: int
    seconds: float
    mode: int | None  # the permission bits given to the copy; None: the guest could not tell


def split_remote(spec: str) -> tuple[str, str] | None:
    """``NAME:PATH`` as (NAME, PATH); None for a local path. A path with a colon in its
    first part is local when written with a slash before it (``./a:b``)."""
    name, sep, path = spec.partition(":")
    if not sep or not path or "/" in name or not is_vm_name(name):
        return None
    return name, path


def copy_from_guest(
    run: RunDir,
    guest_path: str,
    local: Path,
    progress: Progress | None = None,
    recursive: bool = False,
) -> CopyOutcome:
    """``guest_path`` into ``local`` (a folder: the file keeps its name; with
    ``recursive``, a guest folder and every file in it), each by way of a temporary file
    renamed into place at the end."""
    started = time.monotonic()
    mode: int | None
    with open_agent(run) as client:
        info = guest_files.stat(client, guest_path)
        if info is not None and info.kind == "directory":
            if not recursive:
                raise QvmError(
                    f"{run.name}:{guest_path}: is a folder (hint: qvm cp -r copies a folder)"
                )
            target = _local_tree_target(local, guest_path, run.name)
            done = _get_tree(client, guest_path, target, progress)
            mode = info.mode & 0o777
            with contextlib.suppress(OSError):
                os.chmod(target, mode)
        else:
            target = local_target(local, guest_path, run.name)
            done, mode = _get_file(client, guest_path, target, progress, info)
    return CopyOutcome(
        source=f"{run.name}:{guest_path}",
        target=str(target),
        size=done,
        seconds=time.monotonic() - started,
        mode=mode,
    )


def _get_file(
    client: AgentClient,
    guest_path: str,
    target: Path,
    progress: Progress | None,
    info: guest_files.GuestStat | None,
) -> tuple[int, int | None]:
    handle = guest_files.open_file(client, guest_path, "r")
    with _closing(client, handle):
        mode = None if info is None else info.mode & 0o777
        total = None if info is None else info.size
        with _replacing(target, mode) as out, _failing(f"; {target} not written"):
            done = 0
            while True:
                data, eof = guest_files.read_chunk(client, handle)
                out.write(data)
                done += len(data)
                if progress is not None:
                    progress(done, total)
                if eof or not data:
                    break
    return done, mode


def _local_tree_target(local: Path, guest_path: str, vm: str) -> Path:
    """Where a guest folder goes: ``local`` when it does not exist yet, else a folder of
    the guest folder's name inside it (as `cp -r` has it)."""
    if not local.exists():
        if not local.parent.is_dir():
            raise QvmError(f"{local}: no such folder {local.parent} on this host")
        return local
    if not local.is_dir():
        raise QvmError(f"{local}: is a file: a folder cannot be copied over it")
    name = posixpath.basename(posixpath.normpath(guest_path))
    if name in ("", ".", "..", "/"):
        raise QvmError(f"{vm}:{guest_path}: names no folder to copy into {local}")
    return local / name


def _get_tree(client: AgentClient, guest_dir: str, target: Path, progress: Progress | None) -> int:
    """Every folder and regular file under ``guest_dir`` into ``target``, as ``find``
    in the guest lists them (links and special files are left out, as `cp -r` of files
    would)."""
    folders = guest_files.find(client, guest_dir, "d")
    files = guest_files.find(client, guest_dir, "f")
    base = guest_dir.rstrip("/") or "/"
    done = 0
    for folder in folders:
        relative = posixpath.relpath(folder, base)
        local = target if relative == "." else target / relative
        _check_inside(local, target)
        local.mkdir(parents=True, exist_ok=True)
    for file in files:
        local = target / posixpath.relpath(file, base)
        _check_inside(local, target)
        written, _ = _get_file(client, file, local, progress, guest_files.stat(client, file))
        done += written
    return done


def _check_inside(path: Path, folder: Path) -> None:
    """A name from the guest must not lead out of the folder it is copied into."""
    if path != folder and ".." in path.relative_to(folder).parts:
        raise QvmError(f"{path}: a guest path that leads out of {folder}; nothing more copied")


def copy_to_guest(
    run: RunDir,
    local: Path,
    guest_path: str,
    progress: Progress | None = None,
    owner: str | None = None,
    recursive: bool = False,
) -> CopyOutcome:
    """``local`` into the guest at ``guest_path`` (a folder there: the file keeps its
    name; with ``recursive``, a folder and all in it), with its permission bits, owned by
    ``owner`` (``USER[:GROUP]``; None: ``default_owner``).

    Each file is written to a hidden part file beside its target, made 0600 before any
    data goes in, and renamed over the target only once complete: a copy that fails or is
    interrupted removes its part file and leaves the target as it was. An agent that runs
    no programs (``guest-exec`` disabled) gets the file written in place, as is."""
    try:
        info = os.stat(local)
    except OSError as error:
        raise QvmError(f"{local}: cannot read: {error.strerror or error}") from None
    if stat.S_ISDIR(info.st_mode) and not recursive:
        raise QvmError(f"{local}: is a folder (hint: qvm cp -r copies a folder)")
    if not stat.S_ISDIR(info.st_mode) and not stat.S_ISREG(info.st_mode):
        raise QvmError(f"{local}: not a regular file (qvm cp copies files and folders)")
    started = time.monotonic()
    parts: list[str] = []  # the part file being written, for the cleanup
    try:
        with open_agent(run) as client:
            if owner is None:
                owner = default_owner(run, guest_path)
            helpers = guest_files.can_run_helpers(client)
            target = _guest_target(client, local, guest_path, helpers)
            upload = _Upload(client, owner, helpers, parts, progress)
            put = _put_tree if stat.S_ISDIR(info.st_mode) else _put_file
            done, mode = put(upload, local, target)
    except BaseException:
        for part in parts:
            _remove_quietly(run, part)
        raise
    return CopyOutcome(
        source=str(local),
        target=f"{run.name}:{target}",
        size=done,
        seconds=time.monotonic() - started,
        mode=mode,
    )


def default_owner(run: RunDir, guest_path: str) -> str | None:
    """Whom a copy belongs to when --owner is not given: the cloud-init user (with their
    login group) for a path under their home, which they could not read otherwise;
    else None, the agent's own user (root)."""
    try:
        launch = read_launch(run.launch_file)
    except QvmError:
        return None
    user = launch.ssh.user if launch is not None and launch.ssh is not None else None
    if user and posixpath.normpath(guest_path).startswith(f"/home/{user}/"):
        return f"{user}:"
    return None


def _guest_target(client: AgentClient, local: Path, guest_path: str, helpers: bool) -> str:
    """Where ``local`` goes: ``guest_path``, or ``guest_path/NAME`` when that is a folder
    (``cp`` and ``cp -r`` have it so)."""
    if guest_path.endswith("/"):
        return guest_path + local.name
    info = guest_files.stat(client, guest_path) if helpers else None
    if info is not None and info.kind == "directory":
        return posixpath.join(guest_path, local.name)
    return guest_path


class _Upload(Record):
    """What every file of one ``copy_to_guest`` is written with."""

    client: AgentClient
    owner: str | None
    helpers: bool  # the agent runs programs: part files, chmod, chown, rename
    parts: list[str]  # the part files being written, for the cleanup
    progress: Progress | None


def _put_tree(upload: _Upload, local: Path, target: str) -> tuple[int, int | None]:
    client, owner = upload.client, upload.owner
    if not upload.helpers:
        raise QvmError(
            f"{client.name}: the guest agent runs no programs (guest-exec): qvm cp -r cannot"
            " make folders there"
        )
    done = 0
    for folder, names, files in os.walk(local):
        names.sort()
        relative = os.path.relpath(folder, local)
        guest_folder = target if relative == "." else posixpath.join(target, relative)
        if not guest_files.make_dirs(client, guest_folder):
            raise QvmError(f"{client.name}:{guest_folder}: cannot make this folder (in the guest)")
        mode = os.stat(folder).st_mode & 0o777
        guest_files.chmod(client, guest_folder, mode)
        if owner is not None:
            guest_files.chown(client, guest_folder, owner)
        for name in sorted(files):
            path = Path(folder) / name
            if path.is_symlink() or not path.is_file():
                continue  # links and special files are not copied, as `cp -r` would not
            written, _ = _put_file(upload, path, posixpath.join(guest_folder, name))
            done += written
    return done, os.stat(local).st_mode & 0o777


def _put_file(upload: _Upload, local: Path, target: str) -> tuple[int, int | None]:
    """One file to ``target`` by way of a 0600 part file; (bytes, mode set or None)."""
    client, owner, helpers, progress = upload.client, upload.owner, upload.helpers, upload.progress
    try:
        source = open(local, "rb")  # noqa: SIM115 - closed below, after the guest's side
    except OSError as error:
        raise QvmError(f"{local}: cannot read: {error.strerror or error}") from None
    with source:
        info = os.fstat(source.fileno())
        folder, name = posixpath.split(target)
        part = posixpath.join(folder, f".{name}.{os.getpid()}.qvm-part") if helpers else target
        handle = guest_files.open_file(client, part, "w", shown=target)
        if helpers:
            upload.parts.append(part)
            guest_files.chmod(client, part, 0o600)  # before any byte is in it
        consequence = "; the partial copy was removed" if helpers else f"; {target} is incomplete"
        with _closing(client, handle), _failing(consequence):
            done = 0
            while data := source.read(guest_files.WRITE_CHUNK):
                guest_files.write_chunk(client, handle, data)
                done += len(data)
                if progress is not None:
                    progress(done, info.st_size)
    if not helpers:
        return done, None
    if owner is not None and not guest_files.chown(client, part, owner):
        raise QvmError(
            f"{client.name}:{target}: cannot give it to {owner} (no such user or group in"
            " the guest?); the partial copy was removed"
        )
    mode = info.st_mode & 0o777
    kept = guest_files.chmod(client, part, mode)  # after chown, which clears setuid bits
    if not guest_files.rename(client, part, target):
        raise QvmError(
            f"{client.name}:{target}: cannot put the copy in place (mv {part} failed in the"
            " guest); the partial copy was removed"
        )
    upload.parts.remove(part)
    return done, mode if kept else None


def _remove_quietly(run: RunDir, part: str) -> None:
    """Remove a part file a failed or interrupted copy left, on a fresh connection (the
    one the copy used may be mid-request); a guest that is gone keeps it."""
    with contextlib.suppress(QvmError, OSError), open_agent(run, lock_timeout=5) as client:
        guest_files.remove(client, part)


def local_target(local: Path, guest_path: str, vm: str) -> Path:
    """Where a copy out of the guest goes: ``local``, or the guest file's name in it when
    it is a folder. Its folder must exist."""
    if local.is_dir():
        name = posixpath.basename(guest_path.rstrip("/"))
        if not name:
            raise QvmError(f"{vm}:{guest_path}: names no file")
        return local / name
    parent = local.parent
    if not parent.is_dir():
        raise QvmError(f"{local}: no such folder {parent} on this host")
    return local


@contextlib.contextmanager
def _closing(client: AgentClient, handle: int) -> Iterator[None]:
    """Close the guest's file handle after use; when the copy already failed (the channel
    may be gone), a failure to close is not the news."""
    try:
        yield
    except BaseException:
        with contextlib.suppress(AgentError):
            guest_files.close_file(client, handle)
        raise
    guest_files.close_file(client, handle)


@contextlib.contextmanager
def _failing(consequence: str) -> Iterator[None]:
    """An agent error midway through a copy, with what it left behind."""
    try:
        yield
    except AgentError as error:
        raise AgentError(f"{error}{consequence}") from None


class _Sink:
    def __init__(self, fd: int) -> None:
        self.fd = fd

    def write(self, data: bytes) -> None:
        view = memoryview(data)
        while view:
            view = view[os.write(self.fd, view) :]


@contextlib.contextmanager
def _replacing(target: Path, mode: int | None) -> Iterator[_Sink]:
    """A temporary file next to ``target``, renamed over it when the block completes,
    removed when it does not."""
    import tempfile  # noqa: PLC0415 -- 7 ms (shutil, lzma, ...) `qvm exec` does not need

    try:
        fd, temp = tempfile.mkstemp(
            prefix=f".{target.name}.", suffix=".qvm-part", dir=target.parent
        )
    except OSError as error:
        raise QvmError(
            f"{target.parent}: cannot write a file there: {error.strerror or error}"
        ) from None
    try:
        try:
            yield _Sink(fd)
            os.fchmod(fd, mode if mode is not None else 0o666 & ~_umask())
            os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(temp, target)
    except OSError as error:
        with contextlib.suppress(OSError):
            os.unlink(temp)
        raise QvmError(f"{target}: cannot write: {error.strerror or error}") from None
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(temp)
        raise


def _umask() -> int:
    mask = os.umask(0o022)
    os.umask(mask)
    return mask
