"""Facts the supervisor reports about its QEMU from outside QMP: why a query failed (a
stopped process), host RSS and CPU%, and the tail of QEMU's own log for a failed start."""

from __future__ import annotations

import time
from pathlib import Path

from qvm.base.proc import process_state, process_usage
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


_cpu_samples: dict[int, tuple[float, float]] = {}


def process_facts(pid: int | None, started_at: float | None) -> tuple[int, float] | None:
    """Host RSS of QEMU, and its CPU% since the previous sample (or since it started)."""
    usage = process_usage(pid) if pid else None
    if usage is None:
        return None
    rss, cpu_seconds = usage
    now = time.monotonic()
    last_time, last_cpu = _cpu_samples.get(pid, (now - (time.time() - (started_at or 0)), 0.0))
    elapsed = max(now - last_time, 1e-6)
    _cpu_samples[pid] = (now, cpu_seconds)
    return rss, round(100.0 * (cpu_seconds - last_cpu) / elapsed, 1)


def qemu_log_tail(path: Path, lines: int = 10) -> list[str]:
    """The last lines QEMU wrote in its latest run (after qvm's start marker)."""
    try:
        text = path.read_text(errors="replace")
    except OSError:
        return []
    latest = text.rsplit(LOG_MARKER, 1)[-1].split("\n", 1)[-1]
    return [line for line in latest.splitlines() if line.strip()][-lines:]
