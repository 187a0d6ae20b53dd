"""Plain command lines, parsed without Typer.

Importing Typer and Click costs 30-80 ms on this project's machine (it drifts), much of the 100 ms
that `qvm status` may take in all. Most command lines are plain: a command
word, its arguments, options spelled out in full. This module parses exactly those, from
the same declarations Typer reads (``qvm.cli.parsing.declare``), and calls the same functions with
the same values (``tests/unit/cli/test_cli_parsers.py`` holds it to that, command by command).

A guest's command line (`qvm exec VM ls -l`) is the guest's from its first word on: no
option after it is qvm's. Anything else is declined, not guessed at: help, a mistake, a
short option with its value attached, ``--`` (except before the last argument's words:
`qvm exec VM -- CMD ARG...`), a value that starts with "-". Typer then parses the command
line and gives its usual help or error.
"""

from __future__ import annotations

import sys
from collections.abc import Callable

from qvm.base.checking import TYPE_CHECKING
from qvm.base.record import Record
from qvm.cli import resolve
from qvm.cli.parsing.declare import GROUPS, TOP_LEVEL, fixed_arguments, parameters

if TYPE_CHECKING:
    from pathlib import Path
    from typing import Any


def _path(text: str) -> Path:
    """A Path option's value: pathlib (with the urllib.parse and ipaddress it imports,
    ~3 ms) is imported only by a command line that has one."""
    from pathlib import Path

    return Path(text)


# annotation text -> (convert one value, repeatable); other annotations are not parsed here
CONVERTERS: dict[str, tuple[Callable[[str], Any], bool]] = {
    "str": (str, False),
    "str | None": (str, False),
    "int": (int, False),
    "int | None": (int, False),
    "float": (float, False),
    "Path": (_path, False),
    "Path | None": (_path, False),
    "list[str]": (str, True),
    "list[str] | None": (str, True),
}


class PlainCall(Record):
    function: Callable[..., None]
    global_values: dict[str, Any]  # for resolve.global_options
    values: dict[str, Any]


def plain_call(argv: list[str]) -> PlainCall | None:
    """What ``argv`` asks to run, or None if it is not plainly spelled."""
    global_args, rest = split_global_options(argv)
    global_values = parse(resolve.global_options, global_args)
    if global_values is None or not rest:
        return None
    word, rest = rest[0], rest[1:]
    if word in TOP_LEVEL:
        module = TOP_LEVEL[word]
    elif word in GROUPS and rest:
        module, word, rest = word, rest[0], rest[1:]
    else:
        return None
    function = command_module(module).commands.functions.get(word)
    values = None if function is None else parse(function, rest)
    if function is None or values is None:
        return None
    return PlainCall(function, global_values, values)


def command_module(module: str) -> Any:
    """``qvm.cli.commands.MODULE``, imported without importlib (0.3 ms, with warnings)."""
    name = f"qvm.cli.commands.{module}"
    __import__(name)
    return sys.modules[name]


def plain_command(argv: list[str]) -> Callable[[], None] | None:
    """The command ``argv`` names, ready to run, or None if it is not plainly spelled."""
    call = plain_call(argv)
    if call is None:
        return None

    def run() -> None:
        resolve.global_options(**call.global_values)
        call.function(**call.values)

    return run


def split_global_options(argv: list[str]) -> tuple[list[str], list[str]]:
    """``argv`` split before the command word: what comes first is `qvm`'s own options
    (``--machines DIR``), or a mistake among them."""
    takes_value = {
        decl
        for _, annotation, param in parameters(resolve.global_options)
        if annotation != "bool"
        for decl in param.decls
    }
    split = 0
    while split < len(argv) and argv[split].startswith("-"):
        split += 2 if argv[split] in takes_value else 1
    return argv[:split], argv[split:]


def parse(function: Callable[..., Any], args: list[str]) -> dict[str, Any] | None:
    """``function``'s keyword arguments from ``args``, or None if Typer must parse them."""
    declared = parameters(function)
    if any(a != "bool" and a not in CONVERTERS for _, a, _ in declared):
        return None
    options = {
        decl: (name, annotation)
        for name, annotation, param in declared
        if param.kind == "option"
        for decl in param.decls
    }
    values: dict[str, Any] = {}
    positional: list[str] = []
    # `qvm up VM1 -- VM2`: after "--" every word is an argument, as Click has it
    arguments = [annotation for _, annotation, param in declared if param.kind == "argument"]
    takes_many = bool(arguments) and CONVERTERS[arguments[-1]][1]
    # `qvm exec VM ls -l`: from the program on, every word is the guest's
    guest_line_at = fixed_arguments(function)
    pending = iter(args)
    for arg in pending:
        if arg == "--" and takes_many:
            positional.extend(pending)
            break
        if not arg.startswith("-") or arg == "-":
            positional.append(arg)
            if guest_line_at is not None and len(positional) > guest_line_at:
                positional.extend(pending)
                break
            continue
        decl, has_inline, inline = arg.partition("=") if arg.startswith("--") else (arg, "", "")
        if decl not in options:
            return None  # help, --, a short option with its value attached, a mistake
        name, annotation = options[decl]
        if annotation == "bool":
            if has_inline:
                return None
            values[name] = True
            continue
        text = inline if has_inline else next(pending, None)
        if text is None or text.startswith("-"):
            return None
        convert, repeatable = CONVERTERS[annotation]
        value = _convert(convert, text)
        if value is INVALID or (name in values and not repeatable):
            return None  # given twice: Click would take the last, silently
        if repeatable:
            values.setdefault(name, []).append(value)
        else:
            values[name] = value

    argument_names = [name for name, _, param in declared if param.kind == "argument"]
    for name, annotation, param in declared:
        if param.kind != "argument" or not positional:
            continue
        convert, takes_the_rest = CONVERTERS[annotation]
        # `qvm snapshot save VM1 VM2 TAG`: as Click has it, the arguments after a
        # repeated one take the last words
        after = len(argument_names) - argument_names.index(name) - 1
        count = max(len(positional) - after, 0) if takes_the_rest else 1
        if not count:
            continue
        taken, positional = positional[:count], positional[count:]
        converted = [_convert(convert, text) for text in taken]
        if INVALID in converted:
            return None
        values[name] = converted if takes_the_rest else converted[0]
    if positional:
        return None
    for name, _, param in declared:
        if name not in values:
            if param.required:
                return None
            values[name] = param.default
    return values


INVALID = object()


def _convert(convert: Callable[[str], Any], text: str) -> Any:
    try:
        return convert(text)
    except ValueError:
        return INVALID
