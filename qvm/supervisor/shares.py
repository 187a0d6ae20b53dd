"""The VM's shares and their virtiofsd daemons, owned by its supervisor.

- Before each QEMU start (``start_boot_shares``: in ``qvm.supervisor.spawn`` for the first,
  in the supervisor for a restart) a virtiofsd per virtiofs [[share]] of ``launch.json``,
  listening before QEMU connects; ``shares.json`` records each with its daemon's pid.
- While QEMU runs, ``ShareKeeper`` answers the relay's two qvm commands,
  ``qvm-share-start`` and ``qvm-share-stop`` (``qvm share add``/``del``: the daemon of a
  live share is the supervisor's child like the others), and mounts the boot shares in
  the guest through its agent once the agent answers (``mount_boot_shares``, in a thread).
- When QEMU has ended, ``stop_all`` ends every daemon (each also ends by itself when QEMU
  closes its socket) and removes the record.

The supervisor is the only writer of ``shares.json``: the CLI asks it.
"""

from __future__ import annotations

import base64
import contextlib
import os
import socket
import time
from collections.abc import Callable
from typing import Any

from qvm.cmdline.share_mount import mount_argv, mount_failure
from qvm.errors import AgentError
from qvm.host.virtiofsd import VirtiofsdError, start_virtiofsd, stop_daemon
from qvm.layout.runfiles import AGENT_LOCK, AGENT_SOCKET, SHARES_FILE, RunFiles
from qvm.store.fields import Fields
from qvm.store.launch import LaunchRecord
from qvm.store.shares import MOUNT_STATES, ShareRecord, read_shares, write_shares
from qvm.supervisor.agent_wire import AgentClient, take_agent_lock
from qvm.supervisor.wire import SHARE_MOUNTED, SHARE_START, SHARE_STOP

AGENT_POLL = 1.0  # seconds between tries of an agent that does not answer yet
AGENT_TRY = 3.0  # how long one try waits for the agent's answer
AGENT_PATIENCE = 900.0  # a guest whose agent never answers is not asked forever
MOUNT_TIMEOUT = 30.0
ShareStartError = VirtiofsdError  # what start_boot_shares raises: its text says why


def start_boot_shares(run_path: str, launch: LaunchRecord) -> tuple[ShareRecord, ...]:
    """A virtiofsd for each virtiofs share of ``launch``, recorded in shares.json (with the
    9p ones, which QEMU serves itself). VirtiofsdError if one cannot start: those
    started are stopped again."""
    started: list[ShareRecord] = []
    try:
        for share in launch.shares:
            started.append(_with_daemon(share) if share.via == "virtiofs" else share)
    except VirtiofsdError:
        stop_daemons(started)
        raise
    shares = tuple(started)
    write_shares(os.path.join(run_path, SHARES_FILE), shares)
    return shares


def _with_daemon(share: ShareRecord) -> ShareRecord:
    assert share.socket is not None  # a virtiofs share has one (qvm.ops.up)
    pid, start_time = start_virtiofsd(share.socket, share.host, share.readonly)
    return share._replace(pid=pid, start_time=start_time)


def stop_daemons(shares: list[ShareRecord] | tuple[ShareRecord, ...]) -> None:
    for share in shares:
        if share.pid is not None:
            stop_daemon(share.pid, share.start_time)
        if share.socket is not None:
            with contextlib.suppress(OSError):
                os.unlink(share.socket)


