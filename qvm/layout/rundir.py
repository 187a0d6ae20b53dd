"""One folder per VM, and every file in it as a ``Path`` (their names are in
``qvm.layout.runfiles``), or as a string (``RunDir.file``).

The folder outlives the VM: its logs and ``state.json`` say how the last run ended.
Sockets exist only while QEMU runs. ``supervisor.lock`` is held (flock) for exactly as
long as a supervisor lives, so "is a supervisor alive?" never depends on a pid that the
kernel may have handed to another process.

A ``RunDir`` is its folder's path as a string; its ``Path``s are made when asked for. The
queries (`status`, `list`, `cpu list`) name their files with ``RunDir.file`` and the
state root as a string, and so never import pathlib: with the urllib.parse and ipaddress
it imports, ~3 ms of each (measured; ``tests/unit/cli/test_cli_imports.py`` keeps it so).
"""

from __future__ import annotations

import os
import stat

from qvm.base.checking import TYPE_CHECKING
from qvm.errors import HostError, UnsafeStateError
from qvm.layout import runfiles
from qvm.layout.names import check_vm_name, is_vm_name
from qvm.layout.runfiles import (
    AGENT_CHARDEV_SOCKET,
    AGENT_LOCK,
    AGENT_SOCKET,
    CLONE_FILE,
    CONSOLE_SOCKET,
    CONTROL_LOCK,
    CPU_UNPLUGGED_FILE,
    DEVICES_FILE,
    EVENTS_SOCKET,
    FORWARDS_FILE,
    FREEZE_LOCK,
    KNOWN_HOSTS,
    LAUNCH_FILE,
    META_DATA,
    NETWORK_CONFIG,
    NETWORK_STATE_FILE,
    NETWORKS_FILE,
    NEW_RECORD,
    PENDING_FILE,
    QEMU_LOG,
    QEMU_SOCKETS,
    QMP_SOCKET,
    SEED_IMAGE,
    SERIAL_LOG,
    SHARES_FILE,
    SNAPSHOTS_FILE,
    SPACE_RESERVE_FILE,
    STATE_DISK,
    STATE_FILE,
    SUPERVISOR_LOCK,
    SUPERVISOR_LOG,
    SUPERVISOR_SOCKET,
    USER_DATA,
    VENDOR_DATA,
    VIEW_FILE,
)

if TYPE_CHECKING:
    from collections.abc import Mapping
    from pathlib import Path

# sun_path is 108 bytes including the terminating NUL
MAX_SOCKET_PATH = 107

SOCKET_NAMES = (*QEMU_SOCKETS, AGENT_SOCKET, SUPERVISOR_SOCKET)


# Every file qvm makes in a run dir, by exact name (the properties below say what each
# is) or by pattern: `qvm rm` removes these and nothing else; a file of the user's in the
# run dir stays, and so does the folder with it.
QVM_FILE_NAMES = frozenset(
    {
        *SOCKET_NAMES,
        AGENT_LOCK,
        SERIAL_LOG,
        "serial.log.1",
        QEMU_LOG,
        "qemu.log.1",
        SUPERVISOR_LOG,
        STATE_FILE,
        VIEW_FILE,
        LAUNCH_FILE,
        SUPERVISOR_LOCK,
        SPACE_RESERVE_FILE,
        CONTROL_LOCK,
        PENDING_FILE,
        CPU_UNPLUGGED_FILE,
        DEVICES_FILE,
        SEED_IMAGE,
        USER_DATA,
        META_DATA,
        NETWORK_CONFIG,
        VENDOR_DATA,
        KNOWN_HOSTS,
        FORWARDS_FILE,
        NEW_RECORD,
        SHARES_FILE,
        NETWORKS_FILE,
        NETWORK_STATE_FILE,
        "id_ed25519",  # the key pair qvm makes (qvm.host.cloudinit.GENERATED_KEY)
        "id_ed25519.pub",
        SNAPSHOTS_FILE,
        STATE_DISK,
        CLONE_FILE,
        # a frozen copy ($STATE/VM@TAG/, qvm.ops.clone): the snapshot's RAM and device
        # state as a migration stream, and the same while it is being written
        "memory.bin",
        "memory.bin.part",
        FREEZE_LOCK,
    }
)
# disk overlays; temporary files of atomic writes (".NAME.PID.tmp", ".NAME.PID-THREAD.tmp");
# virtiofsd's sockets (qvm.layout.runfiles.share_socket_name)
QVM_FILE_PATTERNS = (
    r"disk[0-9]+\.qcow2",
    r"\.[A-Za-z0-9_.-]+\.[0-9]+(-[0-9]+)?\.tmp",
    r"share-[A-Za-z0-9_-]+\.sock",
)


