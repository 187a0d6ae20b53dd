"""Process identity from /proc: a pid alone is not an identity, pids are reused."""

from __future__ import annotations

import os

from qvm.base.checking import TYPE_CHECKING

if TYPE_CHECKING:
    from collections.abc import Callable

PAGE_SIZE = os.sysconf("SC_PAGE_SIZE")
CLOCK_TICKS = os.sysconf("SC_CLK_TCK")


def find_program(name: str) -> str | None:
    """Where ``$PATH`` finds the executable ``name`` (a path is taken as is), like
    ``shutil.which``, without importing shutil on every command."""
    if "/" in name:
        return name if os.access(name, os.X_OK) and not os.path.isdir(name) else None
    for folder in os.get_exec_path():
        path = os.path.join(folder, name)
        if os.access(path, os.X_OK) and not os.path.isdir(path):
            return path
    return None


def _stat_fields(pid: int) -> list[str] | None:
    try:
        with open(f"/proc/{pid}/stat") as handle:
            stat = handle.read()
    except OSError:
        return None
    # the command name may hold spaces and parentheses: fields resume after the last ')'
    return stat[stat.rindex(")") + 2 :].split()


def process_start_time(pid: int) -> int | None:
    """Start time in clock ticks since boot: with the pid, a process's identity."""
    fields = _stat_fields(pid)
    return int(fields[19]) if fields else None


def process_state(pid: int) -> str | None:
    """One letter: R running, S sleeping, T stopped, Z zombie, ..."""
    fields = _stat_fields(pid)
    return fields[0] if fields else None


def same_process_alive(pid: int | None, start_time: int | None) -> bool:
    """True if ``pid`` still names the process that was started at ``start_time``."""
    if not pid:
        return False
    fields = _stat_fields(pid)
    if fields is None or fields[0] == "Z":
        return False
    return start_time is None or int(fields[19]) == start_time


def process_usage(pid: int) -> tuple[int, float] | None:
    """(resident bytes, CPU seconds used) of a process.

    Read straight from /proc rather than through psutil: the supervisor asks this on
    every status, and psutil would cost it over a megabyte of its 20 MiB budget.
    """
    fields = _stat_fields(pid)
    try:
        with open(f"/proc/{pid}/statm") as handle:
            resident_pages = int(handle.read().split()[1])
    except (OSError, IndexError, ValueError):
        return None
    if fields is None:
        return None
    cpu_seconds = (int(fields[11]) + int(fields[12])) / CLOCK_TICKS  # utime + stime
    return resident_pages * PAGE_SIZE, cpu_seconds


def process_cmdline(pid: int) -> list[str] | None:
    """The argument vector of a live process (empty for a kernel thread or a zombie)."""
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as handle:
            raw = handle.read()
    except OSError:
        return None
    return [os.fsdecode(arg) for arg in raw.split(b"\0")[:-1]] if raw else []


def identity_problem(
    pid: object, start_time: object, what: str, belongs: Callable[[list[str]], bool]
) -> str | None:
    """Why ``pid`` may not be signalled as ``what``, or None when it may: it names a live
    process started at ``start_time`` (so not a reused pid) whose command line
    ``belongs`` to us (so not an unrelated process a planted record names)."""
    if not isinstance(pid, int) or isinstance(pid, bool) or pid <= 1:
        return f"the record names no valid pid for {what} ({pid!r})"
    if not isinstance(start_time, int) or isinstance(start_time, bool):
        return f"the record names no start time for {what} (pid {pid}): its identity is unknown"
    if not same_process_alive(pid, start_time):
        return f"{what} (pid {pid}) is no longer running"
    argv = process_cmdline(pid)
    if not argv or not belongs(argv):
        return f"pid {pid} is not {what}: its command line does not name this VM"
    # the command line was read after the start time: check the pid was not reused between
    if not same_process_alive(pid, start_time):
        return f"{what} (pid {pid}) is no longer running"
    return None