class ShareKeeper:
    """The supervisor's shares of the current QEMU run (see the module's docstring)."""

    def __init__(self, run: RunFiles) -> None:
        self.path = run.file(SHARES_FILE)
        self.run = run

    def shares(self) -> tuple[ShareRecord, ...]:
        try:
            return read_shares(self.path)
        except Exception:  # noqa: BLE001 - a record we cannot read holds no daemon we know
            return ()

    def _save(self, shares: tuple[ShareRecord, ...]) -> None:
        write_shares(self.path, shares)

    def _update(self, share_id: str, **changes: Any) -> None:
        shares = self.shares()
        if any(s.id == share_id for s in shares):  # not after stop_all: no record then
            self._save(tuple(s._replace(**changes) if s.id == share_id else s for s in shares))

    def stop_all(self) -> None:
        """QEMU has ended: so do the daemons; the record goes with them."""
        stop_daemons(self.shares())
        with contextlib.suppress(OSError):
            os.unlink(self.path)

    # --- the relay's commands (qvm share add/del) ------------------------------------------

    def command(self, name: str, arguments: dict[str, Any]) -> dict[str, Any]:
        """Run one of ``qvm.supervisor.wire.LOCAL_COMMANDS``; ValueError (its text: why)
        refuses it."""
        if name == SHARE_START:
            share = ShareRecord.read(_fields(arguments))
            if any(s.id == share.id for s in self.shares()):
                raise ValueError(f"share {share.id} exists already")
            try:
                share = _with_daemon(share)
            except VirtiofsdError as error:
                raise ValueError(str(error)) from None
            self._save((*self.shares(), share))
            return {"pid": share.pid}
        share_id = str(arguments.get("id"))
        if name == SHARE_STOP:
            found = [s for s in self.shares() if s.id == share_id]
            stop_daemons(found)
            self._save(tuple(s for s in self.shares() if s.id != share_id))
            return {"stopped": bool(found)}
        if name == SHARE_MOUNTED:
            f = _fields(arguments)
            mount = f.one_of("mount", MOUNT_STATES)
            self._update(share_id, mount=mount, mount_error=f.str("mount_error", None))
            return {}
        raise ValueError(f"not a command of the supervisor's: {name}")

    # --- the guest's mounts ---------------------------------------------------------------

    def mount_again(self, qemu_exited: Callable[[], bool]) -> None:
        """The guest was reset (a reboot inside it): its mounts went with its memory, so
        every share it had mounted, or failed to, waits for the new boot's agent."""
        for share in self.shares():
            if share.mount in ("mounted", "failed"):
                self._update(share.id, mount="waiting", mount_error=None)
        self.mount_boot_shares(qemu_exited)

    def mount_boot_shares(self, qemu_exited: Callable[[], bool]) -> None:
        """Once the guest agent answers, mount each boot share at its guest path and
        record how that went. Blocking: the supervisor runs it in a thread, until done or
        ``qemu_exited()``."""
        waiting = [s for s in self.shares() if s.mount == "waiting"]
        if not waiting:
            return
        deadline = time.monotonic() + AGENT_PATIENCE
        while not qemu_exited() and time.monotonic() < deadline:
            try:
                with self._agent() as client:
                    if client is None:
                        time.sleep(AGENT_POLL)
                        continue
                    for share in waiting:
                        self._mount(client, share)
                    return
            except (AgentError, OSError):
                time.sleep(AGENT_POLL)

    @contextlib.contextmanager
    def _agent(self) -> Any:
        lock = take_agent_lock(self.run.file(AGENT_LOCK), AGENT_TRY)
        if lock is None:  # a qvm command is talking to it: the agent is up, try again soon
            yield None
            return
        try:
            with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC) as sock:
                sock.settimeout(AGENT_TRY)
                sock.connect(self.run.file(AGENT_SOCKET))
                client = AgentClient(sock, os.path.basename(self.run.path))
                client.sync(AGENT_TRY)
                yield client
        finally:
            os.close(lock)

    def _mount(self, client: AgentClient, share: ShareRecord) -> None:
        argv = mount_argv(share.id, share.guest, share.via, share.readonly)
        problem = guest_run(client, argv, MOUNT_TIMEOUT)
        if problem is None:
            self._update(share.id, mount="mounted", mount_error=None)
        else:
            self._update(share.id, mount="failed", mount_error=mount_failure(share.via, problem))


def guest_run(client: AgentClient, argv: list[str], timeout: float) -> str | None:
    """Run ``argv`` in the guest to its end; None if it succeeded, else what went wrong
    (its exit status and stderr)."""
    reply = client.execute("guest-exec", {"path": argv[0], "arg": argv[1:], "capture-output": True})
    pid = reply["pid"]
    deadline = time.monotonic() + timeout
    delay = 0.01
    while time.monotonic() < deadline:
        time.sleep(delay)
        delay = min(delay * 2, 0.5)
        status = client.execute("guest-exec-status", {"pid": pid})
        if not status.get("exited"):
            continue
        if status.get("exitcode") == 0:
            return None
        err = base64.b64decode(status.get("err-data") or "").decode(errors="replace")
        said = " ".join(err.split()) or "no message"
        return f"exit status {status.get('exitcode', status.get('signal'))}: {said}"
    return f"still running after {timeout:g} s"


def _fields(arguments: dict[str, Any]) -> Fields:
    return Fields(arguments, SHARE_START, None)
