"""`qvm down`'s step between the ACPI power button and QMP ``quit``: ask the guest agent
to power the guest off (``guest-shutdown``), for a guest that ignores the button.

The exchange is the agent protocol every qvm command speaks
(``qvm.supervisor.agent_wire``), under the same ``agent.lock`` (the agent answers one
client at a time): a resync, then ``guest-shutdown``, which has no reply on success (the
guest goes down). Blocking socket code: the supervisor runs it in a thread.
"""

from __future__ import annotations

from qvm.errors import AgentCommandError, AgentError, AgentNotAnswering
from qvm.layout.runfiles import RunFiles
from qvm.supervisor.agent_wire import held_agent

SYNC_TIMEOUT = 3.0  # for the agent to answer guest-sync-delimited
LOCK_TIMEOUT = 3.0  # another qvm command may be talking to the agent
ERROR_WAIT = 0.5  # guest-shutdown answers only when it fails: listen this long for that


def agent_shutdown(run: RunFiles) -> str | None:
    """Send ``guest-shutdown`` (power down); None once the agent took it, else why not."""
    try:
        with held_agent(run, LOCK_TIMEOUT, SYNC_TIMEOUT) as client:
            if client is None:
                return f"the guest agent was busy with another qvm command for {LOCK_TIMEOUT:g} s"
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
    return None
