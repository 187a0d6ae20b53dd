"""`qvm status` and `qvm list`: facts about one VM's current or last run, from the
records its supervisor keeps (``state.json``, and ``view.json`` while QEMU runs: vCPUs,
memory, the guest agent's facts with their age) and ``/proc``, without asking the
supervisor or the agent: a query never waits for a stuck one, it says so in its row
(``supervisor_state``). ``live`` asks the supervisor (and the agent) instead. A VM that
is not running is completed from its definition. Never raises for a VM in a bad state: the
problems ride along in the record (``VmStatus.problems``), and the state says what is
known: ``invalid`` (the definition does not load, and nothing ran) or ``unknown`` (its
records do not parse). The CLI only renders a ``VmStatus``, as text or JSON.
"""

from __future__ import annotations

import os
import time

from qvm.base.checking import TYPE_CHECKING
from qvm.base.proc import process_state, process_usage
from qvm.base.record import Record
from qvm.errors import QvmError, RecordError
from qvm.layout.names import is_vm_name
from qvm.layout.rundir import RunDir
from qvm.layout.runfiles import LAUNCH_FILE, NETWORKS_FILE, STATE_FILE, VIEW_FILE
from qvm.store.launch import Forward, LaunchRecord, definition_changed, read_launch
from qvm.store.state import ExitRecord, StateRecord, read_state
from qvm.supervisor.client import (
    SUPERVISOR_ANSWER_TIMEOUT,
    ask_supervisor,
    clean_stale,
    supervisor_alive,
)

if TYPE_CHECKING:
    from collections.abc import Callable, Iterable

    from qvm.definition.schema import Machine
    from qvm.ops.net import NicNetwork
    from qvm.store.guest import GuestFacts
    from qvm.store.view import ViewRecord

# the states with a QEMU to show: its pid, uptime, sockets
ACTIVE_STATES = ("running", "paused")
# supervisor_state: "ok", or why its record may be old
SUPERVISOR_STUCK = "stuck"  # its process is stopped (SIGSTOP, a debugger): state T
SUPERVISOR_STALE = "stale"  # it runs, but has not rewritten its record for a while


class Vcpus(Record):
    present: int  # 0 while the VM does not run
    max: int | None
    boot: int | None  # how many it started with (stopped: its definition's)


class Memory(Record):
    bytes: int
    max: int | None


class VmStatus(Record):
    """One VM's state and why, its process facts and files (``schemas/status.json``)."""

    name: str
    state: str  # a supervisor's state (qvm.store.state.STATES), "invalid" or "unknown"
    run: RunDir | None  # None: no VM can have this name (a machine file named "a b.toml")
    reason: str | None = None  # why it stopped or crashed
    pid: int | None = None  # QEMU's
    supervisor_pid: int | None = None
    uptime: float | None = None  # seconds
    accel: str | None = None
    accel_reason: str | None = None
    vcpus: Vcpus | None = None
    memory: Memory | None = None
    rss_bytes: int | None = None
    cpu_percent: float | None = None
    restarts: int = 0
    last_exit: ExitRecord | None = None
    machine_file: str | None = None
    # a running VM's: its machine file's contents differ from those it started from
    # (``qvm.store.launch.definition_changed``); None: not running, or nothing can tell
    definition_changed: bool | None = None
    forwards: tuple[Forward, ...] = ()
    networks: tuple[NicNetwork, ...] = ()  # its NICs on private networks (qvm.ops.net)
    problems: tuple[str, ...] = ()  # each one line, naming its file or VM
    # where the supervisor's last record was kept when state.json could not take it
    # (EIO, EROFS, ENOSPC: ``qvm.store.state.keep_elsewhere``); None: state.json
    record_kept_in: str | None = None
    # the guest agent's word (the supervisor's record, or ``with_guest_facts``); None:
    # not asked, or not running
    guest: GuestFacts | None = None
    guest_age: float | None = None  # seconds since the agent said it; None: just asked
    facts_age: float | None = None  # seconds since the supervisor wrote view.json
    supervisor_state: str | None = None  # "ok", SUPERVISOR_STUCK or _STALE; None: none runs

    @property
    def error(self) -> str | None:
        return "; ".join(self.problems) or None

    def but(self, **changes: object) -> VmStatus:
        """``_replace``, typed."""
        changed: VmStatus = self._replace(**changes)
        return changed

    def with_problem(self, problem: str) -> VmStatus:
        return self.but(problems=(*self.problems, problem))


