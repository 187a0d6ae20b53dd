"""What this QEMU binary can do: its CPU models and machine types, read from ``-cpu help``
and ``-machine help`` once per binary and cached by its path, size and mtime.
"""

from __future__ import annotations

import json
import os
import zlib
from pathlib import Path

from qvm.base.proc import find_program
from qvm.base.record import Record
from qvm.errors import HostError


class QemuCapabilities(Record):
    binary: str  # resolved path
    version: str
    cpu_models: tuple[str, ...]
    machine_types: tuple[str, ...]


def resolve_binary(binary: str) -> str:
    found = find_program(binary)
    if not found:
        raise HostError(
            f"QEMU binary {binary!r} not found (hint: apt-get install qemu-system-x86, "
            "or set qemu.binary)"
        )
    return found


def qemu_capabilities(binary: str, cache_dir: Path | None = None) -> QemuCapabilities:
    """Ask the binary what it supports; cached by the binary's identity (path, size, mtime)."""
    path = resolve_binary(binary)
    stat = os.stat(path)
    key = f"{zlib.crc32(path.encode()):08x}-{stat.st_size}-{stat.st_mtime_ns}"
    cache_dir = cache_dir or default_cache_dir()
    cache_file = cache_dir / f"qemu-caps-{key}.json"
    try:
        data = json.loads(cache_file.read_text())
        return QemuCapabilities(
            binary=data["binary"],
            version=data["version"],
            cpu_models=tuple(data["cpu_models"]),
            machine_types=tuple(data["machine_types"]),
        )
    except (OSError, ValueError, KeyError):
        pass
    caps = QemuCapabilities(
        binary=path,
        version=_first_line(_run_help(path, "-version")),
        cpu_models=parse_cpu_help(_run_help(path, "-cpu", "help")),
        machine_types=parse_machine_help(_run_help(path, "-machine", "help")),
    )
    _write_cache(cache_file, caps)
    return caps


def _run_help(path: str, *args: str) -> str:
    import subprocess  # noqa: PLC0415 -- only when QEMU's lists are not cached yet (~8 ms)

    try:
        done = subprocess.run(
            [path, *args], capture_output=True, text=True, timeout=20, check=False
        )
    except (OSError, subprocess.TimeoutExpired) as exc:
        raise HostError(f"{path} {' '.join(args)}: could not run it: {exc}") from exc
    if done.returncode != 0:
        raise HostError(f"{path} {' '.join(args)}: exit code {done.returncode}: {done.stderr}")
    return done.stdout


def _write_cache(cache_file: Path, caps: QemuCapabilities) -> None:
    try:
        cache_file.parent.mkdir(parents=True, exist_ok=True)
        tmp = cache_file.with_suffix(f".tmp{os.getpid()}")
        tmp.write_text(
            json.dumps(
                {
                    "binary": caps.binary,
                    "version": caps.version,
                    "cpu_models": list(caps.cpu_models),
                    "machine_types": list(caps.machine_types),
                }
            )
        )
        os.replace(tmp, cache_file)
    except OSError:
        pass  # a cache we cannot write only costs time


def _first_line(text: str) -> str:
    return text.strip().splitlines()[0] if text.strip() else ""


def parse_cpu_help(text: str) -> tuple[str, ...]:
    """CPU model names from ``-cpu help`` (lines ``x86 NAME  description``)."""
    models: list[str] = []
    for line in text.splitlines():
        if not line.strip():
            if models:
                break  # the CPUID flag list follows a blank line
            continue
        parts = line.split()
        if len(parts) >= 2 and parts[0] == "x86":
            models.append(parts[1])
    return tuple(models)


def parse_machine_help(text: str) -> tuple[str, ...]:
    """Machine type names from ``-machine help``, aliases included."""
    types: list[str] = []
    for line in text.splitlines()[1:]:
        parts = line.split()
        if parts:
            types.append(parts[0])
    return tuple(types)


def default_cache_dir() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "qvm"
