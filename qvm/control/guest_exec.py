"""Running a program in the guest through the agent: ``guest-exec``, then
``guest-exec-status`` until it has ended.

What QEMU 7.2's agent does, measured in the test guest (and read in qga/commands.c):

- the program is run directly (glib's spawn, searching the agent's PATH), never through
  a shell: each argument arrives as it was given, spaces and quotes included;
- ``env`` *replaces* the agent's environment instead of adding to it (so qvm adds the
  agent's own environment first, see ``qvm.ops.guest``);
- with ``capture-output`` the output is kept by the agent and handed over in one piece,
  base64, in the first ``guest-exec-status`` reply that says ``exited``; the process is
  then forgotten. No output comes before the end. Each stream is cut at 16 MiB
  (``out-truncated``/``err-truncated``);
- without ``input-data`` the program's stdin is /dev/null;
- a program that does not exist is the agent's error reply to ``guest-exec``;
- there is no command to stop a started program (``guest-exec-status`` only looks).
"""

from __future__ import annotations

import base64
import binascii
import re
import time
from collections.abc import Iterator, Mapping, Sequence
from typing import Any

from qvm.base.record import Record
from qvm.control.agent import AgentClient
from qvm.errors import AgentCommandError, AgentError, ProgramNotStarted

FIRST_POLL = 0.005  # seconds; `true` is over in about 10 ms under TCG
POLL_GROWTH = 1.5
LONGEST_POLL = 0.1
MAX_INPUT = 32 * 1024**2  # base64 in one JSON string: the agent's parser takes up to 64 MiB
STATUS_TIMEOUT = 60.0  # a reply with 2 x 16 MiB of output, base64, through a TCG guest


class ExecStatus(Record):
    """One ``guest-exec-status`` reply. ``exit_code`` or ``signal`` once ``exited``."""

    exited: bool
    exit_code: int | None = None
    signal: int | None = None
    stdout: bytes = b""
    stderr: bytes = b""
    stdout_truncated: bool = False
    stderr_truncated: bool = False

    @classmethod
    def from_reply(cls, data: Any, source: str) -> ExecStatus:
        if not isinstance(data, dict) or not isinstance(data.get("exited"), bool):
            raise AgentError(f"{source}: guest-exec-status: unexpected reply {data!r:.200}")
        return cls(
            exited=data["exited"],
            exit_code=_int_or_none(data.get("exitcode")),
            signal=_int_or_none(data.get("signal")),
            stdout=_decode(data.get("out-data"), source),
            stderr=_decode(data.get("err-data"), source),
            stdout_truncated=data.get("out-truncated") is True,
            stderr_truncated=data.get("err-truncated") is True,
        )

    @property
    def status(self) -> int:
        """As a shell reports it: the exit code, or 128 + the signal that ended it."""
        if self.signal is not None:
            return 128 + self.signal
        return self.exit_code if self.exit_code is not None else 0


def _int_or_none(value: Any) -> int | None:
    return value if isinstance(value, int) and not isinstance(value, bool) else None


def _decode(value: Any, source: str) -> bytes:
    if value is None:
        return b""
    try:
        return base64.b64decode(value, validate=True)
    except (binascii.Error, TypeError, ValueError):
        raise AgentError(f"{source}: guest-exec-status: output that is not base64") from None


def exec_arguments(
    argv: Sequence[str], env: Mapping[str, str] | None = None, stdin: bytes | None = None
) -> dict[str, Any]:
    """``guest-exec``'s arguments: ``argv[0]`` is the program (searched in the agent's
    PATH), the rest its arguments, exactly; ``env`` the whole environment."""
    if not argv:
        raise ValueError("no program to run")
    arguments: dict[str, Any] = {"path": argv[0], "arg": list(argv[1:]), "capture-output": True}
    if env is not None:
        arguments["env"] = [f"{key}={value}" for key, value in env.items()]
    if stdin is not None:
        arguments["input-data"] = base64.b64encode(stdin).decode("ascii")
    return arguments


NOT_FOUND = "No such file or directory"  # the spawn failure of a program not there (ENOENT)
SPAWN_FAILED = re.compile(r"Failed to execute child process .(?P<program>.*). \((?P<why>.*)\)")


def spawn_failure(desc: str) -> str:
    """Why the agent could not start a program, from its error text: 7.2 says "Guest agent
    command failed, error was 'Failed to execute child process “x” (No such file or
    directory)'"; the reason is the part in parentheses."""
    found = SPAWN_FAILED.search(desc)
    if found:
        return found["why"]
    return desc.removeprefix("Guest agent command failed, error was ").strip("'")


def poll_delays() -> Iterator[float]:
    """Seconds to sleep before each ``guest-exec-status``: short first (most commands a
    script runs are over in milliseconds), then growing to ``LONGEST_POLL``."""
    delay = FIRST_POLL
    while True:
        yield delay
        delay = min(delay * POLL_GROWTH, LONGEST_POLL)


def start(
    client: AgentClient,
    argv: Sequence[str],
    env: Mapping[str, str] | None = None,
    stdin: bytes | None = None,
) -> int:
    """Start ``argv`` in the guest; its pid there. A program that cannot be started is
    ProgramNotStarted (its message names the program and why)."""
    try:
        reply = client.execute("guest-exec", exec_arguments(argv, env, stdin))
    except AgentCommandError as error:
        why = spawn_failure(error.agent_desc)
        raise ProgramNotStarted(
            f"{client.name}: cannot run {argv[0]} in the guest: {why}",
            error.agent_class,
            error.agent_desc,
            not_found=why == NOT_FOUND,
        ) from None
    pid = reply.get("pid") if isinstance(reply, dict) else None
    if not isinstance(pid, int):
        raise AgentError(f"{client.name}: guest-exec: unexpected reply {reply!r:.200}")
    return pid


def status(client: AgentClient, pid: int) -> ExecStatus:
    return ExecStatus.from_reply(
        client.execute("guest-exec-status", {"pid": pid}, timeout=STATUS_TIMEOUT), client.name
    )


def run_to_end(
    client: AgentClient, argv: Sequence[str], timeout: float = STATUS_TIMEOUT
) -> ExecStatus | None:
    """Start ``argv`` and poll it on this connection until it ends; None if it is still
    running after ``timeout`` seconds. For qvm's own short helpers (stat, chmod)."""
    pid = start(client, argv)
    deadline = time.monotonic() + timeout
    for delay in poll_delays():
        time.sleep(delay)
        result = status(client, pid)
        if result.exited:
            return result
        if time.monotonic() >= deadline:
            return None
    raise AssertionError("unreachable")  # poll_delays() never ends
