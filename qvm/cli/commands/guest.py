"""qvm exec and qvm cp: run a program in the guest, copy files in and out, through the
QEMU guest agent (qvm.ops.guest)."""

from __future__ import annotations

import re
import sys
from typing import TYPE_CHECKING, Any

from qvm.cli import resolve
from qvm.cli.output import abort, emit_json, warn
from qvm.cli.parsing.declare import MACHINE, PROGRAM, Argument, Commands, Option
from qvm.errors import (
    EXIT_CANNOT_RUN,
    EXIT_EXEC_FAILED,
    EXIT_EXEC_TIMEOUT,
    EXIT_INTERRUPTED,
    EXIT_NOT_FOUND,
    EXIT_USAGE,
    QvmError,
)
from qvm.layout.names import shown

if TYPE_CHECKING:
    from qvm.ops.guest import ExecOutcome, Progress

commands = Commands()

BAR_FROM = 8 * 1024**2  # a progress bar for files from this size, on a terminal only
# --owner: a user and optional group as chown takes them (names or numeric ids), never
# an option or a path
_NAME = r"[A-Za-z_0-9][A-Za-z0-9_.-]{0,31}\$?"
OWNER = rf"{_NAME}(:({_NAME})?)?"


@commands.command("exec")
def exec_(
    name: str = MACHINE,
    command: list[str] | None = PROGRAM,
    timeout: float = Option(
        0.0, "--timeout", help="Seconds before giving up (exit 124); 0, the default: no limit."
    ),
    env: list[str] | None = Option(
        None, "--env", help="NAME=VALUE added to the command's environment (repeatable)."
    ),
    stdin: bool = Option(
        False, "--stdin", help="Send qvm's standard input to the command (read to its end first)."
    ),
    as_json: bool = Option(False, "--json", help="Print JSON: exit_code, signal, stdout, ..."),
) -> None:
    """Run a program in the VM through the guest agent; exit with its status.

    qvm exec NAME [--timeout S] [--env K=V]... [--stdin] [--] PROGRAM [ARG...]

    From PROGRAM on, every word is the program's, options too (`qvm exec VM ls -l`).

    The exit status is the program's, or 128 + the signal that ended it; qvm's own are
    124 (--timeout), 125 (qvm failed), 126 (cannot run it), 127 (no such program), and 2
    for a mistake on the command line. Its stdout and
    stderr go to qvm's, byte for byte, once it has ended: QEMU 7.2's agent hands the
    output over only then (up to 16 MiB per stream; beyond, it is cut and qvm says so).
    Without --stdin the program reads /dev/null.

    JSON: schemas/exec.json
    """
    timeout = resolve.timeout_seconds(timeout)
    if not command:
        abort(f"qvm exec {name} -- PROGRAM [ARG...]: no program given", EXIT_USAGE)
    from qvm.ops.guest import parse_env, run_command

    try:
        extra = None if env is None else parse_env(env)
    except ValueError as error:
        abort(str(error), EXIT_USAGE)
    data = sys.stdin.buffer.read() if stdin else None
    pid: list[int] = []
    try:
        run = resolve.run_dir_of(name)
        outcome = run_command(run, command, extra, data, timeout or None, on_started=pid.append)
    except QvmError as error:
        if error.exit_code not in (EXIT_USAGE, EXIT_CANNOT_RUN, EXIT_NOT_FOUND):
            error.exit_code = EXIT_EXEC_FAILED  # out of the way of the program's own codes
        raise
    except KeyboardInterrupt:
        where = f" as pid {pid[0]}" if pid else ""
        abort(
            f"{name}: interrupted; {command[0]} may still be running in the guest{where}",
            EXIT_INTERRUPTED,
        )
    status = outcome.status
    if as_json:
        emit_json(_exec_json(name, outcome))
    elif status is not None:
        sys.stdout.buffer.write(status.stdout)
        sys.stdout.flush()
        sys.stderr.buffer.write(status.stderr)
        sys.stderr.flush()
    if status is None:
        warn(
            f"qvm: {name}: {command[0]} still running in the guest after {timeout:g} s"
            f" (--timeout), as pid {outcome.pid} (hint: qvm exec {name} -- kill {outcome.pid})"
        )
        raise SystemExit(EXIT_EXEC_TIMEOUT)
    cut = [
        s
        for s, c in (("stdout", status.stdout_truncated), ("stderr", status.stderr_truncated))
        if c
    ]
    if cut and not as_json and status.stderr[-1:] not in (b"", b"\n"):
        warn("")  # the notes below on a line of their own
    for stream in cut:
        warn(f"qvm: {name}: the guest agent kept only the first 16 MiB of {stream}")
    raise SystemExit(status.status)


