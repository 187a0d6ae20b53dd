"""Process identity from /proc: a pid alone is not an identity, pids are reused."""

from __future__ import annotations

import os

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