if TYPE_CHECKING:
    Load = Callable[[], Machine]


# --- status --------------------------------------------------------------------------


def vm_status(run: RunDir, definition: Load | None = None, live: bool = False) -> VmStatus:
    """Facts about one VM's current or last run; ``definition`` loads its machine file
    (raising QvmError), asked only for what the records of a VM that is not running
    cannot say; ``live``: ask a running VM's supervisor rather than read its record.
    Never raises for a VM in a bad state."""
    status: VmStatus = VmStatus(run.name, "stopped", run)
    try:
        status = _from_records(status, run, live)
    except RecordError as error:
        status = _unreadable(status, run, error)
    if definition is not None and (status.vcpus is None or status.machine_file is None):
        status = _from_definition(status, definition)
    return status


def _unreadable(status: VmStatus, run: RunDir, error: RecordError) -> VmStatus:
    """A record that does not parse. A corrupt state.json of a VM that provably runs
    nothing is a stopped VM (`qvm up` moves the file aside); else the state is unknown."""
    from qvm.ops.corrupt_state import (  # noqa: PLC0415 -- rare: `status` starts without it
        still_running,
        unusable,
    )

    if error.file == run.file(STATE_FILE) and still_running(run) is None:
        return status.with_problem(str(unusable(run, error)))
    return status.but(state="unknown", problems=(str(error),))


def _from_records(status: VmStatus, run: RunDir, live: bool) -> VmStatus:
    launch_problem: tuple[str, ...] = ()
    try:
        launch = read_launch(run.file(LAUNCH_FILE))
    except RecordError as error:  # the state record can still tell the most
        launch, launch_problem = None, (str(error),)
    state = read_state(run.file(STATE_FILE))
    if state is None:
        return status.but(problems=launch_problem)
    alive = supervisor_alive(run)
    if not alive:
        state = clean_stale(run) or state
    status = status.but(
        accel=state.accel,
        accel_reason=state.accel_reason,
        restarts=state.restarts,
        last_exit=state.exit,
        machine_file=state.machine_file,
        supervisor_pid=state.supervisor_pid if alive else None,
        problems=launch_problem,
        record_kept_in=state.kept_in,
    )
    if not alive:
        if state.orphaned:
            return status.but(state="crashed", pid=state.qemu_pid, reason=state.crash_reason)
        return status.but(
            state="crashed" if state.live else state.state,
            pid=state.qemu_pid if state.live else None,
            reason=state.ended_reason or state.crash_reason,
        )
    if live:
        return _asked(status, run, state, launch)
    return _recorded(status, run, state, launch)


def _asked(
    status: VmStatus, run: RunDir, state: StateRecord, launch: LaunchRecord | None
) -> VmStatus:
    """A live supervisor's answer, or what its record says when it does not answer."""
    from qvm.supervisor.wire import StatusRequest  # noqa: PLC0415 -- only a running VM is asked

    try:
        live = ask_supervisor(run, StatusRequest(), timeout=SUPERVISOR_ANSWER_TIMEOUT)
    except QvmError as exc:
        state = read_state(run.file(STATE_FILE)) or state
        if state.state in ("stopped", "crashed"):
            # a supervisor on its way out after QEMU ended: its record is complete
            return status.but(
                state=state.state,
                reason=state.ended_reason,
                last_exit=state.exit,
                supervisor_pid=None,
            )
        return status.but(state=state.state, pid=state.qemu_pid, problems=(str(exc),))
    from qvm.store.forwards import read_forwards  # noqa: PLC0415 -- a running VM's only

    now = live.record
    ended = now.state in ("stopped", "crashed") or now.qemu_pid is None
    vcpus = memory = None
    if live.vcpus_present is not None:
        vcpus = Vcpus(
            live.vcpus_present,
            launch.vcpus_max if launch is not None else None,
            launch.vcpus_boot if launch is not None else None,
        )
    if live.memory_bytes is not None:
        memory = Memory(live.memory_bytes, launch.memory_max if launch is not None else None)
    return status.but(
        state=now.state,
        pid=now.qemu_pid,
        # the live answer, not state.json read a moment earlier: a restart may lie between
        restarts=now.restarts,
        last_exit=now.exit,
        reason=now.ended_reason if ended else None,
        uptime=(
            round(time.time() - now.started_at, 1) if now.started_at and now.qemu_pid else None
        ),
        vcpus=vcpus,
        memory=memory,
        forwards=read_forwards(run),
        networks=_networks(run),
        definition_changed=definition_changed(launch) if launch is not None else None,
        rss_bytes=live.rss_bytes,
        cpu_percent=live.cpu_percent,
        problems=(live.qmp_error,) if live.qmp_error else status.problems,
    )