def made_by_qvm(name: str) -> bool:
    """Whether a run-dir entry of this name is one qvm makes (not ``hotplug-*.qcow2``:
    those hold a guest's data, and `rm` keeps them)."""
    if name in QVM_FILE_NAMES:
        return True
    import re  # noqa: PLC0415 -- `qvm rm`'s: no query compiles a pattern

    return any(re.fullmatch(p, name) for p in QVM_FILE_PATTERNS)


def path_text(path: str | os.PathLike[str]) -> str:
    """``str(Path(path))`` without pathlib: the same text, "." for an empty one, no
    repeated "/" (but a leading "//", which POSIX leaves to the system), no "." part."""
    text = os.fspath(path)
    lead = ""
    if text.startswith("/"):
        lead = "//" if text[:2] == "//" and text[:3] != "///" else "/"
    body = "/".join(part for part in text.split("/") if part and part != ".")
    return lead + body or "."


class RunDir:
    """A VM's run dir: its folder (``location``, as ``str(Path(...))`` would say it) and
    the files in it."""

    __slots__ = ("location",)

    def __init__(self, path: str | os.PathLike[str]) -> None:
        self.location = path_text(path)

    def __eq__(self, other: object) -> bool:
        return isinstance(other, RunDir) and other.location == self.location

    def __hash__(self) -> int:
        return hash(self.location)

    def __repr__(self) -> str:
        return f"RunDir({self.location!r})"

    @property
    def name(self) -> str:
        return os.path.basename(self.location)

    @property
    def path(self) -> Path:
        from pathlib import Path  # noqa: PLC0415 -- not for the queries (module docstring)

        return Path(self.location)

    def file(self, name: str) -> str:
        """The run-dir file ``name`` (one of ``qvm.layout.runfiles``'), as a string."""
        return os.path.join(self.location, name)

    # QMP monitor for the user's own clients (qmp-shell, scripts); qvm never holds it.
    @property
    def qmp_socket(self) -> Path:
        return self.path / QMP_SOCKET

    # QMP monitor the supervisor keeps open: events, and qvm's commands (qvm.supervisor.relay).
    @property
    def events_socket(self) -> Path:
        return self.path / EVENTS_SOCKET

    # The supervisor's own request socket (status, stop, kill, control sessions).
    @property
    def supervisor_socket(self) -> Path:
        return self.path / SUPERVISOR_SOCKET

    @property
    def console_socket(self) -> Path:
        return self.path / CONSOLE_SOCKET

    # The guest agent's channel (virtio-serial port org.qemu.guest_agent.0): QEMU's end is
    # ``agent_chardev_socket``, which the supervisor holds open while QEMU runs and lends to
    # one client at a time on ``agent_socket`` (qvm.supervisor.agent_proxy says why);
    # qvm's clients take turns on ``agent_lock``.
    @property
    def agent_socket(self) -> Path:
        return self.path / AGENT_SOCKET

    @property
    def agent_chardev_socket(self) -> Path:
        return self.path / AGENT_CHARDEV_SOCKET

    @property
    def agent_lock(self) -> Path:
        return self.path / AGENT_LOCK

    @property
    def serial_log(self) -> Path:
        return self.path / SERIAL_LOG

    @property
    def qemu_log(self) -> Path:
        return self.path / QEMU_LOG

    @property
    def supervisor_log(self) -> Path:
        return self.path / SUPERVISOR_LOG

    @property
    def state_file(self) -> Path:
        return self.path / STATE_FILE

    @property
    def view_file(self) -> Path:
        return self.path / VIEW_FILE

    @property
    def launch_file(self) -> Path:
        return self.path / LAUNCH_FILE

    @property
    def lock_file(self) -> Path:
        return self.path / SUPERVISOR_LOCK

    # Space the supervisor sets aside and frees when the state dir is full, so that its
    # last record still gets written (qvm.supervisor.process.SPACE_RESERVE_BYTES).
    @property
    def space_reserve_file(self) -> Path:
        return self.path / SPACE_RESERVE_FILE

    @property
    def control_lock_file(self) -> Path:
        return self.path / CONTROL_LOCK

    @property
    def pending_file(self) -> Path:
        return self.path / PENDING_FILE

    # A vCPU unplug was requested in this QEMU run under TCG, where QEMU 7.2 crashes on
    # the next device_add (of any device); the file names the QEMU run (pid, start time)
    # it is about.
    @property
    def cpu_unplugged_file(self) -> Path:
        return self.path / CPU_UNPLUGGED_FILE

    # What qvm hotplugged in this QEMU run (memory, disks, NICs): ids, files, forwards.
    @property
    def devices_file(self) -> Path:
        return self.path / DEVICES_FILE

    # The shares of this QEMU run (boot and live), each with its virtiofsd's pid.
    @property
    def shares_file(self) -> Path:
        return self.path / SHARES_FILE

    def share_socket(self, share_id: str) -> Path:
        return self.path / runfiles.share_socket_name(share_id)

    # An empty image made by `qvm disk attach --new` for the device ``dev_id``. Not
    # disk*.qcow2: those are [[disk]] base overlays, which `up` reuses and `reset` deletes.
    def new_disk_image(self, dev_id: str) -> Path:
        return self.path / f"hotplug-{dev_id}.qcow2"

    def new_disk_images(self) -> list[Path]:
        """Every image `disk attach --new` made here: disks with the user's data."""
        return sorted(self.path.glob("hotplug-*.qcow2"))

    # cloud-init NoCloud seed (ISO 9660, label cidata) and the texts it holds, for people
    @property
    def seed_image(self) -> Path:
        return self.path / SEED_IMAGE

    @property
    def user_data(self) -> Path:
        return self.path / USER_DATA

    @property
    def meta_data(self) -> Path:
        return self.path / META_DATA

    @property
    def network_config(self) -> Path:
        return self.path / NETWORK_CONFIG

    @property
    def vendor_data(self) -> Path:
        return self.path / VENDOR_DATA

    # The snapshots qvm took (qvm.store.snapshots), and the small qcow2 that holds their
    # RAM state when the VM has no writable qcow2 disk of its own (block node qvm-state).
    @property
    def snapshots_file(self) -> Path:
        return self.path / SNAPSHOTS_FILE

    @property
    def state_disk(self) -> Path:
        return self.path / STATE_DISK

    # A clone (`qvm new CLONE --from VM@TAG`): its first start is from this memory image.
    @property
    def clone_file(self) -> Path:
        return self.path / CLONE_FILE

    # `qvm ssh`: this VM's host keys only (the guest makes new ones after a reset)
    @property
    def known_hosts(self) -> Path:
        return self.path / KNOWN_HOSTS

    @property
    def freeze_lock(self) -> Path:
        """A frozen copy's: held while its memory image is written (``qvm.ops.clone``)."""
        return self.path / FREEZE_LOCK

    # port forwards added or removed at run time, for the QEMU run (pid, start time) named
    @property
    def forwards_file(self) -> Path:
        return self.path / FORWARDS_FILE

    # the NICs on private networks (qvm.store.netlinks), and how the supervisor keeps
    # them joined and the guest set up
    @property
    def networks_file(self) -> Path:
        return self.path / NETWORKS_FILE

    @property
    def network_state_file(self) -> Path:
        return self.path / NETWORK_STATE_FILE

    def overlays(self) -> list[Path]:
        """The copy-on-write overlays qvm made for ``[[disk]] base`` images."""
        return sorted(self.path.glob("disk*.qcow2"))

    def sockets(self) -> list[Path]:
        return [self.path / name for name in SOCKET_NAMES]

    # `qvm new` wrote the machine file named here, with its sha256: `rm --purge` may remove
    # that file only while it is unchanged
    @property
    def new_record(self) -> Path:
        return self.path / NEW_RECORD

    def create(self) -> None:
        """Make the run dir (and the state root) private to this user, or refuse one that
        is a link, someone else's, or writable by others: qvm deletes and chmods in it."""
        ensure_private_dir(self.path.parent, "state dir")
        ensure_private_dir(self.path, "run dir")
        longest = max(len(os.fsencode(str(s))) for s in self.sockets())
        if longest > MAX_SOCKET_PATH:
            raise HostError(
                f"{self.name}: run dir {self.path} is too long for unix sockets "
                f"({longest} > {MAX_SOCKET_PATH} bytes) (hint: set QVM_STATE_DIR to a shorter path)"
            )

    def remove_qemu_sockets(self) -> None:
        runfiles.RunFiles(str(self.path)).remove_qemu_sockets()


