"""All of the CLI's output goes through here: human text, tables, JSON and errors."""

from __future__ import annotations

import sys
from collections.abc import Sequence

from qvm.base.checking import TYPE_CHECKING
from qvm.errors import EXIT_FAILURE, QvmError

if TYPE_CHECKING:
    from typing import Any, NoReturn, TextIO


class _Emitted:
    """Whether this command has printed its JSON document: an error after it stays on
    stderr only, so that stdout is always exactly one JSON document."""

    json = False


def json_mode(argv: Sequence[str] | None = None) -> bool:
    """The command line asks for JSON: ``--json`` before any ``--`` (after it, the words
    belong to the guest, as in `qvm ssh VM -- tool --json`)."""
    words = list(sys.argv[1:] if argv is None else argv)
    if "--" in words:
        words = words[: words.index("--")]
    return "--json" in words


def emit_json(data: Any) -> None:
    import json  # compiles six regular expressions: `qvm --help` would pay for them

    _Emitted.json = True
    sys.stdout.write(json.dumps(data, indent=2, sort_keys=True, default=str) + "\n")


def error_json(
    message: str,
    code: int,
    vm: str | None = None,
    key: str | None = None,
    file: str | None = None,
    hint: str | None = None,
) -> dict[str, Any]:
    """The JSON form of an error (schemas/error.json): the message's first line as
    ``error``, the exit status, and the VM, key, file and hint where they are known."""
    first = message.strip().splitlines()[0] if message.strip() else "error"
    first = first.removeprefix("qvm: ")
    data: dict[str, Any] = {"error": first, "exit_code": code}
    for field, value in (("vm", vm), ("key", key), ("file", file), ("hint", hint)):
        if value:
            data[field] = value
    if message.strip().count("\n"):
        data["problems"] = [line.removeprefix("qvm: ") for line in message.strip().splitlines()]
    return data


def error_fields(error: QvmError, code: int, vm: str | None = None) -> dict[str, Any]:
    """``error_json`` of a QvmError, from its fields; ``vm``: the VM the command was
    about, when the error does not name one."""
    return error_json(str(error), code, error.vm or vm, error.key, error.file, error.hint)


def report_error(error: QvmError, code: int) -> None:
    """A QvmError the command did not handle: one line (or the lines of every problem)
    on stderr, and with ``--json`` its JSON form on stdout too, naming the VM the error
    names, else the one VM the command looked up (``qvm.cli.resolve.only_vm``)."""
    sys.stderr.write(f"qvm: {error}\n")
    if json_mode() and not _Emitted.json:
        from qvm.cli.resolve import only_vm

        emit_json(error_fields(error, code, only_vm()))


def say(text: str = "") -> None:
    sys.stdout.write(text + "\n")


def say_kept(name: str, kept: Sequence[tuple[object, str]]) -> None:
    """The files a removal left in place (``qvm.ops.files.remove``), each with why."""
    for file, why in kept:
        say(f"{name}: kept {file} ({why})")


def warn(text: str) -> None:
    sys.stderr.write(text + "\n")


class _StderrTail:
    """stderr as it is, remembering the last "Error: ..." line Click writes there, so that
    a usage error can be given in JSON too (only installed with ``--json``)."""

    def __init__(self, stream: Any) -> None:
        self.stream: TextIO = stream
        self.last_error: str | None = None

    def write(self, text: str) -> int:
        for line in text.splitlines():
            if line.startswith("Error: "):
                self.last_error = line.removeprefix("Error: ")
        return self.stream.write(text)

    def __getattr__(self, name: str) -> Any:
        return getattr(self.stream, name)


if json_mode() and not isinstance(sys.stderr, _StderrTail):
    sys.stderr = _StderrTail(sys.stderr)


def report_usage_error(code: int) -> None:
    """Click's usage error, already on stderr, as a JSON object on stdout (``--json``)."""
    if not json_mode() or _Emitted.json:
        return
    said = sys.stderr.last_error if isinstance(sys.stderr, _StderrTail) else None
    emit_json(error_json(said or "usage error (see stderr)", code))


def abort(message: str, code: int = EXIT_FAILURE) -> NoReturn:
    sys.stderr.write(f"qvm: {message}\n" if "\n" not in message else message + "\n")
    if json_mode() and not _Emitted.json:
        from qvm.cli.resolve import only_vm

        emit_json(error_json(message, code, only_vm()))
    raise SystemExit(code)


def fail_all(problems: list[str], code: int = EXIT_FAILURE) -> NoReturn:
    """Every problem on its own line (all but the last as warnings), then exit ``code``."""
    for problem in problems[:-1]:
        warn(f"qvm: {problem}")
    if len(problems) > 1 and json_mode() and not _Emitted.json:
        from qvm.cli.resolve import only_vm

        emit_json({**error_json(problems[-1], code, only_vm()), "problems": problems})
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
