"""Facts the supervisor reports about its QEMU from outside QMP: why a query failed (a
stopped process), host RSS and CPU%, and the tail of QEMU's own log for a failed start."""

from __future__ import annotations

import os
import time

from qvm.base.proc import CLOCK_TICKS, process_start_time, process_state, process_usage
from qvm.supervisor.spawn import LOG_MARKER

QMP_CALL_TIMEOUT = 2.0  # seconds the supervisor gives QEMU to answer one query


def describe_qmp_failure(exc: BaseException, pid: int | None) -> str:
    stopped = pid is not None and process_state(pid) == "T"
    if isinstance(exc, TimeoutError):
        text = f"QEMU did not answer QMP within {QMP_CALL_TIMEOUT:g} s"
    else:
        text = f"QMP query failed: {exc}"
    if stopped:
        text += f" (its process {pid} is stopped, e.g. by SIGSTOP: 'kill -CONT {pid}' resumes it)"
    return text


# CPU% is a rate over at least this long: CPU time comes in 10 ms clock ticks, so over the
# few milliseconds between two quick `status` calls one tick read as 400% on a 2-CPU host
CPU_RATE_INTERVAL = 1.0
_cpu_samples: dict[int, list[tuple[float, float]]] = {}


def cpu_percent(
    samples: list[tuple[float, float]], now: float, cpu_seconds: float, host_cpus: int
) -> float:
    """QEMU's CPU% from the newest of ``samples`` (monotonic time, CPU seconds) that is at
    least ``CPU_RATE_INTERVAL`` old (else the oldest, its start) to now; never above
    100 x ``host_cpus``. ``samples`` keeps that one and gains the new one."""
    older = [s for s in samples if now - s[0] >= CPU_RATE_INTERVAL]
    base = older[-1] if older else samples[0]
    elapsed = now - base[0]
    rate = 100.0 * (cpu_seconds - base[1]) / elapsed if elapsed > 0 else 0.0
    samples[:] = [s for s in samples if s[0] >= base[0]] + [(now, cpu_seconds)]
    return round(min(max(rate, 0.0), 100.0 * max(host_cpus, 1)), 1)


def process_facts(pid: int | None, started_at: float | None) -> tuple[int, float] | None:
    """Host RSS of QEMU, and its CPU% over the last second or more (or since it started)."""
    usage = process_usage(pid) if pid else None
    if usage is None or pid is None:
        return None
    rss, cpu_seconds = usage
    now = time.monotonic()
    samples = _cpu_samples.setdefault(pid, [(now - _age(pid, started_at), 0.0)])
    return rss, cpu_percent(samples, now, cpu_seconds, os.cpu_count() or 1)


def _age(pid: int, started_at: float | None) -> float:
    """Seconds since the process started, from the kernel's record (its start time in
    clock ticks since boot); the supervisor's own note of the start comes a little later."""
    ticks = process_start_time(pid)
    if ticks is not None:
        return max(time.clock_gettime(time.CLOCK_BOOTTIME) - ticks / CLOCK_TICKS, 0.0)
    return max(time.time() - (started_at or 0), 0.0)


def qemu_log_tail(path: str | os.PathLike[str], lines: int = 10) -> list[str]:
    """The last lines QEMU wrote in its latest run (after qvm's start marker)."""
    try:
        with open(path, errors="replace") as log:
            text = log.read()
    except OSError:
        return []
    latest = text.rsplit(LOG_MARKER, 1)[-1].split("\n", 1)[-1]
    return [line for line in latest.splitlines() if line.strip()][-lines:]