def default_state_dir() -> Path:
    """``$QVM_STATE_DIR``, else in a Slurm job a folder of that job's (``job_state_dir``),
    else ``$XDG_STATE_HOME/qvm`` (run dirs are state, not cache)."""
    from pathlib import Path  # noqa: PLC0415 -- the queries take default_state_location

    return Path(default_state_location())


def default_state_location() -> str:
    """``default_state_dir()`` as a string."""
    if os.environ.get("QVM_STATE_DIR"):
        return path_text(os.environ["QVM_STATE_DIR"])
    job = job_state_dir(os.environ)
    return path_text(job) if job is not None else _user_state_location()


def user_state_dir() -> Path:
    """``$XDG_STATE_HOME/qvm``: the user's own state root, outside any job."""
    from pathlib import Path  # noqa: PLC0415 -- the queries take default_state_location

    return Path(_user_state_location())


def _user_state_location() -> str:
    # Path.home(): $HOME, else the user's entry in the password database
    base = os.environ.get("XDG_STATE_HOME") or os.path.join(os.path.expanduser("~"), ".local/state")
    return path_text(os.path.join(base, "qvm"))


def job_state_dir(environ: Mapping[str, str]) -> Path | None:
    """In a Slurm job (``SLURM_JOB_ID``), ``/tmp/qvm-UID/job.ID`` (``job.ID.TASK`` for an
    array task): two jobs or tasks never share a VM, while the steps of one job do. On
    the node's own disk, as a job's scratch files go, and short whatever the home
    folder: below it, a VM name of 40 characters (and every `qvm run` throwaway's) has
    room before its sockets reach sun_path's 107 bytes. None outside a job, or with an
    id that is not a number."""
    job = environ.get("SLURM_JOB_ID", "")
    if not (job.isdigit() and job.isascii()):
        return None
    from pathlib import Path  # noqa: PLC0415 -- in a Slurm job only

    root = Path(f"/tmp/qvm-{os.getuid()}")
    task = environ.get("SLURM_ARRAY_TASK_ID", "")
    if task.isdigit() and task.isascii():
        return root / f"job.{job}.{task}"
    return root / f"job.{job}"


