"""One folder per VM, and every file in it named here.

The folder outlives the VM: its logs and ``state.json`` say how the last run ended.
Sockets exist only while QEMU runs. ``supervisor.lock`` is held (flock) for exactly as
long as a supervisor lives, so "is a supervisor alive?" never depends on a pid that the
kernel may have handed to another process.
"""

from __future__ import annotations

import contextlib
import os
import re
from pathlib import Path
from typing import NamedTuple

from qvm.base.jsonfile import read_json, write_json_atomic
from qvm.errors import HostError

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

    # QMP monitor the supervisor keeps open: events, and qvm's commands (qvm.supervisor.relay).
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

NEW_RECORD = "new.json"  # in the run dir: the machine file qvm new wrote, and its sha256
