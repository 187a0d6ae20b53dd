"""A member VM's supervisor keeps its NICs on their private networks.

Each network's ``vde_switch`` is supervised by its members' supervisors, not by a daemon
of its own: each one looks at the switch every ``TICK`` while its QEMU runs. A member
that finds it dead takes the network's lock, starts it again unless another member just
did (``qvm.host.vde.ensure_switch``), and rejoins its own NICs: it replaces each NIC's
uplink (the vde plug and its hub port, ``qvm.cmdline.argv.uplink_args``) over QMP, so the
NIC the guest sees never changes. A NIC that cannot rejoin is ``down`` with the reason in
``network-state.json``, which ``status`` and ``net list`` show.

The guest is set up through its agent, once it answers and again whenever the network's
members change (``qvm.store.guestnet``). What it was given lives in its memory: after a
reset (QEMU's ``RESET``: a reboot inside the guest, or ``system_reset``) it is gone, and
when the agent's port closes or opens (``VSERPORT_CHANGE``: a reboot QEMU does not see,
such as kexec, a new agent, or a snapshot loaded in place, after which QEMU 7.2 reports
the port closed and opened again) it is not known, so the guest counts as not set up and is
set up again once its agent answers (``guest_changed``).

When the supervisor ends, it leaves: under the lock, the last member to leave stops the
switch. ``qvm up`` takes the same lock from before the switch is started until the new
supervisor holds its run dir's lock, so a leaving member never stops a switch a starting
one is about to use.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import os
import socket
import time
from collections.abc import Awaitable, Callable
from typing import Any

from qvm.errors import AgentError, QvmError, RecordError
from qvm.host.vde import ensure_switch, stop_switch, switch_problem
from qvm.layout.netfiles import NetFiles
from qvm.layout.runfiles import (
    AGENT_LOCK,
    AGENT_PORT_ID,
    AGENT_SOCKET,
    NETWORK_STATE_FILE,
    NETWORKS_FILE,
    RunFiles,
)
from qvm.store.guestnet import setup_script
from qvm.store.netlinks import (
    LinkState,
    NetNic,
    NetworkState,
    read_netnics,
    write_network_state,
)
from qvm.store.networks import (
    SwitchRecord,
    network_lock,
    others_running,
    read_network,
    read_switch,
    write_switch,
)
from qvm.store.state import QemuRun
from qvm.supervisor.agent_wire import AgentClient, take_agent_lock
from qvm.supervisor.spawn import log_line

TICK = 0.5  # seconds between looks at the switches and the members
AGENT_RETRY = 2.0  # seconds between attempts to set the guest up while its agent is silent
EXEC_TIMEOUT = 20.0  # for the setup script in the guest
QmpCall = Callable[[str, dict[str, Any] | None], Awaitable[Any]]


class NetworkMember:
    def __init__(self, run: RunFiles, vm: str) -> None:
        self.run = run
        self.vm = vm
        self.state_root = os.path.dirname(run.path.rstrip("/"))
        self.applied: str | None = None  # the script the guest last ran without error
        # counts the guest's resets: a setup that was under way across one does not count
        self.guest_epoch = 0
        self.next_agent_try = 0.0
        self.state: NetworkState | None = None
        # by network: the switch (pid, start time) this VM's NICs are plugged into
        self.joined: dict[str, tuple[int, int | None]] = {}

    def nics(self) -> tuple[NetNic, ...]:
        try:
            return read_netnics(self.run.file(NETWORKS_FILE))
        except RecordError as error:
            log_line(f"qvm supervisor: {error}")
            return ()

    def networks(self) -> list[NetFiles]:
        return [NetFiles(self.state_root, n) for n in sorted({nic.network for nic in self.nics()})]

    # --- before a QEMU starts, after the last one ended ----------------------------------

    def before_spawn(self) -> None:
        """A restart by the policy: the switches must run before QEMU joins them."""
        for net in self.networks():
            try:
                with network_lock(net):
                    ensure_switch(net)
            except QvmError as error:
                log_line(f"qvm supervisor: {error}")

    def leave(self) -> None:
        """The supervisor ends: the last member stops its network's switch."""
        for net in self.networks():
            try:
                with network_lock(net):
                    if not others_running(net, self.state_root, self.vm):
                        stop_switch(net)
            except QvmError as error:
                log_line(f"qvm supervisor: leaving network {net.name}: {error}")

    # --- while QEMU runs ----------------------------------------------------------------------

    async def follow(self, qmp: QmpCall, current: QemuRun, agent: bool) -> None:
        """Keep the links up and the guest set up until cancelled (QEMU ended)."""
        nics = self.nics()
        self.joined = {}  # a new QEMU joined the switches that run now
        self.applied = None
        self.state = NetworkState(
            current, tuple(LinkState(n.nic, n.network, "joined") for n in nics)
        )
        self._save()
        while True:
            try:
                await self._look(qmp, agent)
            except asyncio.CancelledError:
                raise
            except Exception as error:  # noqa: BLE001 - keep watching; the log says why
                log_line(f"qvm supervisor: networks: {error}")
            await asyncio.sleep(TICK)

    async def _look(self, qmp: QmpCall, agent: bool) -> None:
        nics = self.nics()
        assert self.state is not None
        links = {link.nic: link for link in self.state.links}
        for nic in nics:  # a NIC added at run time
            links.setdefault(nic.nic, LinkState(nic.nic, nic.network, "joined"))
        changed = len(links) != len(self.state.links)
        for name in sorted({n.network for n in nics}):
            net = NetFiles(self.state_root, name)
            switch = read_switch(net)
            now = (switch.pid, switch.start_time) if switch else None
            if switch_problem(net, switch) is not None:
                now = None
            if now is not None and self.joined.setdefault(name, now) == now:
                continue  # the switch this VM's NICs are plugged into runs
            # dead, or started again by another member: plug into the one that runs
            on_it = [n for n in nics if n.network == name]
            for link in await self._rejoin(net, on_it, qmp, restart=now is None):
                links[link.nic] = link
            changed = True
        if changed:
            self.state = self.state._replace(links=tuple(links.values()))
            self._save()
        if agent and nics and time.monotonic() >= self.next_agent_try:
            await self._set_up_guest(nics)

    async def _rejoin(
        self, net: NetFiles, nics: list[NetNic], qmp: QmpCall, restart: bool
    ) -> list[LinkState]:
        assert self.state is not None
        log_line(f"qvm supervisor: network {net.name}: its switch changed; rejoining")
        try:
            switch = await asyncio.to_thread(self._restart_switch, net, restart)
        except Exception as error:  # noqa: BLE001 - whatever it is, the links say it
            return [self._link(n, "down", str(error)) for n in nics]
        links = []
        for nic in nics:
            vde, port = f"qvm.{nic.nic}.vde", f"qvm.{nic.nic}.up"
            try:
                for dev in (port, vde):
                    with contextlib.suppress(Exception):  # gone already: fine
                        await qmp("netdev_del", {"id": dev})
                await qmp("netdev_add", {"type": "vde", "id": vde, "sock": net.switch_dir})
                await qmp(
                    "netdev_add", {"type": "hubport", "id": port, "hubid": nic.hub, "netdev": vde}
                )
            except Exception as error:  # noqa: BLE001 - QEMU's refusal is the reason shown
                links.append(self._link(nic, "down", f"rejoining: {error}"))
                continue
            links.append(self._link(nic, "rejoined"))
        if all(link.state == "rejoined" for link in links):
            self.joined[net.name] = (switch.pid, switch.start_time)
        return links

    def _restart_switch(self, net: NetFiles, restart: bool) -> SwitchRecord:
        """The switch that runs now, started again if it is dead (and not already)."""
        with network_lock(net):
            record = read_switch(net)
            dead = record is not None and switch_problem(net, record) is not None
            if record is not None and dead and (record.died_at or 0) < record.started_at:
                write_switch(net, record._replace(died_at=time.time()))
            return ensure_switch(net, restart=restart or dead)[0]

    def _link(self, nic: NetNic, state: str, error: str | None = None) -> LinkState:
        assert self.state is not None
        old = self.state.link(nic.nic)
        rejoins = (old.rejoins if old else 0) + (1 if state == "rejoined" else 0)
        return LinkState(nic.nic, nic.network, state, rejoins, error)

    def guest_changed(self, event: str | None, data: dict[str, Any]) -> bool:
        """A QMP event that may have taken the guest's setup away (see the module's
        docstring): then it counts as not set up, and is set up again as soon as its agent
        answers. Whether it was one."""
        if event == "RESET":
            why = "the guest was reset; waiting for its agent to set it up again"
        elif event == "VSERPORT_CHANGE" and data.get("id") == AGENT_PORT_ID:
            state = "opened" if data.get("open") else "closed"
            why = f"the guest agent {state} its port; setting the guest up again"
        else:
            return False
        self.guest_epoch += 1
        self.applied = None
        self.next_agent_try = 0.0
        if self.state is not None:
            self.state = self.state._replace(guest_configured=False, guest_error=why)
            self._save()
        return True

    def _save(self) -> None:
        assert self.state is not None
        try:
            write_network_state(self.run.file(NETWORK_STATE_FILE), self.state)
        except OSError as error:
            log_line(f"qvm supervisor: {NETWORK_STATE_FILE}: {error}")

    async def _set_up_guest(self, nics: tuple[NetNic, ...]) -> None:
        assert self.state is not None
        hosts: dict[str, str] = {}
        for net in sorted({n.network for n in nics}):
            record = read_network(NetFiles(self.state_root, net))
            for address, name in record.hosts_lines() if record else []:
                hosts.setdefault(name, address)
        script = setup_script(nics, [(a, n) for n, a in sorted(hosts.items())])
        if script == self.applied:
            return
        epoch = self.guest_epoch
        error = await asyncio.to_thread(self._run_in_guest, script)
        if epoch != self.guest_epoch:
            return  # the guest was reset meanwhile: what it ran is gone; next look, again
        if error is None:
            self.applied = script
            self.state = self.state._replace(
                guest_configured=True, guest_error=None, guest_at=time.time()
            )
        else:
            self.next_agent_try = time.monotonic() + AGENT_RETRY
            self.state = self.state._replace(guest_configured=False, guest_error=error)
        self._save()

    def _run_in_guest(self, script: str) -> str | None:
        """Run the setup script through the agent; None once it succeeded, else why not."""
        try:
            lock = take_agent_lock(self.run.file(AGENT_LOCK), 0.5)
        except OSError as error:
            return f"agent.lock: {error.strerror or error}"
        if lock is None:
            return "the guest agent was busy with another qvm command"
        try:
            with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC) as sock:
                sock.settimeout(3.0)
                sock.connect(self.run.file(AGENT_SOCKET))
                client = AgentClient(sock, self.vm)
                client.sync(3.0)
                started = client.execute(
                    "guest-exec",
                    {"path": "/bin/sh", "arg": ["-c", script], "capture-output": True},
                )
                return _wait_exec(client, started["pid"])
        except (AgentError, OSError, KeyError, TypeError) as error:
            return f"the guest agent: {error}"
        finally:
            os.close(lock)


def _wait_exec(client: AgentClient, pid: int) -> str | None:
    deadline = time.monotonic() + EXEC_TIMEOUT
    while time.monotonic() < deadline:
        status = client.execute("guest-exec-status", {"pid": pid})
        if status.get("exited"):
            if status.get("exitcode") == 0:
                return None
            err = base64.b64decode(status.get("err-data") or "").decode(errors="replace")
            return f"the setup script failed ({status.get('exitcode')}): {' '.join(err.split())}"
        time.sleep(0.05)
    return f"the setup script did not end within {EXEC_TIMEOUT:g} s"
