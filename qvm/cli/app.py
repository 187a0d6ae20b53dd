"""The `qvm` console script: a thin layer over the core. Commands are declared once
(``qvm.cli.parsing.declare``); plain command lines run without Typer
(``qvm.cli.parsing.fast``), everything else through the Typer CLI built from the same
declarations (``qvm.cli.parsing.typer_app``)."""

from __future__ import annotations

import gc
import os
import sys
from collections.abc import Callable


def run() -> None:
    """The ``qvm`` console script.

    The cyclic garbage collector stays off while the command's modules are imported: it
    would run several times over Typer's and Click's objects and find no garbage (10 to 20
    ms, measured). Then they are frozen out of its sight, so that collections during the
    command, and the interpreter's last one at exit, scan only what the command creates
    (15 to 30 ms less, measured), and it is turned back on: `qvm console` runs long.

    Once the command has finished, qvm leaves without the interpreter's teardown (freeing
    every module one by one: about 7 ms of `qvm up`, measured): the core closes its files
    itself and registers no exit handlers, so there is nothing left to do but flush.
    """
    gc.disable()
    from qvm.cli.parsing.fast import plain_command
    from qvm.errors import EXIT_FAILURE, EXIT_INTERRUPTED, EXIT_OK, QvmError

    argv = sys.argv[1:]
    command = early_command(argv) or plain_command(argv)
    if command is None:
        from qvm.cli.parsing.typer_app import build

        command = build(argv)
    gc.freeze()
    gc.enable()
    try:
        command()
        code = EXIT_OK
    except SystemExit as done:
        if isinstance(done.code, int):
            code = done.code
        else:  # None is success; a message (``sys.exit("...")``) is printed, as Python does
            code = EXIT_OK if done.code is None else EXIT_FAILURE
            if isinstance(done.code, str):
                sys.stderr.write(done.code + "\n")
        if code == 2 and "--json" in argv:  # a usage error Click printed: JSON on stdout too
            from qvm.cli.output import report_usage_error

            report_usage_error(code)
    except QvmError as error:
        from qvm.cli.output import report_error  # with --json, also a JSON object on stdout

        code = error.exit_code
        report_error(error, code)
    except KeyboardInterrupt:
        sys.stderr.write("qvm: interrupted\n")
        code = EXIT_INTERRUPTED
    except BrokenPipeError:
        code = EXIT_FAILURE  # a reader that went away (`qvm list | head -1`), as Click has it
    for stream in (sys.stdout, sys.stderr):
        try:  # noqa: SIM105 - no contextlib on a query's way (0.4 ms)
            stream.flush()
        except OSError:
            pass
    os._exit(code)


def early_command(argv: list[str]) -> Callable[[], None] | None:
    """What answers before any command is parsed: a TAB press (Click answers it),
    ``--version`` and the completion scripts; None for everything else."""
    if os.environ.get("_QVM_COMPLETE"):
        from qvm.cli.parsing.typer_app import build

        return build(argv)
    if argv == ["--version"]:
        from qvm.cli.version import version_text

        return lambda: print(version_text())
    from qvm.cli.parsing.fast import split_global_options

    options, _ = split_global_options(argv)
    if {"--show-completion", "--install-completion"} & set(options):
        from qvm.cli.parsing.completion import script_request

        return script_request(argv)
    return None
