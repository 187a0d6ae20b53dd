"""All of the CLI's output goes through here: human text, tables, JSON and errors."""

from __future__ import annotations

import json
import sys
from collections.abc import Sequence
from typing import Any, NoReturn

from qvm.errors import EXIT_FAILURE


def emit_json(data: Any) -> None:
    sys.stdout.write(json.dumps(data, indent=2, sort_keys=True, default=str) + "\n")


def say(text: str = "") -> None:
    sys.stdout.write(text + "\n")


def warn(text: str) -> None:
    sys.stderr.write(text + "\n")


def abort(message: str, code: int = EXIT_FAILURE) -> NoReturn:
    sys.stderr.write(f"qvm: {message}\n" if "\n" not in message else message + "\n")
    raise SystemExit(code)


# the exit codes live in qvm.errors; this alias only until the commands import it from there


def fail_all(problems: list[str], code: int = EXIT_FAILURE) -> NoReturn:
    """Every problem on its own line (all but the last as warnings), then exit ``code``."""
    for problem in problems[:-1]:
        warn(f"qvm: {problem}")
    abort(problems[-1], code)


def ms(seconds: float | None) -> str:
    return "-" if seconds is None else f"{seconds * 1000:.0f} ms"


def table(headers: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    cells = [[str(h) for h in headers]] + [["-" if c is None else str(c) for c in r] for r in rows]
    widths = [max(len(row[i]) for row in cells) for i in range(len(headers))]
    lines = [
        "  ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)).rstrip() for row in cells
    ]
    return "\n".join(lines)


def human_bytes(n: int | None) -> str:
    from qvm.base.sizes import human_size

    return "-" if n is None else human_size(n)


def human_seconds(seconds: float | None) -> str:
    if seconds is None:
        return "-"
    seconds = int(seconds)
    days, rest = divmod(seconds, 86400)
    hours, rest = divmod(rest, 3600)
    minutes, secs = divmod(rest, 60)
    if days:
        return f"{days}d{hours}h"
    if hours:
        return f"{hours}h{minutes:02d}m"
    if minutes:
        return f"{minutes}m{secs:02d}s"
    return f"{secs}s"
