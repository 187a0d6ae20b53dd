"""One folder per VM, and every file in it named here.

The folder outlives the VM: its logs and ``state.json`` say how the last run ended.
Sockets exist only while QEMU runs. ``supervisor.lock`` is held (flock) for exactly as
long as a supervisor lives, so "is a supervisor alive?" never depends on a pid that the
kernel may have handed to another process.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import re
from pathlib import Path
from typing import Any, NamedTuple

from qvm.errors import HostError
from qvm.jsonfile import read_json, write_json_atomic

__all__ = ["read_json", "write_json_atomic"]  # re-exported: most modules reach them here

# sun_path is 108 bytes including the terminating NUL
MAX_SOCKET_PATH = 107

QEMU_SOCKET_NAMES = ("qmp.sock", "events.sock", "console.sock")
SOCKET_NAMES = (*QEMU_SOCKET_NAMES, "supervisor.sock")


class RunDir(NamedTuple):
    path: Path

    @property
    def name(self) -> str:
        return self.path.name

    # QMP monitor for the user's own clients (qmp-shell, scripts); qvm never holds it.
    @property
    def qmp_socket(self) -> Path:
        return self.path / "qmp.sock"

    # QMP monitor the supervisor keeps open: events, and qvm's commands (qvm.relay).
    @property
    def events_socket(self) -> Path:
        return self.path / "events.sock"

    # The supervisor's own request socket (status, stop, kill, control sessions).
    @property
    def supervisor_socket(self) -> Path:
        return self.path / "supervisor.sock"

    @property
    def console_socket(self) -> Path:
        return self.path / "console.sock"

    @property
    def serial_log(self) -> Path:
        return self.path / "serial.log"

    @property
    def qemu_log(self) -> Path:
        return self.path / "qemu.log"

    @property
    def supervisor_log(self) -> Path:
        return self.path / "supervisor.log"

    @property
    def state_file(self) -> Path:
        return self.path / "state.json"

    @property
    def launch_file(self) -> Path:
        return self.path / "launch.json"

    @property
    def lock_file(self) -> Path:
        return self.path / "supervisor.lock"

    @property
    def control_lock_file(self) -> Path:
        return self.path / "control.lock"

    @property
    def pending_file(self) -> Path:
        return self.path / "pending.json"

    # A vCPU unplug was requested in this QEMU run under TCG, where QEMU 7.2 crashes on
    # the next device_add (of any device); the file names the QEMU run (pid, start time)
    # it is about.
    @property
    def cpu_unplugged_file(self) -> Path:
        return self.path / "cpu-unplugged.json"

    # What qvm hotplugged in this QEMU run (memory, disks, NICs): ids, files, forwards.
    @property
    def devices_file(self) -> Path:
        return self.path / "devices.json"

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
        return self.path / "seed.iso"

    @property
    def user_data(self) -> Path:
        return self.path / "user-data"

    @property
    def meta_data(self) -> Path:
        return self.path / "meta-data"

    # `qvm ssh`: this VM's host keys only (the guest makes new ones after a reset)
    @property
    def known_hosts(self) -> Path:
        return self.path / "known_hosts"

    # port forwards added or removed at run time, for the QEMU run (pid, start time) named
    @property
    def forwards_file(self) -> Path:
        return self.path / "forwards.json"

    def overlays(self) -> list[Path]:
        """The copy-on-write overlays qvm made for ``[[disk]] base`` images."""
        return sorted(self.path.glob("disk*.qcow2"))

    def sockets(self) -> list[Path]:
        return [self.path / name for name in SOCKET_NAMES]

    def create(self) -> None:
        self.path.mkdir(parents=True, exist_ok=True)
        os.chmod(self.path, 0o700)
        longest = max(len(os.fsencode(str(s))) for s in self.sockets())
        if longest > MAX_SOCKET_PATH:
            raise HostError(
                f"{self.name}: run dir {self.path} is too long for unix sockets "
                f"({longest} > {MAX_SOCKET_PATH} bytes) (hint: set QVM_STATE_DIR to a shorter path)"
            )

    def remove_qemu_sockets(self) -> None:
        """QEMU leaves its listening sockets behind when it is killed."""
        for sock in (self.path / name for name in QEMU_SOCKET_NAMES):
            with contextlib.suppress(FileNotFoundError):
                sock.unlink()


def default_state_dir() -> Path:
    """``$QVM_STATE_DIR``, else ``$XDG_STATE_HOME/qvm`` (run dirs are state, not cache)."""
    if os.environ.get("QVM_STATE_DIR"):
        return Path(os.environ["QVM_STATE_DIR"])
    base = os.environ.get("XDG_STATE_HOME") or str(Path.home() / ".local/state")
    return Path(base) / "qvm"


def run_dir_for(state_root: Path, name: str) -> RunDir:
    return RunDir(state_root / name)


def list_run_dirs(state_root: Path) -> list[RunDir]:
    try:
        entries = sorted(state_root.iterdir())
    except OSError:
        return []
    return [
        RunDir(p) for p in entries if p.is_dir() and re.fullmatch(r"[a-z0-9][a-z0-9_-]*", p.name)
    ]


def qemu_run(run: RunDir) -> dict[str, Any]:
    """Which QEMU process a run dir's records are about now (pid and start time)."""
    state = read_json(run.state_file) or {}
    return {"qemu_pid": state.get("qemu_pid"), "qemu_start_time": state.get("qemu_start_time")}


def same_run(record: dict[str, Any], current: dict[str, Any]) -> bool:
    """True if ``record`` (pending marks, devices.json, ...) is about the ``current`` QEMU."""
    return bool(current.get("qemu_pid")) and all(
        record.get(k) == current.get(k) for k in ("qemu_pid", "qemu_start_time")
    )


def hotplugged(run: RunDir) -> list[dict[str, Any]]:
    """What qvm hotplugged into the VM's current QEMU (``devices.json``; an earlier
    run's record means nothing): one dict per device, with ``id`` and ``kind``."""
    record = read_json(run.devices_file)
    if record is None or not same_run(record, qemu_run(run)):
        return []
    return [d for d in record.get("devices", []) if isinstance(d, dict) and d.get("id")]


def save_hotplugged(run: RunDir, devices: list[dict[str, Any]]) -> None:
    write_json_atomic(run.devices_file, {**qemu_run(run), "devices": devices})


def try_lock(path: Path) -> int | None:
    """Take an exclusive flock without waiting; return the fd, or None if someone holds it."""
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        return None
    return fd


def is_locked(path: Path) -> bool:
    """True while a live process holds the lock (the supervisor, for ``supervisor.lock``)."""
    if not path.exists():
        return False
    fd = try_lock(path)
    if fd is None:
        return True
    os.close(fd)
    return False
