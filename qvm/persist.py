"""Writing a live change back into the machine's TOML file, keeping the user's text.

tomlkit round-trips a document with its comments, blank lines, key order and spacing,
so only the value that changed differs afterwards (tomli-w could only write a new file).
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from qvm.errors import DefinitionError, Problem


@dataclass(frozen=True)
class PersistResult:
    path: Path
    key: str
    old: int | None  # None: the key was not in the file
    new: int

    @property
    def changed(self) -> bool:
        return self.old != self.new


def set_cpu_count_text(text: str, count: int, file: str = "<toml>") -> tuple[str, int | None]:
    """``text`` with ``[cpu] count`` set to ``count`` (table and key created if missing)."""
    import tomlkit
    from tomlkit.exceptions import TOMLKitError

    try:
        doc = tomlkit.parse(text)
    except TOMLKitError as exc:
        raise DefinitionError([Problem(file, "", f"cannot parse TOML: {exc}")]) from exc
    cpu = doc.get("cpu")
    if cpu is None:
        cpu = tomlkit.table()
        cpu["count"] = count
        doc["cpu"] = cpu
        return tomlkit.dumps(doc), None
    if not isinstance(cpu, dict):
        raise DefinitionError([Problem(file, "cpu", "must be a table", got=repr(cpu))])
    cpu_max = cpu.get("max")
    if isinstance(cpu_max, int) and count > cpu_max:
        raise DefinitionError(
            [
                Problem(
                    file,
                    "cpu.count",
                    f"not written: {count} vCPUs would exceed cpu.max ({cpu_max}) in the file",
                    hint="the file changed since the VM started; edit it by hand",
                )
            ]
        )
    old = cpu.get("count")
    if old == count:
        return text, count
    cpu["count"] = count
    return tomlkit.dumps(doc), old if isinstance(old, int) else None


def persist_cpu_count(path: Path, count: int) -> PersistResult:
    """Write ``[cpu] count = count`` into the machine file; nothing else changes."""
    try:
        text = path.read_text()
    except OSError as exc:
        raise DefinitionError(
            [Problem(str(path), "", f"cannot read it to persist cpu.count: {exc.strerror}")]
        ) from exc
    new_text, old = set_cpu_count_text(text, count, str(path))
    if new_text != text:
        _write_keeping_mode(path, new_text)
    return PersistResult(path=path, key="cpu.count", old=old, new=count)


def _write_keeping_mode(path: Path, text: str) -> None:
    """Replace the file atomically, with its permissions (a symlink's target is written)."""
    target = path.resolve()
    tmp = target.with_name(f".{target.name}.{os.getpid()}.tmp")
    mode = target.stat().st_mode & 0o7777
    with open(tmp, "w") as handle:
        handle.write(text)
        handle.flush()
        os.fsync(handle.fileno())
    os.chmod(tmp, mode)
    os.replace(tmp, target)