def _exec_json(name: str, outcome: ExecOutcome) -> dict[str, Any]:
    status = outcome.status
    record: dict[str, Any] = {
        "name": name,
        "command": list(outcome.argv),
        "pid": outcome.pid,
        "seconds": round(outcome.seconds, 3),
        "timed_out": outcome.timed_out,
        "running": outcome.running,
        "exit_code": None if status is None else status.exit_code,
        "signal": None if status is None else status.signal,
        "status": None if status is None else status.status,
        "stdout": "",
        "stderr": "",
        "truncated": {
            "stdout": status is not None and status.stdout_truncated,
            "stderr": status is not None and status.stderr_truncated,
        },
    }
    if status is not None:
        for stream, data in (("stdout", status.stdout), ("stderr", status.stderr)):
            try:
                record[stream] = data.decode()
            except UnicodeDecodeError:  # the exact bytes too, for output that is not text
                import base64

                record[stream] = data.decode(errors="replace")
                record[f"{stream}_base64"] = base64.b64encode(data).decode("ascii")
    return record


@commands.command("cp")
def cp(
    source: str = Argument(..., help="NAME:PATH (a file in the VM) or a local file."),
    target: str = Argument(
        ..., help="A local file or folder, or NAME:PATH (a file or folder in the VM)."
    ),
    owner: str | None = Option(
        None,
        "--owner",
        metavar="USER[:GROUP]",
        help="Into the VM: whom the copy belongs to (default: the cloud-init user under "
        "their home folder, else root).",
    ),
    recursive: bool = Option(False, "-r", "--recursive", help="A whole folder, either way."),
    as_json: bool = Option(False, "--json", help="Print JSON."),
) -> None:
    """Copy a file (-r: a folder) into or out of the VM through the guest agent.

    qvm cp [-r] NAME:PATH LOCAL    qvm cp [-r] [--owner USER[:GROUP]] LOCAL NAME:PATH

    A folder as the target keeps the file's name. The copy gets the source's permission
    bits (read and set with stat and chmod in the guest). Either way the copy is written
    to a hidden part file beside the target (0600 in the guest) and renamed into place
    when complete: a copy that fails or is interrupted removes it and leaves the target
    as it was.

    JSON: schemas/cp.json
    """
    from pathlib import Path

    from qvm.ops.guest import copy_from_guest, copy_to_guest, split_remote

    if owner is not None and not re.fullmatch(OWNER, owner):
        abort(f"--owner: must be USER or USER:GROUP, got {shown(owner)}", EXIT_USAGE)
    remote_source, remote_target = split_remote(source), split_remote(target)
    if remote_source and owner is not None:
        abort(f"qvm cp {source} {target}: --owner is for copies into the VM", EXIT_USAGE)
    if remote_source and remote_target:
        abort(
            f"qvm cp {source} {target}: copying between VMs is not supported (copy through"
            " a local file)",
            EXIT_USAGE,
        )
    if remote_source:
        vm, path = remote_source
        run = resolve.run_dir_of(vm)
        outcome = copy_from_guest(run, path, Path(target), _progress_bar(source), recursive)
        if outcome.mode is None:
            warn(
                f"qvm: {source}: its mode could not be read in the guest (no stat?); the"
                " copy has the default mode"
            )
    elif remote_target:
        vm, path = remote_target
        run = resolve.run_dir_of(vm)
        try:
            outcome = copy_to_guest(
                run, Path(source), path, _progress_bar(source), owner, recursive
            )
        except KeyboardInterrupt:
            abort(
                f"{target}: interrupted; the partial copy was removed, the target is as it was",
                EXIT_INTERRUPTED,
            )
        if outcome.mode is None:
            warn(f"qvm: {outcome.target}: its mode could not be set in the guest (no chmod?)")
    else:
        abort(
            f"qvm cp {source} {target}: one of them must be NAME:PATH, a file in a VM", EXIT_USAGE
        )
    if as_json:
        emit_json(
            {
                "source": outcome.source,
                "target": outcome.target,
                "bytes": outcome.size,
                "seconds": round(outcome.seconds, 3),
                "mode": None if outcome.mode is None else f"{outcome.mode:04o}",
            }
        )


def _progress_bar(label: str) -> Progress | None:
    """A progress callback drawing a bar on stderr for a large file, on a terminal only."""
    if not sys.stderr.isatty():
        return None
    from qvm.cli.progress import DownloadBar

    bar = DownloadBar()

    def update(done: int, total: int | None) -> None:
        if total is not None and total >= BAR_FROM:
            bar(label, done, total)

    return update
