"""``state.json``: what the supervisor knows about its run, rewritten at every change
(QEMU spawned, running, paused, ended and why, restarting) and read by every command that
asks how a VM is.

``StateRecord.from_json`` checks every field where the file is read; deeper code reads
attributes. A record that does not parse is a ``RecordError`` naming the file. Stdlib
only (with ``qvm.store.fields``): the supervisor's spawn code writes the first record.
"""

from __future__ import annotations

import os
from typing import Any

from qvm.base.jsonfile import write_json_atomic
from qvm.base.record import Record
from qvm.store.fields import Fields, read_record

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

    @classmethod
    def from_json(cls, data: Any, source: str, hint: str | None = STATE_HINT) -> StateRecord:
        f = Fields(data, source, hint)
        ended = f.object("exit", None)
        return cls(
            name=f.str("name"),
            machine_file=f.str("machine_file", None),
            accel=f.str("accel", None),
            accel_reason=f.str("accel_reason", None),
            supervisor_pid=f.pid("supervisor_pid"),
            supervisor_start_time=f.int("supervisor_start_time", None),
            state=f.one_of("state", STATES),
            restarts=f.int("restarts"),
            exit=ExitRecord.read(ended) if ended is not None else None,
            crash_reason=f.str("crash_reason", None),
            qemu_pid=f.pid("qemu_pid", None),
            qemu_start_time=f.int("qemu_start_time", None),
            started_at=f.float("started_at", None),
            next_restart_at=f.float("next_restart_at", None),
            orphaned=f.bool("orphaned", False),
        )

    def to_json(self) -> dict[str, Any]:
        data = self._asdict()
        data["exit"] = self.exit.to_json() if self.exit is not None else None
        if self.next_restart_at is None:
            del data["next_restart_at"]
        del data["orphaned"]
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
