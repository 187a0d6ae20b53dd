"""The QEMU guest agent (qemu-ga in the guest), over the run dir's ``agent.sock``: one
VM's agent, opened for a qvm command. The protocol itself (the resynchronisation, the
client, the lock every client takes) is ``qvm.supervisor.agent_wire``, which the
supervisor's own ``guest-shutdown`` speaks too; its names are imported from here as well.

Errors, each one line naming the VM (the classes live in ``qvm.errors``; importing them
from here works too)::

    NotRunningError      no supervisor, or no QEMU under it
    AgentNotConfigured   the VM has no agent channel ([agent] enabled = false)
    AgentNotAnswering    no reply within the timeout: no agent running in the guest (yet),
                         or the agent is stuck; also: another qvm command holds the agent
    AgentCommandError    the agent's own error reply (``agent_class``, ``agent_desc``)
    AgentError           the root of these; also the channel closing mid-command
"""

from __future__ import annotations

import contextlib
import os
import socket
import time
from collections.abc import Iterator

# the error classes live in qvm.errors, the protocol in qvm.supervisor.agent_wire; both
# are imported from here too
from qvm.errors import (
    AgentCommandError,
    AgentError,
    AgentNotAnswering,
    AgentNotConfigured,
    NotRunningError,
)
from qvm.layout.rundir import RunDir
from qvm.store.guest import not_configured_text
from qvm.store.launch import read_launch
from qvm.supervisor.agent_wire import (
    CONNECT_TIMEOUT,
    SYNC_TIMEOUT,
    AgentClient,
    AgentCommand,
    AgentInfo,
    take_agent_lock,
)
from qvm.supervisor.client import supervisor_alive

__all__ = [
    "AgentClient",
    "AgentCommand",
    "AgentCommandError",
    "AgentError",
    "AgentInfo",
    "AgentNotAnswering",
    "AgentNotConfigured",
    "NotRunningError",
    "agent_configured",
    "not_configured",
    "open_agent",
]

LOCK_TIMEOUT = 30.0  # another qvm command may be in a long exchange with the agent


# --- one VM's agent -------------------------------------------------------------------------


def agent_configured(run: RunDir) -> bool:
    """Whether the VM's current QEMU run has the agent channel: read from launch.json.

    Raises NotRunningError when no supervisor or QEMU runs."""
    launch = read_launch(run.launch_file)
    if launch is None or not supervisor_alive(run):
        raise NotRunningError(run.name)
    return launch.has_agent


def not_configured(name: str) -> AgentNotConfigured:
    return AgentNotConfigured(not_configured_text(name))


@contextlib.contextmanager
def open_agent(
    run: RunDir,
    sync_timeout: float = SYNC_TIMEOUT,
    lock_timeout: float = LOCK_TIMEOUT,
    defer_sync: bool = False,
) -> Iterator[AgentClient]:
    """A synchronised connection to the VM's agent, held alone (``agent.lock``). With
    ``defer_sync`` the resync is only sent: its reply comes with the first command's."""
    if not agent_configured(run):
        raise not_configured(run.name)
    lock = _take_lock(run, lock_timeout)
    try:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
        try:
            sock.settimeout(CONNECT_TIMEOUT)
            _connect(sock, run)
        except FileNotFoundError:
            sock.close()
            raise NotRunningError(run.name, hint=f"qvm status {run.name}") from None
        except OSError as error:
            sock.close()
            raise AgentError(
                f"{run.name}: cannot connect to the guest agent channel {run.agent_socket}:"
                f" {error.strerror or error}"
            ) from None
        client = AgentClient(sock, run.name)
        try:
            if defer_sync:
                client.begin_sync(sync_timeout)
            else:
                client.sync(sync_timeout)
            yield client
        finally:
            client.close()
    finally:
        os.close(lock)


def _connect(sock: socket.socket, run: RunDir) -> None:
    """Connect to the supervisor's ``agent.sock``. Right after ``qvm up`` QEMU's end
    (``qga.sock``) can be there before the supervisor has opened its own: wait for it
    then, rather than say the VM is not running."""
    deadline = time.monotonic() + CONNECT_TIMEOUT
    while True:
        try:
            sock.connect(str(run.agent_socket))
            return
        except (FileNotFoundError, ConnectionRefusedError):
            if not run.agent_chardev_socket.exists() or time.monotonic() > deadline:
                raise FileNotFoundError(str(run.agent_socket)) from None
            time.sleep(0.01)


def _take_lock(run: RunDir, timeout: float) -> int:
    try:
        fd = take_agent_lock(str(run.agent_lock), timeout)
    except OSError as error:
        raise AgentError(
            f"{run.name}: cannot open {run.agent_lock}: {error.strerror or error}"
        ) from None
    if fd is None:
        raise AgentNotAnswering(
            f"{run.name}: guest agent busy: another qvm command has held it for"
            f" {timeout:g} s (hint: try again)"
        )
    return fd
