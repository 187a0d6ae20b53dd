"""A ``state.json`` that does not parse (empty, truncated, garbage, a JSON array), and the
proof that nothing of its VM runs, which lets qvm act without it.

The record is the supervisor's: it names the QEMU to signal, and no QEMU is signalled on
a guess. But a corrupt record names nothing, and a VM whose record is corrupt could be
neither started nor killed. Two facts prove that nothing runs: no process holds the
supervisor's locks (the kernel drops them when it dies, ``qvm.layout.locks``), and no
process's command line names this run dir's QMP or event socket (how QEMU is recognised
as this VM's, as ``qvm.supervisor.client.qemu_identity_problem`` does for a recorded
pid). Then `up` moves the file aside (kept as ``state.json.corrupt-TIME``, never
deleted) and starts; `status` says the VM is stopped and why; `kill` and `down` answer as
for a stopped VM.
"""

from __future__ import annotations

import os
from pathlib import Path

from qvm.base.proc import process_cmdline
from qvm.errors import HostError, RecordError, VmStateError
from qvm.layout.rundir import RunDir, check_private_dir
from qvm.store.state import read_state, set_aside
from qvm.supervisor.client import release_run_locks, supervisor_alive, take_run_locks


def corrupt_state(run: RunDir) -> RecordError | None:
    """Why ``run``'s state.json cannot be read, or None when it can (or is absent)."""
    try:
        read_state(run.state_file)
    except RecordError as error:
        return error
    return None


def qemu_naming(run: RunDir) -> int | None:
    """The pid of a live process whose command line names this run dir's sockets (its
    QEMU, whatever any record says), or None."""
    marks = {str(path) for path in (run.events_socket, run.qmp_socket)}
    marks |= {mark.replace(",", ",,") for mark in marks}  # escaped as QEMU options
    try:
        pids = [int(entry) for entry in os.listdir("/proc") if entry.isdigit()]
    except OSError:
        return None
    for pid in pids:
        argv = process_cmdline(pid)
        if argv and any(mark in arg for arg in argv for mark in marks):
            return pid
    return None


def still_running(run: RunDir) -> str | None:
    """What of ``run``'s VM may still run (its supervisor, its QEMU), or None: proof that
    nothing does."""
    if supervisor_alive(run):
        return f"a supervisor of {run.name} holds its lock"
    pid = qemu_naming(run)
    if pid is not None:
        return f"a QEMU of {run.name} runs (pid {pid})"
    return None


def unusable(run: RunDir, error: RecordError) -> RecordError:
    """``error`` of a corrupt state.json, said for a VM in which nothing runs."""
    return RecordError(
        str(run.state_file),
        error.key or "",
        f"{error.problem}; nothing of {run.name} runs",
        hint=f"qvm up {run.name} moves it aside as {run.state_file.name}.corrupt-TIME",
    )


def set_aside_corrupt_state(run: RunDir) -> Path | None:
    """Before a start: a corrupt state.json moved aside (kept, and returned) once nothing
    of the VM provably runs; None when the record is sound or absent. Something running:
    VmStateError naming the file, which stays where it is."""
    if not check_private_dir(run.path, "run dir"):  # a link or someone else's: refused
        return None
    error = corrupt_state(run)
    if error is None:
        return None
    try:
        locks = take_run_locks(run)
    except OSError as cannot:
        problem = f"cannot lock run dir {run.path}: {cannot.strerror or cannot}"
        raise HostError(problem, vm=run.name) from cannot
    if locks is None:
        running, hint = f"a supervisor of {run.name} holds its lock", f"qvm kill {run.name}"
        raise _refused(run, error, running, hint)
    try:
        pid = qemu_naming(run)
        if pid is not None:
            running = f"a QEMU of {run.name} runs (pid {pid}) with no supervisor"
            raise _refused(run, error, running, f"end it (kill {pid}), then qvm up {run.name}")
        if corrupt_state(run) is None:  # rewritten meanwhile: a start before ours
            return None
        try:
            return Path(set_aside(str(run.state_file)))
        except OSError as cannot:
            problem = f"{error.problem}; cannot move it aside: {cannot.strerror or cannot}"
            raise HostError(problem, file=str(run.state_file), hint="delete it") from cannot
    finally:
        release_run_locks(locks)


def _refused(run: RunDir, error: RecordError, running: str, hint: str) -> VmStateError:
    return VmStateError(
        f"{error.problem}; not moved aside: {running}",
        file=str(run.state_file),
        key=error.key,
        hint=hint,
    )