def _recorded(
    status: VmStatus, run: RunDir, state: StateRecord, launch: LaunchRecord | None
) -> VmStatus:
    """A live supervisor's records and /proc: what it last saw, with how old that is."""
    from qvm.store.view import STALE_AFTER, current_view  # noqa: PLC0415 -- a running VM's only

    supervisor_stopped = process_state(state.supervisor_pid) in ("T", "t")
    problems = list(status.problems)
    try:
        view = current_view(run.file(VIEW_FILE), state, wait=not supervisor_stopped)
        if view is not None and state.state == "starting":
            # waited for: the supervisor wrote "running" before its first view
            state = read_state(run.file(STATE_FILE)) or state
    except RecordError as error:
        view, problems = None, [*problems, str(error)]
    now = time.time()
    age = view.age(now) if view is not None else None
    supervisor = "ok"
    if supervisor_stopped:
        supervisor = SUPERVISOR_STUCK
        problems.append(
            f"{run.name}: its supervisor (pid {state.supervisor_pid}) is stopped, e.g. by"
            f" SIGSTOP: what is shown is {_as_of(age)} (hint: kill -CONT {state.supervisor_pid})"
        )
    elif age is not None and age > STALE_AFTER:
        supervisor = SUPERVISOR_STALE
        problems.append(
            f"{run.name}: its supervisor (pid {state.supervisor_pid}) has not rewritten"
            f" {run.file(VIEW_FILE)} for {age:.0f} s: it may be stuck (hint: qvm status"
            f" {run.name} --live asks it)"
        )
    status = status.but(
        state=state.state,
        pid=state.qemu_pid,
        restarts=state.restarts,
        last_exit=state.exit,
        reason=state.ended_reason if state.state in ("stopped", "crashed") else None,
        uptime=(round(now - state.started_at, 1) if state.started_at and state.qemu_pid else None),
        forwards=_forwards(run, state, launch),
        networks=_networks(run),
        definition_changed=definition_changed(launch) if launch is not None else None,
        facts_age=round(age, 1) if age is not None else None,
        supervisor_state=supervisor,
    )
    if status.pid and process_state(status.pid) in ("T", "t"):
        problems.append(
            f"{run.name}: QEMU (pid {status.pid}) is stopped, e.g. by SIGSTOP: it answers"
            f" nothing until 'kill -CONT {status.pid}' resumes it"
        )
    elif view is not None and view.qmp_error:
        problems.append(view.qmp_error)
    if view is None:
        return status.but(problems=tuple(problems))
    status = _with_view(status, view, launch, now)
    return status.but(problems=tuple(problems))