def run_dir_for(state_root: str | os.PathLike[str], name: str) -> RunDir:
    """The run dir of VM ``name``: the name is checked before it becomes a path."""
    return RunDir(os.path.join(state_root, check_vm_name(name)))


def list_run_dirs(state_root: str | os.PathLike[str]) -> list[RunDir]:
    """Every run dir under the state root: real folders with a VM's name, no links."""
    root = path_text(state_root)
    try:
        names = sorted(os.listdir(root))
    except OSError:
        return []
    return [
        RunDir(os.path.join(root, name))
        for name in names
        if is_vm_name(name) and _is_real_dir(os.path.join(root, name))
    ]


def _is_real_dir(path: str) -> bool:
    try:
        return stat.S_ISDIR(os.lstat(path).st_mode)
    except OSError:
        return False


def ensure_private_dir(path: Path, what: str, make_parent: bool = True) -> None:
    """``path`` exists as a folder of this user's, closed to others (0700 when qvm makes
    it, whatever the umask); otherwise UnsafeStateError or HostError saying why."""
    try:
        os.mkdir(path, 0o700)
        os.chmod(path, 0o700)  # mkdir's mode goes through the umask
    except FileExistsError:
        pass
    except FileNotFoundError as error:
        if not make_parent or path.parent == path:
            raise _cannot_create(path, what, error) from error
        try:  # the folders above are the user's business: made as mkdir -p would
            path.parent.mkdir(parents=True, exist_ok=True)
        except OSError as parent_error:
            raise _cannot_create(path, what, parent_error) from parent_error
        ensure_private_dir(path, what, make_parent=False)
        return
    except OSError as error:
        raise _cannot_create(path, what, error) from error
    check_private_dir(path, what)


def _cannot_create(path: Path, what: str, error: OSError) -> HostError:
    return HostError(
        f"{what} {path}: cannot create it: {error.strerror or error} "
        "(hint: set QVM_STATE_DIR to a folder of yours)"
    )


def check_private_dir(path: str | os.PathLike[str], what: str) -> bool:
    """Whether ``path`` exists; raise UnsafeStateError if it is not a private folder of
    this user's (as ssh refuses a loose ``~/.ssh``): a link, a file, another user's, or
    writable by group or others."""
    try:
        info = os.lstat(path)
    except FileNotFoundError:
        return False
    except OSError as error:
        raise HostError(f"{what} {path}: {error.strerror or error}") from error
    hint = "(hint: remove it, or set QVM_STATE_DIR to a folder of yours)"
    if stat.S_ISLNK(info.st_mode):
        raise UnsafeStateError(f"{what} {path} is a symbolic link; qvm does not follow it {hint}")
    if not stat.S_ISDIR(info.st_mode):
        raise UnsafeStateError(
            f"{what} {path} is not a folder (hint: set QVM_STATE_DIR to a folder of yours)"
        )
    if info.st_uid != os.geteuid():
        raise UnsafeStateError(f"{what} {path} belongs to uid {info.st_uid}, not to you {hint}")
    if info.st_mode & (stat.S_IWGRP | stat.S_IWOTH):
        raise UnsafeStateError(
            f"{what} {path} is writable by others (mode {stat.S_IMODE(info.st_mode):o}) "
            f"(hint: chmod go-w {path})"
        )
    return True
