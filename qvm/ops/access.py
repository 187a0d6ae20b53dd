"""Reaching a guest: the `ssh` command line for a VM, and waiting until it is ready.

``ssh_target`` reads what the launch recorded (cloud-init user, private keys, the forward
to guest port 22, possibly added at run time); ``ssh_argv`` is a pure function of it.
Host keys go to a known_hosts file in the VM's run dir under a per-VM alias, so a port
that moves (host port 0) or another VM on the same port never trips a key mismatch.

``wait_ready`` polls one condition until a deadline, calling ``tick`` with the last
probe's problem between polls (the CLI draws a spinner or progress lines with it):
``qmp`` (QEMU answers a command), ``ssh`` (a real login running ``true`` succeeds),
``agent`` (the guest agent answers ``guest-ping``) or ``serial:REGEX`` (the serial log of
this run).
"""

from __future__ import annotations

import math
import os
import re
import shlex
import subprocess
import time
from collections.abc import Callable, Sequence
from pathlib import Path

from qvm.base.record import Record
from qvm.errors import (
    AgentNotConfigured,
    HostError,
    NotRunningError,
    QvmError,
    UsageError,
    WaitTimeout,
)
from qvm.layout.rundir import RunDir
from qvm.store.forwards import read_forwards
from qvm.store.launch import read_launch
from qvm.supervisor.client import supervisor_alive

SSH_PORT = 22
SSH_POLL_TIMEOUT = 5  # ConnectTimeout of one probe, seconds


class SshTarget(Record):
    name: str
    user: str | None
    host: str
    port: int
    identities: tuple[Path, ...]
    known_hosts: Path


def ssh_target(run: RunDir) -> SshTarget:
    launch = read_launch(run.launch_file)
    if launch is None:
        raise NotRunningError(run.name)
    ssh = launch.ssh
    forward = next(
        (f for f in read_forwards(run) if f.proto == "tcp" and f.guest_port == SSH_PORT), None
    )
    if forward is None:
        raise HostError(
            f"{run.name}: no port forward to guest port {SSH_PORT} "
            f'(hint: add "tcp:0:22" to forwards in its [[nic]], or: qvm port add {run.name} '
            "tcp:0:22)"
        )
    host = forward.host_addr or "127.0.0.1"
    if host == "0.0.0.0":
        host = "127.0.0.1"
    target: SshTarget = SshTarget(
        name=run.name,
        user=ssh.user if ssh is not None else None,
        host=host,
        port=forward.host_port,
        identities=tuple(Path(p) for p in ssh.identities) if ssh is not None else (),
        known_hosts=run.known_hosts,
    )
    return target


def ssh_argv(
    target: SshTarget,
    command: Sequence[str] = (),
    user: str | None = None,
    batch: bool = False,
    extra: Sequence[str] = (),
) -> list[str]:
    argv = ["ssh", "-p", str(target.port)]
    argv += ["-o", f"UserKnownHostsFile={target.known_hosts}"]
    argv += ["-o", "StrictHostKeyChecking=accept-new"]
    argv += ["-o", f"HostKeyAlias=qvm-{target.name}", "-o", "CheckHostIP=no"]
    argv += ["-o", "LogLevel=ERROR"]  # no "Permanently added ..." on every first login
    for identity in target.identities:
        argv += ["-i", str(identity)]
    if target.identities:
        argv += ["-o", "IdentitiesOnly=yes"]
    if batch or command:
        # a command line runs without a person at the keyboard: a key the guest refuses
        # fails at once rather than asking for a password the user never set
        argv += ["-o", "BatchMode=yes"]
    if batch:
        argv += ["-o", f"ConnectTimeout={SSH_POLL_TIMEOUT}"]
    argv += list(extra)
    login = user or target.user
    # "--" ends ssh's options; what follows the destination is the remote command line
    argv += ["--", f"{login}@{target.host}" if login else target.host]
    if command:
        argv.append(remote_command(command))
    return argv


def remote_command(command: Sequence[str]) -> str:
    """``command`` as one line for the guest's shell that runs exactly that argv.

    ssh joins its words with spaces and the remote shell splits them again, so
    `ssh vm sh -c 'exit 7'` runs `sh -c exit 7` (status 0). Each word quoted keeps its
    boundaries, spaces and quotes; a pipeline or redirection needs a shell of its own
    (`qvm ssh VM -- sh -c 'a | b'`)."""
    return " ".join(shlex.quote(word) for word in command)


# --- waiting -------------------------------------------------------------------------------


def parse_condition(text: str) -> tuple[str, str | None]:
    """ "ssh", "qmp", "agent" or "serial:REGEX" -> (kind, regex)."""
    if text in ("ssh", "qmp", "agent"):
        return text, None
    if text.startswith("serial:") and len(text) > len("serial:"):
        pattern = text[len("serial:") :]
        try:
            re.compile(pattern)
        except re.error as exc:
            raise QvmError(f"--for {text}: not a regular expression: {exc}") from None
        return "serial", pattern
    raise UsageError(f"--for must be ssh, qmp, agent or serial:REGEX, got {text!r}")


