"""The per-VM supervisor: a small process that outlives the CLI and owns one QEMU.

Its process is forked by ``qvm up`` into a session of its own and inherits the
already-taken ``supervisor.lock`` (so exactly one supervisor per VM can exist).
``qvm.supervisor.spawn`` spawns QEMU as its child before anything else; this module then keeps a
QMP connection on the events monitor, records how QEMU ended in ``state.json``, applies
the restart policy and cleans up. Clients talk to it over ``supervisor.sock``: one JSON
request line, one JSON reply line (``qvm.supervisor.wire``); or, after an
``{"op": "control"}`` line, qvm's own QMP commands and events (``qvm.supervisor.relay``).
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import os
import signal
import subprocess
import time
from typing import TYPE_CHECKING, Any

from qemu.qmp import QMPClient, Runstate

from qvm.base.jsonfile import RecordWriteError
from qvm.base.proc import process_start_time
from qvm.errors import RecordError
from qvm.layout.runfiles import (
    EVENTS_SOCKET,
    LAUNCH_FILE,
    NETWORKS_FILE,
    QEMU_LOG,
    SPACE_RESERVE_FILE,
    STATE_FILE,
    SUPERVISOR_SOCKET,
    RunFiles,
)
from qvm.store.launch import LaunchRecord, write_launch
from qvm.store.state import (
    ExitRecord,
    QemuRun,
    StateRecord,
    forget_kept,
    keep_elsewhere,
    write_state,
)
from qvm.supervisor.exits import ExitFacts, classify_exit
from qvm.supervisor.facts import (
    QMP_CALL_TIMEOUT,
    describe_qmp_failure,
    process_facts,
    qemu_log_tail,
)
from qvm.supervisor.foreground import (
    STOP_SIGNALS,
    announce_end,
    release_stop_signals,
    sd_notify,
)
from qvm.supervisor.qmp_replies import memory_summary, runstate
from qvm.supervisor.spawn import (
    AdoptedQemu,
    forwards_recorder,
    initial_state,
    log_line,
    spawn_qemu,
)
from qvm.supervisor.wire import (
    EXPIRED,
    LOCAL_COMMANDS,
    MAX_LINE,
    Accepted,
    ControlRequest,
    EndReply,
    ErrorReply,
    KillRequest,
    StatusReply,
    StatusRequest,
    StopRequest,
    decode_request,
    encode,
    expired,
)

if TYPE_CHECKING:
    from qvm.layout.rundir import RunDir
    from qvm.supervisor.agent_proxy import AgentProxy
    from qvm.supervisor.network import NetworkMember
    from qvm.supervisor.shares import ShareKeeper
    from qvm.supervisor.view import ViewKeeper

QMP_CONNECT_TIMEOUT = 60.0
NETWORK_LOOK = 1.0  # seconds between looks for networks.json on a VM without one

POWER_BUTTON_REPEAT = 5.0  # seconds between presses during `qvm down`
# after the power button: the guest agent's guest-shutdown, and this long for the guest
# to power off (the exchange itself takes up to 3 s + 3 s, qvm.supervisor.agent_shutdown)
AGENT_SHUTDOWN_WAIT = 10.0
AGENT_EXCHANGE = 6.0
QUIT_WAIT = 5.0
# after QEMU exited, how long its last events may take to be read (``_take_last_events``)
LAST_EVENTS_WAIT = 0.5
KILL_WAIT = 5.0
MAX_RESTART_DELAY = 60.0
# a run that lasted this long resets the consecutive-restart counter
HEALTHY_RUN_SECONDS = 60.0
# Space set aside at start (a file of this size in the run dir) and given back when the
# state dir is full, so that the record of how the run ended still gets written: without
# it the next command would read "running" from a supervisor that is gone, and say it
# died unexpectedly. Each atomic rewrite of state.json needs one page or block for its
# temporary file, and frees the old file's when it replaces it.
SPACE_RESERVE_BYTES = 64 * 1024


class Supervisor:
    def __init__(
        self,
        run: RunFiles,
        launch: LaunchRecord,
        ready_fd: int | None,
        stop_budget: float | None = None,
    ) -> None:
        self.run = run
        self.launch = launch
        self.ready_fd = ready_fd
        # `qvm up --foreground`: all the seconds a SIGTERM's stop may take, every step
        # of it, before the service manager's own SIGKILL comes (qvm.supervisor.foreground)
        self.stop_budget = stop_budget
        self.state: StateRecord = initial_state(launch)
        self.qemu: subprocess.Popen[bytes] | AdoptedQemu | None = None
        self.run_started = 0.0
        # set by `stop`/`kill` requests: an exit we asked for is never a failure
        self.intent: str | None = None
        # `qvm down` asked the guest agent to power off (the guest ignored the button)
        self.agent_shutdown_sent = False
        self.shutdown_event: dict[str, Any] | None = None
        self.crash_reason: str | None = None
        self.vcpu_unplugged = False  # a vCPU left this QEMU run (qvm.supervisor.exits)
        self.power_button = False  # the ACPI power button was pressed in this run
        self.kept_in: str | None = None  # the file the record is kept in, state.json failing
        self.runstate = "unknown"
        self.qmp: Any = None
        self.qmp_ready = False
        self.agent_proxy: AgentProxy | None = None  # while QEMU runs, with [agent] enabled
        self.view: ViewKeeper | None = None  # view.json, while QMP answers
        self.consecutive_restarts = 0
        self.restart_next = False
        self._shares: ShareKeeper | None = None
        # with NICs on private networks (from the start, or since a `nic add --network`)
        self.network: NetworkMember | None = None
        self.network_task: asyncio.Task[None] | None = None
        self._become_member()

    # --- files -------------------------------------------------------------------------

    def run_dir(self) -> RunDir:
        """The run dir as the records of unplugs take it; imports pathlib, which the
        supervisor otherwise does without (``qvm.layout.runfiles``), only then."""
        from pathlib import Path  # noqa: PLC0415 -- 0.67 MiB of RSS, only on an unplug

        from qvm.layout.rundir import RunDir  # noqa: PLC0415 -- imports pathlib

        return RunDir(Path(self.run.path))

    def save_state(self, **changes: Any) -> None:
        """Record a change. The state lives in memory first: a state dir that is full or
        failing costs the file, never the supervisor (status answers from memory); the
        next change writes the whole record again. What state.json does not take (after
        a second try) is kept elsewhere (``qvm.store.state.keep_elsewhere``), so that the
        last record, how QEMU ended, outlives the supervisor."""
        self.state = self.state._replace(**changes)
        error = self._write_state()
        if error is None:
            if self.kept_in is not None:
                forget_kept(self.kept_in)
                self.kept_in = None
            return
        self.kept_in = keep_elsewhere(self.run.path, self.state)
        where = f"kept in {self.kept_in}" if self.kept_in else "kept nowhere else either"
        log_line(f"qvm supervisor: {error}; the record is {where}")

    def _write_state(self) -> RecordWriteError | None:
        """Write state.json, once more after a failure (EIO can be passing; for ENOSPC,
        with the space set aside given back); the error if both failed."""
        try:
            write_state(self.run.file(STATE_FILE), self.state)
            return None
        except RecordWriteError as error:
            if error.errno in (errno.ENOSPC, errno.EDQUOT):
                self.release_space_reserve()
            log_line(f"qvm supervisor: {error}; trying again")
        try:
            write_state(self.run.file(STATE_FILE), self.state)
            return None
        except RecordWriteError as again:
            return again

    def make_space_reserve(self) -> None:
        """Set SPACE_RESERVE_BYTES aside (see there); without room, do without."""
        path = self.run.file(SPACE_RESERVE_FILE)
        try:
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW, 0o600)
        except OSError:
            return
        try:
            os.posix_fallocate(fd, 0, SPACE_RESERVE_BYTES)
        except OSError:
            with contextlib.suppress(OSError):
                os.unlink(path)
        finally:
            os.close(fd)

    def release_space_reserve(self) -> bool:
        """Give the reserved space back; False if there was none."""
        try:
            os.unlink(self.run.file(SPACE_RESERVE_FILE))
        except OSError:
            return False
        log_line("qvm supervisor: state dir full: used the space set aside for state.json")
        return True

    def notify(self, line: str) -> None:
        """Tell the `qvm up` that started us how far we got; it may have gone away."""
        if self.ready_fd is None:
            return
        try:
            os.write(self.ready_fd, (line + "\n").encode())
        except OSError:
            self.ready_fd = None

    def notify_ready(self) -> None:
        self.notify(f"ready {self.qemu.pid if self.qemu else 0}")
        self.close_notify()

    def close_notify(self) -> None:
        if self.ready_fd is not None:
            os.close(self.ready_fd)
            self.ready_fd = None

    # --- QEMU process ------------------------------------------------------------------

    def spawn_qemu(self) -> None:
        """Start (or restart) QEMU and record it."""
        self.adopt_qemu(spawn_qemu(self.launch.argv, self.run.path))

    def adopt_qemu(self, qemu: subprocess.Popen[bytes] | AdoptedQemu) -> None:
        """Take charge of a QEMU just spawned (the first one is spawned before we exist)."""
        self.qemu = qemu
        self.run_started = time.time()
        self.intent = None
        self.shutdown_event = None
        self.crash_reason = None
        self.vcpu_unplugged = False
        self.power_button = False
        self.agent_shutdown_sent = False
        self.runstate = "unknown"
        self.qmp_ready = False
        self.save_state(
            state="starting" if self.state.restarts == 0 else "restarting",
            qemu_pid=self.qemu.pid,
            qemu_start_time=process_start_time(self.qemu.pid),
            started_at=self.run_started,
        )

    def qemu_alive(self) -> bool:
        return self.qemu is not None and self.qemu.poll() is None

    # --- main loop ---------------------------------------------------------------------

    async def main(self) -> int:
        loop = asyncio.get_running_loop()
        for signum in STOP_SIGNALS:
            loop.add_signal_handler(signum, self._on_stop_signal)
        release_stop_signals()  # held since QEMU was spawned, in the foreground
        self.qmp_connected = asyncio.Event()
        # before any request can come in: `stop` and `kill` wait on it
        self._watch_exit()
        server = await asyncio.start_unix_server(
            self._serve_client, path=self.run.file(SUPERVISOR_SOCKET), limit=MAX_LINE
        )
        self.make_space_reserve()
        first = True
        try:
            while True:
                started_ok = await self._run_qemu_once(first)
                if first and not started_ok:
                    return 1
                first = False
                if not await self._restart_after_backoff():
                    return 0
                self._watch_exit()
        finally:
            server.close()
            self.run.remove_qemu_sockets()
            self.run.remove(SUPERVISOR_SOCKET)
            self.run.remove(SPACE_RESERVE_FILE)
            self.close_notify()
            if self.network is not None:
                self.network.leave()

    def _watch_exit(self) -> None:
        """``self.exited`` resolves once the current QEMU has exited: a pidfd is readable
        then, so there is no SIGCHLD handling and no polling."""
        assert self.qemu is not None
        loop = asyncio.get_running_loop()
        exited = loop.create_future()
        self.exited = exited
        self.pidfd: int | None = None
        if self.qemu.poll() is None:
            self.pidfd = os.pidfd_open(self.qemu.pid)

            def resolve() -> None:
                if not exited.done():
                    exited.set_result(None)

            loop.add_reader(self.pidfd, resolve)
        else:
            exited.set_result(None)  # it died while we probed for QMP

    async def _run_qemu_once(self, first: bool) -> bool:
        """Run one QEMU to its end; False if it died before QMP answered."""
        assert self.qemu is not None
        watcher = asyncio.create_task(self._watch_qmp(self.exited))
        try:
            await self.exited
            returncode = self.qemu.wait()
        finally:
            if self.pidfd is not None:
                asyncio.get_running_loop().remove_reader(self.pidfd)
                os.close(self.pidfd)
                self.pidfd = None
        ready = self.qmp_ready
        if self.qmp is not None:
            await self._take_last_events(self.qmp)
            watcher.cancel()  # it follows events, which never end by themselves
        # else it is still connecting and returns once it sees QEMU has exited: cancelling
        # qemu.qmp's connect midway was seen to leave the task stuck, and the process
        # alive, for good. Either way QEMU is gone: the exit record must not wait long.
        _, pending = await asyncio.wait({watcher}, timeout=QMP_CALL_TIMEOUT)
        for task in pending:
            task.cancel()
        await self._close_view()
        if self.network_task is not None:
            self.network_task.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await self.network_task
            self.network_task = None
        await self._detach_agent()
        await self._disconnect_qmp()
        if self._shares is not None or self.launch.shares:
            await asyncio.to_thread(self.share_keeper().stop_all)
        self._record_exit(returncode, reached_qmp=bool(ready), first=first)
        if first and not ready:
            self.notify("failed")
            return False
        return True

    async def _take_last_events(self, client: QMPClient) -> None:
        """QEMU has exited, but what it sent just before may still be unread: QEMU 7.2
        under TCG sends SHUTDOWN for the guest's power-off and then aborts, within
        milliseconds. Wait, briefly, until the connection has read to its end and every
        event has been handled, or the guest's power-off would read as a crash."""
        deadline = time.monotonic() + LAST_EVENTS_WAIT
        while client.runstate == Runstate.RUNNING or not client.events.empty():
            if time.monotonic() > deadline:
                log_line("qvm supervisor: QEMU's last events were not read in time")
                break
            await asyncio.sleep(0.002)
        await asyncio.sleep(0)  # the watcher handles the event it has just taken

    async def _watch_qmp(self, exited: Any) -> bool:
        """Connect to the events monitor, announce readiness, then follow events."""
        deadline = time.monotonic() + QMP_CONNECT_TIMEOUT
        client = QMPClient(self.state.name, readbuflen=MAX_LINE)
        while True:
            if exited.done():
                return False
            try:
                await client.connect(self.run.file(EVENTS_SOCKET))
                break
            except Exception:  # noqa: BLE001 - QEMU has not created the socket yet
                if time.monotonic() > deadline:
                    self.crash_reason = "QMP did not answer within 60 s"
                    self._signal_qemu(signal.SIGKILL)
                    return False
                await asyncio.sleep(0.005)
        self.qmp = client
        self.qmp_ready = True
        self.qmp_connected.set()
        await self._attach_agent()
        if self.launch.shares and self.agent_proxy is not None:
            # the guest mounts them once its agent answers, which takes its boot; the
            # thread asks the future, never QEMU's pid: only this loop may reap QEMU
            self.mount_task = asyncio.create_task(
                asyncio.to_thread(self.share_keeper().mount_boot_shares, exited.done)
            )
        try:
            status = await asyncio.wait_for(client.execute("query-status"), QMP_CALL_TIMEOUT)
            self.runstate = runstate(status)
        except Exception:  # noqa: BLE001 - readiness is the connection, the status is extra
            pass
        if self.state.restarts and any(f.host_port == 0 for f in self.launch.forwards):
            await self._read_back_ports()  # the first run's: qvm.supervisor.spawn.start
        # the STOP of an internal error can come before this connection exists
        self._end_after_internal_error()
        self.save_state(state=self._live_state())
        self.notify_ready()
        self._open_view(client)
        if self.qemu is not None:
            current = QemuRun(self.qemu.pid, self.state.qemu_start_time)
            self.network_task = asyncio.create_task(self._follow_networks(current))
        try:
            async for event in client.events:
                await self._on_event(dict(event))
        except Exception:  # noqa: BLE001 - the connection ends when QEMU does
            pass
        return True

    def _become_member(self) -> bool:
        """Whether the VM has NICs on networks (``networks.json``); the network module is
        imported only then."""
        if self.network is None and os.path.exists(os.path.join(self.run.path, NETWORKS_FILE)):
            from qvm.supervisor.network import NetworkMember  # noqa: PLC0415 -- see above

            self.network = NetworkMember(self.run, self.launch.name)
        return self.network is not None

    async def _follow_networks(self, current: QemuRun) -> None:
        """Keep the VM's NICs on their networks while this QEMU runs; a VM with none
        looks once a second for one a `nic add --network` brings."""
        while not self._become_member():
            await asyncio.sleep(NETWORK_LOOK)
        assert self.network is not None
        await self.network.follow(self._qmp_call, current, self.launch.has_agent)

    async def _read_back_ports(self) -> None:
        """A restarted QEMU bound new host ports for the forwards with port 0: record
        them, as ``qvm.supervisor.spawn.start`` does for the first run."""
        from qvm.host.usernet import USERNET_COMMAND  # noqa: PLC0415 -- only on restarts

        assert self.qemu is not None
        try:
            usernet = await self._qmp_call(
                "human-monitor-command", {"command-line": USERNET_COMMAND}
            )
        except Exception as error:  # noqa: BLE001 - the ports stay 0 in the records; the log says why
            log_line(f"qvm supervisor: info usernet: {error}")
            usernet = None
        record = forwards_recorder(self.run.path, self.launch, self.qemu.pid)
        record(usernet if isinstance(usernet, str) else None)

    # --- shares (qvm.supervisor.shares) ---------------------------------------------------

    def share_keeper(self) -> ShareKeeper:
        if self._shares is None:
            # only the supervisors of VMs with shares import it (RSS)
            from qvm.supervisor.shares import ShareKeeper  # noqa: PLC0415 -- see above

            self._shares = ShareKeeper(self.run)
        return self._shares

    async def _start_boot_shares(self) -> None:
        """Before a restarted QEMU: the boot shares' daemons again (the last ones ended
        with the last QEMU). One that cannot start is logged; QEMU then fails to connect
        to it and says so, and the restart policy sees a failed start."""
        if not self.launch.shares:
            return
        # as share_keeper: only the supervisors of VMs with shares import it
        from qvm.supervisor import shares  # noqa: PLC0415 -- see the comment above

        try:
            await asyncio.to_thread(shares.start_boot_shares, self.run.path, self.launch)
        except shares.ShareStartError as error:
            log_line(f"qvm supervisor: {error}")

    async def local_command(self, name: str, arguments: dict[str, Any]) -> Any:
        """A relay command the supervisor runs itself (``qvm share add``/``del``'s daemon).
        ValueError refuses it."""
        return await asyncio.to_thread(self.share_keeper().command, name, arguments)

    async def _attach_agent(self) -> None:
        if self.launch.has_agent:
            # only the supervisors of VMs with an agent hold its proxy (RSS)
            from qvm.supervisor.agent_proxy import AgentProxy  # noqa: PLC0415

            self.agent_proxy = AgentProxy(self.run)
            await self.agent_proxy.attach()

    async def _detach_agent(self) -> None:
        if self.agent_proxy is not None:
            await self.agent_proxy.detach()
            self.agent_proxy = None

    def _open_view(self, client: QMPClient) -> None:
        from qvm.supervisor.view import ViewKeeper  # noqa: PLC0415 -- after `up` is told "ready"

        assert self.qemu is not None
        self.view = ViewKeeper(
            self.run,
            self.state.name,
            client,
            self.qemu.pid,
            self.state.qemu_start_time,
            agent=self.agent_proxy is not None,
        )
        self.view.start()

    async def _close_view(self) -> None:
        if self.view is not None:
            await self.view.close()

    async def refresh_view(self, changed: bool) -> None:
        """Ask QEMU for the query record now when a relayed command ``changed`` what it
        holds, or an event did and the record has not caught up yet."""
        if self.view is not None and (changed or self.view.dirty):
            await self.view.refresh()

    async def _disconnect_qmp(self) -> None:
        if self.qmp is not None:
            # QEMU is gone, and so is the connection: nothing to report
            with contextlib.suppress(Exception):
                await asyncio.wait_for(self.qmp.disconnect(), QMP_CALL_TIMEOUT)
            self.qmp = None
            self.qmp_connected.clear()

    def _live_state(self) -> str:
        if self.intent in ("stop", "kill"):
            return "stopping"
        if self.runstate in ("paused", "suspended", "prelaunch", "inmigrate", "postmigrate"):
            return "paused"
        return "running"

    async def _on_event(self, event: dict[str, Any]) -> None:
        name = event.get("event")
        data = event.get("data") or {}
        if self.view is not None:
            self.view.on_event(name)
        if name == "SHUTDOWN":
            self.shutdown_event = data
        elif name == "POWERDOWN":
            self.power_button = True
        elif name == "GUEST_PANICKED":
            self.crash_reason = "guest panic"
        elif name in ("STOP", "RESUME"):
            self.runstate = "running" if name == "RESUME" else "paused"
            if name == "STOP":
                try:
                    status = await asyncio.wait_for(
                        self.qmp.execute("query-status"), QMP_CALL_TIMEOUT
                    )
                    self.runstate = runstate(status, "paused")
                except Exception:  # noqa: BLE001 - keep the event's word for it
                    pass
                self._end_after_internal_error()
            self.save_state(state=self._live_state())
        elif name == "DEVICE_DELETED":
            self._note_vcpu_unplug(data)
            await self._finish_pending_unplug(data)
        if self.network is not None and self.network_task is not None:
            self.network.guest_changed(name, data)  # a reboot takes the guest's addresses
        if name == "RESET" and self._shares is not None and self.agent_proxy is not None:
            self._mount_shares_again()

    def _mount_shares_again(self) -> None:
        """A reset guest has lost its mounts. A mount thread still waiting for the agent
        mounts them in the new boot already; otherwise a new one does."""
        if self.mount_task is not None and not self.mount_task.done():
            return
        keeper = self.share_keeper()
        exited = self.exited
        self.mount_task = asyncio.create_task(asyncio.to_thread(keeper.mount_again, exited.done))

    def _note_vcpu_unplug(self, data: dict[str, Any]) -> None:
        """A vCPU left, whoever asked (events reach every monitor): the TCG guard must
        know before the next vCPU device_add, which would crash QEMU 7.2 under TCG."""
        # not at the top: it imports pathlib (qvm.layout.rundir), for unplugs only
        from qvm.store.unplugged import record_cpu_unplug, unplugged_vcpu  # noqa: PLC0415

        dev_id = unplugged_vcpu(data)
        if dev_id is None or self.qemu is None:
            return
        self.vcpu_unplugged = True
        current = QemuRun(self.qemu.pid, self.state.qemu_start_time)
        try:
            record_cpu_unplug(self.run_dir(), [dev_id], current)
        except RecordWriteError as error:
            log_line(f"qvm supervisor: vCPU {dev_id} unplugged, but {error}")

    def _end_after_internal_error(self) -> None:
        """A VM stuck in internal-error never recovers: record it and end QEMU, so that
        the restart policy can act."""
        if self.runstate == "internal-error":
            self.crash_reason = "KVM internal error (see qvm logs --qemu)"
            self._signal_qemu(signal.SIGKILL)

    async def _finish_pending_unplug(self, data: dict[str, Any]) -> None:
        """An unplug that the CLI gave up waiting for has completed: drop its mark, and
        delete what the device used (memory backend, block nodes, netdev)."""
        from qvm.store.pending import complete_pending  # noqa: PLC0415 -- imports pathlib

        for dev_id, cleanup in complete_pending(self.run_dir(), data):
            for command, arguments in cleanup:
                try:
                    if command in LOCAL_COMMANDS:  # a share's daemon: ours, not QEMU's
                        await self.local_command(command, arguments)
                        continue
                    await asyncio.wait_for(self.qmp.execute(command, arguments), QMP_CALL_TIMEOUT)
                except Exception as exc:  # noqa: BLE001 - say it in the log, keep watching
                    log_line(
                        f"qvm supervisor: after DEVICE_DELETED of {dev_id}: "
                        f"{command} {arguments} failed: {exc}"
                    )

    def exit_facts(self, returncode: int, reached_qmp: bool) -> ExitFacts:
        return ExitFacts(
            returncode=returncode,
            reached_qmp=reached_qmp,
            intent=self.intent,
            shutdown_reason=(self.shutdown_event or {}).get("reason"),
            crash_reason=self.crash_reason,
            agent_shutdown_sent=self.agent_shutdown_sent,
            vcpu_unplugged=self.vcpu_unplugged,
            power_button=self.power_button,
            tcg=self.launch.accel == "tcg",
        )

    def _record_exit(self, returncode: int, reached_qmp: bool, first: bool) -> None:
        """Record how QEMU ended and what happens next, in one write: a reader never sees
        a "crashed" that is about to become "restarting", or a reason about to grow."""
        verdict = classify_exit(self.exit_facts(returncode, reached_qmp))
        failed = verdict.failed
        ran_seconds = round(time.time() - self.run_started, 3)
        self.restart_next, note = self._restart_verdict(
            failed, ran_seconds, start_failed=first and not reached_qmp
        )
        ended = ExitRecord(
            code=verdict.code,
            signal=verdict.signal,
            reason=verdict.reason + note,
            failed=failed,
            at=time.time(),
            ran_seconds=ran_seconds,
            ended_by=verdict.ended_by,
            stderr_tail=(
                tuple(qemu_log_tail(self.run.file(QEMU_LOG)))
                if failed and not reached_qmp
                else None
            ),
        )
        self.save_state(
            state="restarting" if self.restart_next else verdict.state,
            exit=ended,
            qemu_pid=None,
            crash_reason=ended.reason if failed else None,
        )
        self.run.remove_qemu_sockets()
        if self.view is not None:
            self.view.remove()
            self.view = None

    def _restart_verdict(
        self, failed: bool, ran_seconds: float, start_failed: bool
    ) -> tuple[bool, str]:
        """Whether the restart policy brings QEMU back, and a note for the reason if the
        cap stops it. A QEMU that never started, or one we were asked to end, stays down."""
        if start_failed or self.intent in ("stop", "kill"):
            return False, ""
        policy = self.launch.restart
        if policy == "no" or (policy == "on-failure" and not failed):
            return False, ""
        if ran_seconds >= HEALTHY_RUN_SECONDS:
            self.consecutive_restarts = 0
        if self.consecutive_restarts >= self.launch.max_restarts:
            return False, f"; not restarted: {self.launch.max_restarts} restarts in a row"
        if self.launch.restart_argv is not None:
            return True, "; restarted cold from the definition, not from the snapshot"
        return True, ""

    async def _restart_after_backoff(self) -> bool:
        if not self.restart_next:
            return False
        delay = min(self.launch.restart_delay * 2**self.consecutive_restarts, MAX_RESTART_DELAY)
        self.consecutive_restarts += 1
        self.save_state(next_restart_at=time.time() + delay)
        self.restart_wait = asyncio.get_running_loop().create_future()
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(asyncio.shield(self.restart_wait), delay)
        if self.intent in ("stop", "kill"):
            self.save_state(state="stopped")
            return False
        self.state = self.state._replace(restarts=self.state.restarts + 1, next_restart_at=None)
        self._restart_cold()
        await self._start_boot_shares()
        if self.network is not None:
            self.network.before_spawn()
        self.spawn_qemu()
        return True

    def _restart_cold(self) -> None:
        """A run started from a snapshot or a memory image restarts from its definition
        (``LaunchRecord.restart_argv``); launch.json says so, for every later command."""
        if self.launch.restart_argv is None:
            return
        self.launch = self.launch._replace(argv=self.launch.restart_argv, restart_argv=None)
        try:
            write_launch(self.run.file(LAUNCH_FILE), self.launch)
        except RecordWriteError as error:
            log_line(f"qvm supervisor: {error}")

    # --- stopping ----------------------------------------------------------------------

    def _on_stop_signal(self) -> None:
        if self.stop_budget is None:
            asyncio.get_running_loop().create_task(self.stop(timeout=30.0, force=False))
            return
        sd_notify("STOPPING=1")
        stop = self.stop(timeout=self.stop_budget, force=False, budget=self.stop_budget)
        asyncio.get_running_loop().create_task(stop)

    def _signal_qemu(self, signum: int) -> None:
        if self.qemu_alive():
            assert self.qemu is not None
            with contextlib.suppress(ProcessLookupError):
                self.qemu.send_signal(signum)

    async def _wait_exit(self, timeout: float) -> bool:
        if not self.qemu_alive():
            return True
        try:
            await asyncio.wait_for(asyncio.shield(self.exited), timeout)
        except TimeoutError:
            return False
        return True

    async def _qmp_call(self, command: str, args: dict[str, Any] | None = None) -> Any:
        # a `qvm down` right after `qvm up` must still press the power button, not skip to quit
        qmp = await self.qmp_connection(QMP_CALL_TIMEOUT)
        if qmp is None:
            raise RuntimeError("no QMP connection")
        return await asyncio.wait_for(qmp.execute(command, args), QMP_CALL_TIMEOUT)

    async def qmp_connection(self, timeout: float) -> Any:
        """Our QMP client, waiting up to ``timeout`` for it while QEMU runs; None without.

        `qvm up` returns when QMP first answers, before this connection is up: whatever a
        command asks right then waits for it rather than failing or answering half."""
        if self.qmp is None and self.qemu_alive():
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self.qmp_connected.wait(), timeout)
        return self.qmp

    async def stop(self, timeout: float, force: bool, budget: float | None = None) -> EndReply:
        """ACPI power button, then the guest agent's guest-shutdown (when the VM has an
        agent channel), then QMP quit, then SIGKILL; say which one ended QEMU. With a
        ``budget``, all of it within that many seconds: the button gets 60 % of it, the
        agent up to 80 %, quit up to 95 %."""
        self._cancel_restart()
        if not self.qemu_alive():
            self.intent = "stop"
            return EndReply(None, "QEMU was not running")
        self.intent = "stop"
        self.save_state(state="stopping")
        started = time.monotonic()

        def until(share: float, seconds: float) -> float:
            if budget is None:
                return seconds
            return max(min(seconds, started + share * budget - time.monotonic()), 0.0)

        if not force:
            try:
                if await self._power_down(until(0.6, timeout)):
                    return EndReply("acpi")
            except Exception:  # noqa: BLE001 - escalate to quit
                pass
            if await self._agent_power_off(until(0.8, AGENT_EXCHANGE + AGENT_SHUTDOWN_WAIT)):
                return EndReply("agent")
        try:
            await self._qmp_call("quit")
            if await self._wait_exit(until(0.95, QUIT_WAIT)):
                return EndReply("quit")
        except Exception:  # noqa: BLE001 - a closed connection during quit is success
            if await self._wait_exit(until(0.95, QUIT_WAIT)):
                return EndReply("quit")
        self._signal_qemu(signal.SIGKILL)
        await self._wait_exit(KILL_WAIT)
        return EndReply("kill")

    async def _power_down(self, timeout: float) -> bool:
        """Press the ACPI power button, and again every few seconds while QEMU runs, up to
        ``timeout``: a guest still booting (no ACPI handler yet) or busy (onlining a vCPU
        under TCG) loses a press, as a person at the machine would find; a guest already
        shutting down ignores the later ones. True once QEMU has exited."""
        deadline = time.monotonic() + timeout
        while True:
            await self._qmp_call("system_powerdown")
            remaining = max(deadline - time.monotonic(), 0.0)
            if await self._wait_exit(min(POWER_BUTTON_REPEAT, remaining)):
                return True
            if time.monotonic() >= deadline:
                return False

    async def _agent_power_off(self, wait: float) -> bool:
        """The guest ignored the power button: ask its agent (``guest-shutdown``), if the
        VM has one, and wait up to ``wait`` seconds, the exchange included. True once
        QEMU has exited."""
        if not self.qemu_alive() or not self.launch.has_agent or wait <= 0:
            return False
        # the agent's client stays out of the supervisor's memory (~0.1 MiB) until a stop
        from qvm.supervisor.agent_shutdown import agent_shutdown  # noqa: PLC0415 -- see above

        self.agent_shutdown_sent = True
        started = time.monotonic()
        try:
            problem = await asyncio.wait_for(asyncio.to_thread(agent_shutdown, self.run), wait)
        except Exception as exc:  # noqa: BLE001 - a stop must go on to quit, whatever happened
            problem = f"{type(exc).__name__}: {exc}"
        if problem is not None:
            self.agent_shutdown_sent = False
            log_line(f"qvm supervisor: down: no guest-shutdown: {problem}; QMP quit next")
            return False
        if await self._wait_exit(max(wait - (time.monotonic() - started), 0.0)):
            return True
        self.agent_shutdown_sent = False
        return False

    async def kill(self) -> EndReply:
        self._cancel_restart()
        self.intent = "kill"
        if not self.qemu_alive():
            return EndReply(None, "QEMU was not running")
        self._signal_qemu(signal.SIGKILL)
        await self._wait_exit(KILL_WAIT)
        return EndReply("kill")

    def _cancel_restart(self) -> None:
        waiter = getattr(self, "restart_wait", None)
        self.intent = self.intent or "stop"
        if waiter is not None and not waiter.done():
            waiter.set_result(None)

    # --- requests ----------------------------------------------------------------------

    async def _serve_client(self, reader: Any, writer: Any) -> None:
        reply: StatusReply | EndReply | ErrorReply
        try:
            request = decode_request(await reader.readline())
            if isinstance(request, ControlRequest):
                # the supervisor's RSS is a target: the relay only once a client asks
                from qvm.supervisor.relay import serve_control  # noqa: PLC0415

                await serve_control(self, reader, writer)
                return
            if expired(request, time.time()):
                # the client gave up on it (we were stopped, or stuck): its user was
                # told it failed, so it must not happen now
                log_line(f"qvm supervisor: {request.to_json()['op']}: {EXPIRED}, not carried out")
                reply = ErrorReply(f"{EXPIRED}: read after its deadline, not carried out")
            else:
                if getattr(request, "deadline", None) is not None:
                    writer.write(encode(Accepted().to_json()))
                    await writer.drain()
                reply = await self._handle(request)
        except RecordError as exc:
            reply = ErrorReply(str(exc))
        except Exception as exc:  # noqa: BLE001 - a bad request must not end the supervisor
            reply = ErrorReply(f"{type(exc).__name__}: {exc}")
        try:
            writer.write(encode(reply.to_json()))
            await writer.drain()
            writer.close()
        except Exception:  # noqa: BLE001 - the client went away
            pass

    async def _handle(
        self, request: StatusRequest | StopRequest | KillRequest
    ) -> StatusReply | EndReply:
        if isinstance(request, StatusRequest):
            return await self.live_status()
        if isinstance(request, StopRequest):
            return await self.stop(request.timeout, request.force)
        return await self.kill()

    async def live_status(self) -> StatusReply:
        live = self.state._replace(
            state=self._live_state() if self.qemu_alive() else self.state.state
        )
        # a status asked right after `qvm up` waits rather than answering without vCPUs
        if not self.qemu_alive() or await self.qmp_connection(QMP_CALL_TIMEOUT) is None:
            return StatusReply(live)
        pid = self.qemu.pid if self.qemu else None
        try:
            status, cpus, memory = await asyncio.wait_for(
                asyncio.gather(
                    self.qmp.execute("query-status"),
                    self.qmp.execute("query-cpus-fast"),
                    self.qmp.execute("query-memory-size-summary"),
                ),
                QMP_CALL_TIMEOUT,
            )
        except Exception as exc:  # noqa: BLE001 - report what happened instead of hanging
            reply = StatusReply(live, qmp_error=describe_qmp_failure(exc, pid))
        else:
            self.runstate = runstate(status, self.runstate)
            reply = StatusReply(
                live._replace(state=self._live_state()),
                runstate=self.runstate,
                vcpus_present=len(cpus),
                memory_bytes=memory_summary(memory).total,
            )
        usage = process_facts(pid, self.state.started_at)
        if usage is None:
            return reply
        return reply._replace(rss_bytes=usage[0], cpu_percent=usage[1])


def run_supervisor(
    run_path: str,
    launch: LaunchRecord,
    ready_fd: int | None,
    qemu: AdoptedQemu,
    qmp_answered: bool,
    stop_budget: float | None = None,
) -> int:
    """Supervise a QEMU that ``qvm.supervisor.spawn`` has just spawned, to the end. In the
    foreground (a ``stop_budget``), the exit status says how the VM ended."""
    supervisor = Supervisor(RunFiles(run_path), launch, ready_fd, stop_budget)
    supervisor.adopt_qemu(qemu)
    if qmp_answered:
        supervisor.notify_ready()
    loop = asyncio.new_event_loop()
    try:
        code = loop.run_until_complete(supervisor.main())
        if stop_budget is None:
            return code
        return announce_end(launch.name, supervisor.state.exit)
    finally:
        # Unlike asyncio.run, give what is left (a client's request, a QMP connection's
        # teardown) a bounded time: with QEMU gone, nothing may keep the supervisor alive.
        leftovers = asyncio.all_tasks(loop)
        for task in leftovers:
            task.cancel()
        if leftovers:
            loop.run_until_complete(asyncio.wait(leftovers, timeout=QMP_CALL_TIMEOUT))
        loop.close()
