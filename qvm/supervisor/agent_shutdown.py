"""`qvm down`'s step between the ACPI power button and QMP ``quit``: ask the guest agent
to power the guest off (``guest-shutdown``), for a guest that ignores the button.

The exchange is the agent protocol every qvm command speaks
(``qvm.supervisor.agent_wire``), under the same ``agent.lock`` (the agent answers one
client at a time): a resync, then ``guest-shutdown``, which has no reply on success (the
guest goes down). Blocking socket code: the supervisor runs it in a thread.
"""

from __future__ import annotations

import os
import socket

from qvm.errors import AgentCommandError, AgentError, AgentNotAnswering
from qvm.layout.runfiles import AGENT_LOCK, AGENT_SOCKET, RunFiles
from qvm.supervisor.agent_wire import AgentClient, take_agent_lock

SYNC_TIMEOUT = 3.0  # for the agent to answer guest-sync-delimited
LOCK_TIMEOUT = 3.0  # another qvm command may be talking to the agent
ERROR_WAIT = 0.5  # guest-shutdown answers only when it fails: listen this long for that


def agent_shutdown(run: RunFiles) -> str | None:
    """Send ``guest-shutdown`` (power down); None once the agent took it, else why not."""
    try:
        lock = take_agent_lock(run.file(AGENT_LOCK), LOCK_TIMEOUT)
    except OSError:
        lock = -1  # no lock file can be made: go on without one, QEMU is what matters
    if lock is None:
        return f"the guest agent was busy with another qvm command for {LOCK_TIMEOUT:g} s"
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC) as sock:
            sock.settimeout(SYNC_TIMEOUT)
            sock.connect(run.file(AGENT_SOCKET))
            client = AgentClient(sock, os.path.basename(run.path))
            client.sync(SYNC_TIMEOUT)
            client.send("guest-shutdown", {"mode": "powerdown"}, error_wait=ERROR_WAIT)
    except AgentCommandError as error:
        return f"guest-shutdown: {error.agent_desc}"
    except AgentNotAnswering:
        return f"the guest agent did not answer within {SYNC_TIMEOUT:g} s"
    except AgentError:
        return "the guest agent's channel closed"
    except OSError as error:
        return f"the guest agent's channel: {error.strerror or error}"
    finally:
        if lock >= 0:
            os.close(lock)
    return None
