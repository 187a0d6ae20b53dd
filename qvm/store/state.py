"""``state.json``: what the supervisor knows about its run, rewritten at every change
(QEMU spawned, running, paused, ended and why, restarting) and read by every command that
asks how a VM is.

``StateRecord.from_json`` checks every field where the file is read; deeper code reads
attributes. A record that does not parse is a ``RecordError`` naming the file. Stdlib
only (with ``qvm.store.fields``): the supervisor's spawn code writes the first record.
"""

from __future__ import annotations

import os
import stat
import time

from qvm.base.checking import TYPE_CHECKING
from qvm.base.jsonfile import RecordWriteError, write_json_atomic
from qvm.base.record import Record
from qvm.errors import RecordError
from qvm.store.fields import Fields, read_record

if TYPE_CHECKING:
    from typing import Any

# the states a supervisor writes; the first five mean "a supervisor should be alive"
STATES = ("starting", "running", "paused", "stopping", "restarting", "stopped", "crashed")
LIVE_STATES = STATES[:5]
STATE_HINT = "the VM's supervisor writes it; once no QEMU of this VM runs, delete the file"


# A qvm command's intent, as the supervisor notes it in ``ended_by`` while it acts on it
INTENTS = ("stop", "kill")


def ending(noted: str | None, signal: str | None, reason: str) -> str | None:
    """What ended a QEMU run that a qvm command ended, in the one vocabulary of
    ``down --json``, ``kill --json`` and ``status --json`` (``last_exit.ended_by``):
    ``acpi`` (the guest powered off after the power button), ``quit`` (QMP quit), ``kill``
    (SIGKILL), or a word the supervisor recorded itself (``qvm.supervisor.wire.ENDINGS``);
    None when no qvm command ended it (the guest, a crash) or what did is not known.

    The supervisor notes only its intent (``stop``/``kill``) as it acts; the signal and
    the reason of the record tell which step of the stop ended QEMU."""
    if noted not in INTENTS:
        return noted
    if signal == "SIGKILL":
        return "kill"
    if reason.startswith("the guest powered off"):
        return "acpi"
    if reason.startswith("quit over QMP"):
        return "quit"
    return None


class ExitRecord(Record):
    """How one QEMU run ended."""

    code: int | None  # QEMU's exit code; None when a signal ended it
    signal: str | None  # e.g. "SIGKILL"
    reason: str
    failed: bool  # a crash, not an end someone asked for
    at: float  # time.time() of the end
    ran_seconds: float | None = None
    # what ended it when a qvm command did (``ending``); as written, maybe the intent
    ended_by: str | None = None
    stderr_tail: tuple[str, ...] | None = None  # QEMU's last lines, when it failed to start

    @classmethod
    def read(cls, f: Fields) -> ExitRecord:
        signal, reason = f.str("signal", None), f.str("reason")
        return cls(
            code=f.int("code", None),
            signal=signal,
            reason=reason,
            failed=f.bool("failed"),
            at=f.float("at"),
            ran_seconds=f.float("ran_seconds", None),
            ended_by=ending(f.str("ended_by", None), signal, reason),
            stderr_tail=f.str_list("stderr_tail", None),
        )

    def to_json(self) -> dict[str, Any]:
        data = self._asdict()
        data["ended_by"] = ending(self.ended_by, self.signal, self.reason)
        if self.stderr_tail is None:
            del data["stderr_tail"]  # only a start failure has one
        else:
            data["stderr_tail"] = list(self.stderr_tail)
        return data


class StateRecord(Record):
    name: str
    machine_file: str | None
    accel: str | None
    accel_reason: str | None
    supervisor_pid: int
    supervisor_start_time: int | None
    state: str  # one of STATES
    restarts: int
    exit: ExitRecord | None  # how the latest QEMU run ended; None while the first runs
    crash_reason: str | None
    qemu_pid: int | None = None  # None when no QEMU runs
    qemu_start_time: int | None = None  # with qemu_pid, the identity of the QEMU process
    started_at: float | None = None  # time.time() of the current (or latest) QEMU's start
    next_restart_at: float | None = None  # while the restart policy waits
    # never written: said by ``clean_stale`` of a record whose supervisor died and whose
    # QEMU still runs
    orphaned: bool = False
    # where this record was kept because state.json could not be written (EIO, EROFS,
    # ENOSPC): the supervisor's fallback file (``keep_elsewhere``); None: state.json
    kept_in: str | None = None

    @classmethod
    def from_json(cls, data: Any, source: str, hint: str | None = STATE_HINT) -> StateRecord:
        f = Fields(data, source, hint)
        ended = f.object("exit", None)
        return f.declared(
            cls,
            supervisor_pid=f.pid("supervisor_pid"),
            state=f.one_of("state", STATES),
            exit=ExitRecord.read(ended) if ended is not None else None,
            qemu_pid=f.pid("qemu_pid", None),
        )

    def to_json(self) -> dict[str, Any]:
        data = self._asdict()
        data["exit"] = self.exit.to_json() if self.exit is not None else None
        if self.next_restart_at is None:
            del data["next_restart_at"]
        del data["orphaned"]
        if self.kept_in is None:
            del data["kept_in"]
        return data

    @property
    def live(self) -> bool:
        """The record says a supervisor runs (true only if its lock is held, too)."""
        return self.state in LIVE_STATES

    @property
    def ended_reason(self) -> str | None:
        return self.exit.reason if self.exit is not None else None


