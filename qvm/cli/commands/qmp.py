"""qvm qmp: raw QMP for everything qvm has no command for."""

from __future__ import annotations

import os
import sys

from qvm.cli import resolve
from qvm.cli.output import abort, emit_json
from qvm.cli.parsing.declare import MACHINE, Argument, Commands, Option
from qvm.errors import EXIT_USAGE
from qvm.layout.rundir import RunDir

commands = Commands()


@commands.command("qmp")
def qmp(
    name: str = MACHINE,
    command: str | None = Argument(None, help="QMP command, e.g. query-status."),
    arguments: list[str] | None = Argument(
        None,
        metavar="[KEY=VALUE]...",
        help="Command arguments; a value is JSON where it parses as JSON, else a string.",
    ),
    shell: bool = Option(
        False,
        "--shell",
        help="Open qmp-shell (from qemu.qmp) on the VM's user QMP socket instead.",
    ),
    timeout: float = Option(10.0, "--timeout", help="Seconds to wait for QEMU's reply."),
    args_file: str | None = Option(
        None,
        "--args-file",
        metavar="FILE",
        help="The command's arguments as one JSON object read from FILE ('-': standard "
        "input), for arguments too large for a command line; KEY=VALUE pairs override it.",
    ),
    as_json: bool = Option(
        False, "--json", help="The reply is JSON anyway; with --json, an error is JSON too."
    ),
) -> None:
    """Send one QMP command (the supervisor runs it) and print QEMU's JSON reply.

    Errors from QEMU are printed as QEMU's own message, with exit status 1.

    JSON: schemas/qmp.json
    """
    timeout = resolve.timeout_seconds(timeout)
    run = resolve.run_dir_of(name)
    if shell:
        if command is not None:
            abort(f"{name}: --shell takes no command", EXIT_USAGE)
        _exec_shell(run)
    if command is None:
        abort(f"{name}: name a QMP command (e.g. query-status), or use --shell", EXIT_USAGE)
    from qvm.control.session import ControlSession, parse_kv_args

    try:
        args = {**_read_args_file(args_file), **parse_kv_args(arguments or [])}
    except ValueError as error:
        abort(f"{name}: {error}", EXIT_USAGE)
    with ControlSession(run, timeout=timeout) as session:
        reply = session.execute(command, args or None)
    emit_json(reply)


def _read_args_file(path: str | None) -> dict[str, object]:
    """The JSON object in ``path`` ('-': standard input); ValueError says what is wrong."""
    if path is None:
        return {}
    import json

    source = "standard input" if path == "-" else path
    try:
        if path == "-":
            text = sys.stdin.buffer.read()
        else:
            with open(path, "rb") as file:
                text = file.read()
        data = json.loads(text)
    except OSError as error:
        raise ValueError(f"--args-file: {source}: {error.strerror or error}") from error
    except (ValueError, RecursionError) as error:
        raise ValueError(f"--args-file: {source}: not JSON ({str(error)[:200]})") from error
    if not isinstance(data, dict):
        raise ValueError(f"--args-file: {source}: must hold a JSON object of arguments")
    return data


def _exec_shell(run: RunDir) -> None:
    """Replace this process with qmp-shell on the user's socket (qvm never holds it)."""
    from qvm.errors import NotRunningError
    from qvm.supervisor.client import supervisor_alive

    if not supervisor_alive(run) or not run.qmp_socket.exists():
        raise NotRunningError(run.name)
    sys.stdout.flush()
    os.execv(
        sys.executable, [sys.executable, "-m", "qemu.qmp.qmp_shell", "-p", str(run.qmp_socket)]
    )