def describe_condition(kind: str, pattern: str | None, run: RunDir) -> str:
    if kind == "ssh":
        try:
            target = ssh_target(run)
        except QvmError:
            return "an SSH login"
        return f"an SSH login ({target.user or 'default user'}@{target.host}:{target.port})"
    if kind == "qmp":
        return "QMP to answer"
    if kind == "agent":
        return "the guest agent to answer"
    return f"/{pattern}/ in {run.serial_log}"


def wait_ready(
    run: RunDir,
    kind: str,
    pattern: str | None,
    timeout: float,
    tick: Callable[[str], None] | None = None,
) -> float:
    """Block until the VM is ready in the sense of ``kind``; return the seconds it took.
    ``tick`` is called between probes with the last probe's problem ("" when none said
    why). A question with a known answer fails at once: ``ssh`` on a VM that has no
    forward to guest port 22."""
    if not (math.isfinite(timeout) and timeout >= 0):
        # NaN compares false with everything: its deadline would never come
        raise QvmError(f"{run.name}: timeout: must be a number of seconds >= 0, got {timeout:g}")
    started = time.monotonic()
    deadline = started + timeout
    check = _checker(run, kind, pattern)
    last_problem = ""
    while True:
        if not supervisor_alive(run):
            raise NotRunningError(run.name, hint=f"qvm status {run.name}")
        ok, problem = check()
        if ok:
            return time.monotonic() - started
        last_problem = problem or last_problem
        if time.monotonic() >= deadline:
            what = describe_condition(kind, pattern, run)
            detail = f"; last: {last_problem}" if last_problem else ""
            raise WaitTimeout(
                f"{run.name}: timed out after {timeout:g} s waiting for {what}{detail} "
                f"(hint: qvm logs {run.name})"
            )
        pause_until = min(time.monotonic() + 0.5, deadline)
        while time.monotonic() < pause_until:
            if tick:
                tick(last_problem)
            time.sleep(0.1)


def _checker(run: RunDir, kind: str, pattern: str | None) -> Callable[[], tuple[bool, str]]:
    if kind == "qmp":
        return lambda: _qmp_answers(run)
    if kind == "agent":
        return lambda: _agent_answers(run)
    if kind == "serial":
        regex = re.compile(pattern or "", re.M)
        return lambda: _serial_matches(run, regex)
    return lambda: _ssh_logs_in(run)


def _qmp_answers(run: RunDir) -> tuple[bool, str]:
    from qvm.control.session import ControlSession  # noqa: PLC0415 -- QMP only for --for qmp

    try:
        with ControlSession(run, timeout=2, lock_timeout=2) as session:
            session.execute("query-status")
    except QvmError as exc:
        return False, str(exc)
    return True, ""


def _agent_answers(run: RunDir) -> tuple[bool, str]:
    """A channel that is not configured never answers: that fails at once."""
    from qvm.control.agent import open_agent  # noqa: PLC0415 -- the agent only for --for agent

    try:
        with open_agent(run, sync_timeout=2, lock_timeout=2) as agent:
            agent.ping(timeout=2)
    except AgentNotConfigured:
        raise
    except QvmError as exc:
        return False, str(exc)
    return True, ""


def _serial_matches(run: RunDir, regex: re.Pattern[str]) -> tuple[bool, str]:
    try:
        text = run.serial_log.read_bytes().decode(errors="replace")
    except OSError:
        return False, ""
    return regex.search(text) is not None, ""


def _ssh_logs_in(run: RunDir) -> tuple[bool, str]:
    try:
        target = ssh_target(run)
    except NotRunningError as exc:  # not launched yet; anything else will not change
        return False, str(exc)
    argv = ssh_argv(target, ["true"], batch=True)
    try:
        done = subprocess.run(
            argv,
            stdin=subprocess.DEVNULL,
            capture_output=True,
            text=True,
            timeout=SSH_POLL_TIMEOUT * 3,
            check=False,
        )
    except subprocess.TimeoutExpired:
        return False, "ssh did not finish"
    except OSError as exc:
        raise HostError(f"cannot run ssh: {exc} (hint: apt-get install openssh-client)") from exc
    if done.returncode == 0:
        return True, ""
    lines = [line for line in done.stderr.strip().splitlines() if line.strip()]
    return False, lines[-1] if lines else f"ssh exited {done.returncode}"


def exec_ssh(argv: list[str]) -> None:
    """Replace this process with ssh: its exit status is the command's."""
    try:
        os.execvp(argv[0], argv)
    except OSError as exc:
        raise HostError(f"cannot run ssh: {exc} (hint: apt-get install openssh-client)") from exc