def _with_view(
    status: VmStatus, view: ViewRecord, launch: LaunchRecord | None, now: float
) -> VmStatus:
    present = view.vcpus_present
    vcpus = memory = None
    if present is not None:
        vcpus = Vcpus(
            present,
            launch.vcpus_max if launch is not None else None,
            launch.vcpus_boot if launch is not None else None,
        )
    if view.memory_bytes is not None:
        memory = Memory(view.memory_bytes, launch.memory_max if launch is not None else None)
    from qvm.store.guest import NOT_ANSWERING  # noqa: PLC0415 -- a running VM's only
    from qvm.store.view import GuestView, cpu_percent  # noqa: PLC0415 -- a running VM's only

    usage = process_usage(view.qemu_pid) if status.pid else None
    guest = view.guest
    if guest is None and status.state in ACTIVE_STATES:
        guest = GuestView(view.written_at, NOT_ANSWERING, "not asked yet: QEMU has just started")
    return status.but(
        vcpus=vcpus,
        memory=memory,
        rss_bytes=usage[0] if usage is not None else None,
        cpu_percent=cpu_percent(view.cpu_samples, now, usage[1]) if usage is not None else None,
        guest=guest.facts() if guest is not None else None,
        guest_age=round(max(now - guest.at, 0.0), 1) if guest is not None else None,
    )


def _as_of(age: float | None) -> str:
    return f"as of {age:.0f} s ago" if age is not None else "what its records say"


def _forwards(run: RunDir, state: StateRecord, launch: LaunchRecord | None) -> tuple[Forward, ...]:
    if state.qemu_pid is None:
        return ()
    from qvm.store.forwards import read_forwards  # noqa: PLC0415 -- a running VM's only

    return read_forwards(run, state, launch)


def _networks(run: RunDir) -> tuple[NicNetwork, ...]:
    if not os.path.exists(run.file(NETWORKS_FILE)):
        return ()
    from qvm.ops.net import vm_networks  # noqa: PLC0415 -- VMs on private networks only

    try:
        return vm_networks(run)
    except QvmError:  # status never fails: a broken record shows no networks
        return ()


def _from_definition(status: VmStatus, definition: Load) -> VmStatus:
    """What only the definition says of a VM that is not running: its file, its vCPUs
    and memory. One that does not load makes a VM that never ran ``invalid``; for one
    that ran, its problem rides along."""
    try:
        machine = definition()
    except QvmError as error:
        status = status.with_problem(str(error).splitlines()[0])
        if status.state == "stopped" and status.last_exit is None:
            return status.but(state="invalid")
        return status
    return status.but(
        machine_file=status.machine_file or str(machine.path),
        vcpus=status.vcpus or Vcpus(0, machine.cpu.max, machine.cpu.count),
        memory=status.memory or Memory(machine.memory.size, machine.memory.max),
    )


# --- list --------------------------------------------------------------------------------


def list_status(
    definitions: Iterable[tuple[str, str | None]],
    run_dir: Callable[[str], RunDir],
    load: Callable[[str], Machine],
) -> list[VmStatus]:
    """Every VM of ``definitions`` (its name and machine file, or None for a VM known
    only by its run dir), sorted by name: one that cannot be looked at at all (a name no
    VM can have, an entry that cannot be read) is there with its state and why."""
    listed = []
    for name, file in sorted(definitions):
        try:
            listed.append(_entry_status(name, file, run_dir, load))
        except QvmError as error:
            state = "invalid" if file else "unknown"
            listed.append(VmStatus(name, state, None, problems=(str(error).splitlines()[0],)))
        except Exception as error:  # noqa: BLE001 - one broken VM never breaks the list
            listed.append(VmStatus(name, "unknown", None, problems=(str(error)[:300],)))
    return listed


def _entry_status(
    name: str, file: str | None, run_dir: Callable[[str], RunDir], load: Callable[[str], Machine]
) -> VmStatus:
    if file is not None and not is_vm_name(name):
        # a file whose stem is not a VM name: its own name key says which VM it is
        name = load(file).name
    return vm_status(run_dir(name), lambda: load(file or name))


# --- the guest's own word --------------------------------------------------------------


def with_guest_facts(status: VmStatus) -> VmStatus:
    """``status`` with what the guest agent says (answering or not, not configured; the
    guest's OS, host name, addresses), asked briefly; a VM that is not running is left
    as it is (``guest`` None: no agent to ask)."""
    if status.state != "running" or status.run is None:
        return status
    from qvm.control.guest_agent_facts import (  # noqa: PLC0415 -- a running VM's only
        guest_facts,
    )

    return status.but(guest=guest_facts(status.run))
