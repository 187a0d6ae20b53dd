"""`qvm down`'s step between the ACPI power button and QMP ``quit``: ask the guest agent
to power the guest off (``guest-shutdown``), for a guest that ignores the button.

The supervisor sits below ``qvm.control``, whose ``AgentClient`` every qvm command uses,
so this is the one exchange it needs, in the same protocol and under the same
``agent.lock`` (the agent answers one client at a time): a 0xFF byte and
``guest-sync-delimited`` with a random id, whose reply comes after a 0xFF byte; then
``guest-shutdown``, which has no reply on success (the guest goes down). Blocking socket
code: the supervisor runs it in a thread. Stdlib only.
"""

from __future__ import annotations

import json
import os
import random
import socket
import time

from qvm.layout.locks import try_lock
from qvm.layout.runfiles import AGENT_LOCK, AGENT_SOCKET, RunFiles
from qvm.store.launch import LaunchRecord

AGENT_PORT_NAME = "org.qemu.guest_agent.0"  # as in qvm.cmdline.argv
SENTINEL = b"\xff"
SYNC_TIMEOUT = 3.0  # for the agent to answer guest-sync-delimited
LOCK_TIMEOUT = 3.0  # another qvm command may be talking to the agent
ERROR_WAIT = 0.5  # guest-shutdown answers only when it fails: listen this long for that


def agent_configured(launch: LaunchRecord) -> bool:
    return any(f"name={AGENT_PORT_NAME}" in arg for arg in launch.argv)


def agent_shutdown(run: RunFiles) -> str | None:
    """Send ``guest-shutdown`` (power down); None once the agent took it, else why not."""
    deadline = time.monotonic() + LOCK_TIMEOUT
    while (lock := _try_lock(run)) is None:
        if time.monotonic() > deadline:
            return f"the guest agent was busy with another qvm command for {LOCK_TIMEOUT:g} s"
        time.sleep(0.05)
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC) as sock:
            sock.settimeout(SYNC_TIMEOUT)
            sock.connect(run.file(AGENT_SOCKET))
            if not _sync(sock, time.monotonic() + SYNC_TIMEOUT):
                return f"the guest agent did not answer within {SYNC_TIMEOUT:g} s"
            message = {"execute": "guest-shutdown", "arguments": {"mode": "powerdown"}}
            sock.sendall(json.dumps(message).encode() + b"\n")
            return _error_reply(sock)
    except OSError as error:
        return f"the guest agent's channel: {error.strerror or error}"
    finally:
        if lock >= 0:
            os.close(lock)


def _try_lock(run: RunFiles) -> int | None:
    try:
        return try_lock(run.file(AGENT_LOCK))
    except OSError:
        return -1  # no lock file can be made: go on without one, QEMU is what matters


def _sync(sock: socket.socket, deadline: float) -> bool:
    """Resynchronise the channel: True once the agent echoed our id after a 0xFF byte."""
    sync_id = random.randrange(1, 2**31)
    request = {"execute": "guest-sync-delimited", "arguments": {"id": sync_id}}
    sock.sendall(SENTINEL + json.dumps(request).encode() + b"\n")
    buffer = b""
    while True:
        start = buffer.find(SENTINEL)
        end = buffer.find(b"\n", start + 1) if start >= 0 else -1
        if end >= 0:
            line, buffer = buffer[start + 1 : end], buffer[end + 1 :]
            try:
                reply = json.loads(line)
            except ValueError:
                continue
            if isinstance(reply, dict) and reply.get("return") == sync_id:
                return True
            continue
        if start < 0:
            buffer = b""  # nothing before a 0xFF byte is ours
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            return False
        sock.settimeout(remaining)
        try:
            chunk = sock.recv(4096)
        except TimeoutError:
            return False
        if not chunk:
            return False
        buffer += chunk


def _error_reply(sock: socket.socket) -> str | None:
    """The agent's error reply to guest-shutdown, if one comes at once; else None."""
    sock.settimeout(ERROR_WAIT)
    try:
        data = sock.recv(4096)
    except (TimeoutError, OSError):
        return None
    for line in data.splitlines():
        try:
            reply = json.loads(line.lstrip(SENTINEL))
        except ValueError:
            continue
        if isinstance(reply, dict) and isinstance(reply.get("error"), dict):
            return f"guest-shutdown: {reply['error'].get('desc', 'failed')}"
    return None