class QemuRun(Record):
    """Which QEMU run a run dir's records are about: QEMU's pid and its start time (a pid
    alone may be reused). Records of hotplugged devices, pending unplugs, vCPU unplugs and
    forwards carry it as a stamp (``qemu_pid``, ``qemu_start_time``); a stamp of an
    earlier run means nothing for the current one."""

    pid: int | None  # None when no QEMU runs
    start_time: int | None

    @classmethod
    def of_state(cls, state: StateRecord | None) -> QemuRun:
        """The run ``state.json`` names (no run without one)."""
        if state is None:
            return cls(None, None)
        return cls(state.qemu_pid, state.qemu_start_time)

    @classmethod
    def stamp_of(cls, f: Fields) -> QemuRun:
        """The stamp in a record, checked."""
        return cls(f.int("qemu_pid", None), f.int("qemu_start_time", None))

    def stamp(self) -> dict[str, int | None]:
        return {"qemu_pid": self.pid, "qemu_start_time": self.start_time}

    def is_current(self, current: QemuRun) -> bool:
        """This stamp is about ``current``, a QEMU that runs."""
        return current.pid is not None and self == current


def current_qemu_run(path: str | os.PathLike[str]) -> QemuRun:
    """The QEMU run the state record at ``path`` names. Corrupt: RecordError."""
    return QemuRun.of_state(read_state(path))


def read_state(path: str | os.PathLike[str]) -> StateRecord | None:
    """The state record at ``path``; None when there is none. Corrupt: RecordError."""
    return read_record(path, StateRecord.from_json, STATE_HINT)


def write_state(path: str | os.PathLike[str], record: StateRecord) -> None:
    write_json_atomic(path, record.to_json())


# --- when state.json cannot be written ---------------------------------------------------
# The supervisor's last record (how QEMU ended) must survive a state dir that fails (EIO),
# turned read-only (EROFS) or is full (ENOSPC) even after the space set aside for it: it is
# then kept in a folder of this user's on another file system, named after the run dir,
# and the next command that finds the supervisor gone takes it from there
# (``qvm.supervisor.client.clean_stale``).


def fallback_folders() -> list[str]:
    """Where a record is kept, most likely writable first: the user's runtime dir (tmpfs),
    /dev/shm, /tmp."""
    uid = os.getuid()
    runtime = os.environ.get("XDG_RUNTIME_DIR")
    folders = [os.path.join(runtime, "qvm")] if runtime else []
    return [*folders, f"/dev/shm/qvm-{uid}", f"/tmp/qvm-{uid}"]


def _fallback_name(run_path: str | os.PathLike[str]) -> str:
    """The VM's name and a hash of its run dir's path (FNV-1a: no import on the path of
    every command that reads a state record)."""
    absolute = os.path.abspath(run_path)
    key = 0x811C9DC5
    for byte in os.fsencode(absolute):
        key = ((key ^ byte) * 0x01000193) & 0xFFFFFFFF
    return f"{os.path.basename(absolute)}-{key:08x}.state.json"


def _ours(folder: str) -> bool:
    """A folder of this user's that no one else can write (not a link planted in /tmp)."""
    try:
        info = os.lstat(folder)
    except OSError:
        return False
    return stat.S_ISDIR(info.st_mode) and info.st_uid == os.getuid() and not info.st_mode & 0o022


def keep_elsewhere(run_path: str | os.PathLike[str], record: StateRecord) -> str | None:
    """Write ``record`` to the first fallback folder that takes it; its path, or None when
    none does."""
    name = _fallback_name(run_path)
    for folder in fallback_folders():
        try:  # noqa: SIM105 - no contextlib on a query's way (0.4 ms)
            os.makedirs(folder, mode=0o700, exist_ok=True)
        except OSError:
            pass
        if not _ours(folder):
            continue
        path = os.path.join(folder, name)
        try:
            write_json_atomic(path, record._replace(kept_in=path).to_json())
        except RecordWriteError:
            continue
        return path
    return None


def kept_record(run_path: str | os.PathLike[str], state: StateRecord) -> StateRecord | None:
    """The record the supervisor of ``state`` kept elsewhere, or None. A file of another
    supervisor (an earlier run of this run dir), or one that does not parse, is ignored."""
    name = _fallback_name(run_path)
    for folder in fallback_folders():
        if not _ours(folder):
            continue
        try:
            kept = read_state(os.path.join(folder, name))
        except RecordError:
            continue
        if kept is not None and (kept.name, kept.supervisor_pid, kept.supervisor_start_time) == (
            state.name,
            state.supervisor_pid,
            state.supervisor_start_time,
        ):
            return kept
    return None


def forget_kept(path: str) -> None:
    """state.json has the record now: the kept copy must not speak for it later."""
    try:  # noqa: SIM105 - no contextlib on a query's way (0.4 ms)
        os.unlink(path)
    except OSError:
        pass


def set_aside(path: str) -> str:
    """Move a corrupt record out of the way, kept as ``NAME.corrupt-<UTC time>`` (never
    over an earlier one); only once nothing of its VM runs (``qvm.ops.corrupt_state``).
    Paths as strings: the supervisor imports this module, and never pathlib."""
    stamp = time.strftime("%Y%m%dT%H%M%SZ", time.gmtime())
    target = f"{path}.corrupt-{stamp}"
    for again in range(2, 100):
        if not os.path.lexists(target):
            break
        target = f"{path}.corrupt-{stamp}-{again}"
    os.rename(path, target)
    return target
