"""Lifecycle commands: up, down, kill, restart, status, list, logs, console, cmdline."""

from __future__ import annotations

import os
import sys
from collections.abc import Callable

from qvm.base.checking import TYPE_CHECKING
from qvm.base.record import Record
from qvm.cli import resolve
from qvm.cli.output import (
    abort,
    emit_json,
    human_bytes,
    human_seconds,
    say,
    table,
    warn,
)
from qvm.cli.parsing.declare import (
    ALL_RUNNING,
    AS_JSON,
    JOBS,
    LIVE,
    MACHINE,
    SKIP_POWER_BUTTON,
    STOP_TIMEOUT,
    TARGETS,
    Argument,
    Commands,
    Option,
)
from qvm.errors import EXIT_INTERRUPTED, DefinitionError, UsageError
from qvm.layout.runfiles import CONSOLE_SOCKET, QEMU_LOG, QMP_SOCKET, SERIAL_LOG

if TYPE_CHECKING:
    from pathlib import Path
    from typing import Any, NoReturn

    from qvm.cli.several import Several
    from qvm.definition.schema import Machine
    from qvm.layout.rundir import RunDir
    from qvm.ops.net import NicNetwork
    from qvm.ops.snapshot import RestoreResult
    from qvm.ops.status import VmStatus
    from qvm.ops.stop import StopResult
    from qvm.ops.up import UpResult
    from qvm.store.guest import GuestFacts


commands = Commands()


@commands.command("up")
def up(
    names: list[str] | None = Argument(
        None,
        help="Machine names or TOML files, and @GROUP for the machines whose file says "
        'group = "GROUP".',
    ),
    no_wait: bool = Option(False, "--no-wait", help="Return once QEMU is spawned."),
    restore: str | None = Option(
        None, "--restore", metavar="TAG", help="Start from this snapshot (qvm snapshot)."
    ),
    foreground: bool = Option(
        False,
        "--foreground",
        help="Supervise the VM in this process until it ends (one VM); see below.",
    ),
    stop_timeout: float = Option(
        20.0,
        "--stop-timeout",
        help="--foreground: seconds SIGTERM's stop may take in all (power button, agent, "
        "quit, kill).",
    ),
    as_json: bool = AS_JSON,
    every: bool = Option(False, "--all", help="Every machine file (then no names)."),
    jobs: int | None = JOBS,
) -> None:
    """Start VMs under their own supervisors and wait until QMP answers.

    With --foreground, qvm itself becomes the VM's supervisor (no fork, no new session:
    for systemd, Slurm, Nomad, a container): QEMU stays its child and quits if it dies.
    Once QMP answers it says so on stdout (and READY=1 on $NOTIFY_SOCKET, systemd's
    protocol). SIGTERM or SIGINT stop the VM within --stop-timeout (power button, guest
    agent, QMP quit, SIGKILL), never followed by a restart; SIGCONT does nothing. Every
    other command (status, exec, cpu add, down, ...) works on it as on any VM. It exits
    with how the VM ended: 0 the guest powered off, or a stop someone asked for; 10 QEMU
    crashed; 11 the guest panicked; 12 SIGKILL ended QEMU (qvm kill, or a stop's last
    step); 1 QEMU failed to start.

    JSON: schemas/up.json
    """
    from qvm.cli.several import Several

    if foreground:
        if every or jobs is not None:
            raise UsageError(
                "qvm up --foreground: one VM, by name (hint: qvm up --foreground NAME)"
            )
        _up_foreground(
            names or [],
            restore,
            no_wait,
            as_json,
            resolve.timeout_seconds(stop_timeout, "--stop-timeout"),
        )

    several = Several(names, every, jobs, defined=True)

    def start_one(name: str) -> _Started:
        return _start(name, restore, not no_wait)

    for spec, started in several.run(start_one, "starting"):
        run, result, restored = started.run, started.result, started.restored
        if started.kept is not None:
            _warn_set_aside(run, started.kept)
        if as_json:
            from qvm.store.forwards import read_forwards

            entry = {
                "name": result.name,
                "already_running": result.already_running,
                "pid": result.qemu_pid,
                "accel": result.accel,
                "accel_reason": result.accel_reason,
                "serial_log": str(result.serial_log),
                "qmp_socket": str(result.qmp_socket),
                "qmp_ready": result.ready,
                # the host ports picked for port 0 too: what this run listens on
                "forwards": [forward.to_json() for forward in read_forwards(run)],
                "notes": list(result.notes),
            }
            if restored is not None:
                entry["restore"] = restored.as_json()
            if started.clone is not None:
                entry["clone"] = started.clone
            several.record(spec, entry)
            continue
        if restored is not None:
            from qvm.cli.commands.snapshot import say_restored

            say_restored(restored)
            if restored.up is not None:
                continue
        if result.already_running:
            say(f"{result.name}: already running (pid {result.qemu_pid})")
            _warn_if_changed(run)
            continue
        _say_started(result, run, started.clone)
    several.finish(as_json)


class _Started(Record):
    """One VM's `up`: what the CLI says of it."""

    run: RunDir
    result: UpResult
    restored: RestoreResult | None
    clone: dict[str, Any] | None
    kept: Path | None  # where a corrupt state.json was moved aside


def _start(name: str, restore: str | None, wait: bool) -> _Started:
    """`up` of one VM (in a thread of its own when there are several): prints nothing."""
    from qvm.cli.progress import DownloadBar, run_waiting
    from qvm.ops.corrupt_state import set_aside_corrupt_state
    from qvm.ops.up import plan_launch, start_vm

    restored = plan = result = None
    machine = resolve.load(name)
    run = resolve.run_dir(machine.name)
    kept = set_aside_corrupt_state(run)
    if restore is not None:
        restored, result = _restore(machine, run, restore)
    if restored is None or result is None:  # a cold start (after disks reverted)
        plan = plan_launch(machine, run)
        label = _start_label(machine.name)
        result = run_waiting(label, start_vm, plan, wait, DownloadBar())
    resumed = plan is not None and plan.inputs.incoming is not None and wait
    clone = _clone_start(run, result) if resumed else None
    return _Started(run, result, restored, clone, kept)


def _up_foreground(
    names: list[str], restore: str | None, no_wait: bool, as_json: bool, stop_timeout: float
) -> NoReturn:
    """`qvm up --foreground NAME`: never returns (qvm.ops.up.run_in_foreground)."""
    from qvm.ops.up import plan_launch, run_in_foreground

    others = [
        option
        for option, given in (("--restore", restore), ("--no-wait", no_wait), ("--json", as_json))
        if given
    ]
    if len(names) != 1 or others:
        what = "one VM" if len(names) != 1 else f"no {others[0]}"
        raise UsageError(f"qvm up --foreground: {what} (hint: qvm up --foreground NAME)")
    machine = resolve.load(names[0])
    run = resolve.run_dir(machine.name)
    _set_aside_corrupt_state(run)
    sys.stdout.flush()
    run_in_foreground(plan_launch(machine, run), stop_timeout)


def _set_aside_corrupt_state(run: RunDir) -> None:
    """A state.json that does not parse, of a VM in which provably nothing runs, is moved
    aside before the start (``qvm.ops.corrupt_state``): say where it is kept."""
    from qvm.ops.corrupt_state import set_aside_corrupt_state

    kept = set_aside_corrupt_state(run)
    if kept is not None:
        _warn_set_aside(run, kept)


def _warn_set_aside(run: RunDir, kept: Path) -> None:
    warn(
        f"qvm: {run.name}: {run.state_file.name} did not parse and nothing of "
        f"{run.name} runs: moved aside to {kept}"
    )


def _say_started(result: UpResult, run: RunDir, clone: dict[str, Any] | None = None) -> None:
    """A started VM, as `up` and `restart` say it: above all the host ports of its
    forwards, which a start with host port 0 picks anew."""
    verb = "running" if result.ready else "starting"
    say(f"{result.name}: {verb}, pid {result.qemu_pid}")
    say(f"  accel       {result.accel} ({result.accel_reason})")
    say(f"  serial log  {result.serial_log}")
    say(f"  qmp socket  {result.qmp_socket}")
    if clone is not None:
        say(f"  clone       resumed {clone['template']}@{clone['tag']}")
        if clone["macs"] is not None:
            say(f"  mac         {clone['macs']}")
        if clone["clock"] is not None:
            say(f"  guest clock {clone['clock']}")
    from qvm.store.forwards import read_forwards

    # the ports QEMU bound for port 0, as the supervisor read them back; 0 until QMP
    # answers, which `--no-wait` does not wait for
    for forward in read_forwards(run):
        port = forward.host_port or f"(QEMU binds it: qvm port list {result.name})"
        say(
            f"  forward     {forward.proto}:{forward.host_addr}:{port}"
            f" -> guest port {forward.guest_port} ({forward.nic})"
        )
    for note in result.notes:  # e.g. an address a pinned one took: said once, here
        say(f"  note        {note}")


def _restore(machine: Machine, run: RunDir, tag: str) -> tuple[RestoreResult, UpResult | None]:
    """`up --restore TAG`: the restore, and the start it made (None: disks reverted,
    the caller starts the VM cold)."""
    from qvm.cli.progress import run_waiting
    from qvm.ops.snapshot import restore as restore_snapshot

    label = f"{machine.name}: restoring snapshot {tag}"
    restored = run_waiting(label, restore_snapshot, run, tag, machine)
    return restored, restored.up


def _clone_start(run: RunDir, result: UpResult) -> dict[str, Any] | None:
    """What a clone's first start did (it resumed its template's memory), else None."""
    from qvm.store.snapshots import read_clone

    record = None if result.already_running else read_clone(run)
    if record is None:
        return None
    return {
        "template": record.template,
        "tag": record.tag,
        "macs": record.mac_note,
        "clock": record.clock_note,
    }


@commands.command("down")
def down(
    names: list[str] | None = TARGETS,
    timeout: float = STOP_TIMEOUT,
    force: bool = SKIP_POWER_BUTTON,
    as_json: bool = AS_JSON,
    every: bool = ALL_RUNNING,
    jobs: int | None = JOBS,
) -> None:
    """Power VMs off: ACPI power button, then QMP quit, then SIGKILL.

    JSON: schemas/down.json
    """
    timeout = resolve.timeout_seconds(timeout)
    from qvm.cli.progress import run_waiting
    from qvm.cli.several import Several
    from qvm.ops.stop import stop

    several = Several(names, every, jobs)

    def stop_one(run: RunDir) -> StopResult:
        accepted: list[bool] = []
        label = _stop_label(run.name, timeout, force)
        try:
            return run_waiting(label, stop, run, timeout, force, lambda: accepted.append(True))
        except KeyboardInterrupt:  # only ever in the main thread: one VM
            if not accepted:
                raise
            abort(
                f"{run.name}: interrupted; the supervisor goes on stopping it in the "
                f"background (hint: qvm status {run.name} says when it is stopped; "
                f"qvm kill {run.name} ends it at once)",
                EXIT_INTERRUPTED,
            )

    _stop_each(several, "stopped", stop_one, as_json)


def _stop_label(name: str, timeout: float, force: bool) -> str:
    if force:
        return f"{name}: waiting for QEMU to quit"
    return f"{name}: waiting for the guest to power off (ACPI button, up to {timeout:g}s)"


@commands.command("kill")
def kill(
    names: list[str] | None = TARGETS,
    as_json: bool = AS_JSON,
    every: bool = ALL_RUNNING,
    jobs: int | None = JOBS,
) -> None:
    """Kill QEMU at once (SIGKILL). Not a failure for the restart policy.

    JSON: schemas/kill.json
    """
    from qvm.cli.progress import run_waiting
    from qvm.cli.several import Several
    from qvm.ops.stop import kill as kill_vm

    def kill_one(run: RunDir) -> StopResult:
        return run_waiting(f"{run.name}: waiting for QEMU to end", kill_vm, run)

    _stop_each(Several(names, every, jobs), "killed", kill_one, as_json)


def _stop_each(
    several: Several, verb: str, action: Callable[[RunDir], StopResult], as_json: bool
) -> None:
    """Stop every VM named, each line as its VM is done; one failure spares the others."""

    def stop_named(name: str) -> StopResult:
        return action(resolve.run_dir_of(name))

    for spec, result in several.run(stop_named, "stopping" if verb == "stopped" else "killing"):
        several.record(
            spec, {"name": result.name, "ended_by": result.ended_by, "message": result.message}
        )
        if not as_json:
            say(f"{result.name}: {verb}: {result.message}")
    several.finish(as_json)


def _start_label(name: str) -> str:
    return f"{name}: starting QEMU, waiting for QMP to answer"


@commands.command("restart")
def restart(
    names: list[str] | None = TARGETS,
    timeout: float = STOP_TIMEOUT,
    force: bool = SKIP_POWER_BUTTON,
    as_json: bool = AS_JSON,
    every: bool = ALL_RUNNING,
    jobs: int | None = JOBS,
) -> None:
    """Stop each VM (if it runs) and start it again from its current definition.

    JSON: schemas/restart.json
    """
    timeout = resolve.timeout_seconds(timeout)
    from qvm.cli.several import Several
    from qvm.store.forwards import read_forwards

    several = Several(names, every, jobs, single_object=True)

    def restart_one(name: str) -> _Restarted:
        return _restart(name, timeout, force)

    for spec, done in several.run(restart_one, "restarting"):
        started, stopped, run = done.started, done.stopped, done.run
        if done.kept is not None:
            _warn_set_aside(run, done.kept)
        if as_json:
            several.record(
                spec,
                {
                    "name": started.name,
                    "stopped": None
                    if stopped is None
                    else {"ended_by": stopped.ended_by, "message": stopped.message},
                    "pid": started.qemu_pid,
                    "accel": started.accel,
                    "accel_reason": started.accel_reason,
                    "qmp_ready": started.ready,
                    "forwards": [forward.to_json() for forward in read_forwards(run)],
                    "notes": list(started.notes),
                },
            )
            continue
        if stopped is not None:
            say(f"{started.name}: stopped: {stopped.message}")
        _say_started(started, run)
    several.finish(as_json)


class _Restarted(Record):
    run: RunDir
    stopped: StopResult | None  # None: it was not running
    started: UpResult
    kept: Path | None  # where a corrupt state.json was moved aside


def _restart(name: str, timeout: float, force: bool) -> _Restarted:
    """`restart` of one VM (in a thread of its own when there are several)."""
    from qvm.cli.progress import run_waiting
    from qvm.ops.corrupt_state import set_aside_corrupt_state
    from qvm.ops.stop import stop
    from qvm.ops.up import plan_launch, start_vm
    from qvm.supervisor.client import supervisor_alive

    machine = resolve.load(name)
    run = resolve.run_dir(machine.name)
    plan = plan_launch(machine, run)  # a broken definition must not cost the running VM
    stopped = None
    if supervisor_alive(run):
        label = _stop_label(machine.name, timeout, force)
        stopped = run_waiting(label, stop, run, timeout, force)
    kept = set_aside_corrupt_state(run)
    started = run_waiting(_start_label(machine.name), start_vm, plan, True)
    return _Restarted(run, stopped, started, kept)


@commands.command("status")
def status(
    names: list[str] | None = TARGETS,
    as_json: bool = AS_JSON,
    live: bool = LIVE,
    every: bool = ALL_RUNNING,
    jobs: int | None = JOBS,
) -> None:
    """Show VMs' state, process facts and files, as each supervisor last recorded them
    (with their age), or with --live as the supervisor and the guest agent say now.

    JSON: schemas/status.json
    """
    if names and len(names) == 1 and not every and jobs is None and names[0][:1] != "@":
        # one VM, the common case: nothing of the group machinery is imported
        facts = _status_of(names[0], live)
        if as_json:
            emit_json(_status_json(facts, with_agent=True))
            return
        _say_status(facts)
        return
    from qvm.cli.several import Several

    several = Several(names, every, jobs, single_object=True)

    def status_of(name: str) -> VmStatus:
        return _status_of(name, live)

    for spec, facts in several.run(status_of, "asking"):
        if as_json:
            several.record(spec, _status_json(facts, with_agent=True))
        else:
            _say_status(facts)
    several.finish(as_json)


def _status_of(name: str, live: bool) -> VmStatus:
    from qvm.ops.status import vm_status, with_guest_facts

    run = resolve.run_dir_of(name)
    facts = vm_status(run, lambda: resolve.load(name), live=live)
    if live:
        facts = with_guest_facts(facts)
    if facts.state == "invalid" and not os.path.exists(run.location):
        # nothing ran and the definition cannot be read: say why, as `up` would
        resolve.load(name)
    return facts


def _say_status(facts: VmStatus) -> None:
    say(_status_text(facts))
    if facts.pid and facts.run is not None and facts.definition_changed:
        _warn_if_changed(facts.run)  # its words: changed, or gone


def _warn_if_changed(run: RunDir) -> None:
    changed = resolve.definition_changed(run)
    if changed:
        warn(f"qvm: {changed}")


def _status_json(facts: VmStatus, with_agent: bool = False) -> dict[str, Any]:
    """``schemas/status.json``; for a name no VM can have, only its name, state and why
    (``schemas/list.json``)."""
    run = facts.run
    if run is None:
        return {"name": facts.name, "state": facts.state, "error": facts.error or facts.state}
    data: dict[str, Any] = {
        "name": facts.name,
        "state": facts.state,
        "reason": facts.reason,
        "pid": facts.pid,
        "supervisor_pid": facts.supervisor_pid,
        "uptime": facts.uptime,
        "accel": facts.accel,
        "accel_reason": facts.accel_reason,
        "vcpus": facts.vcpus._asdict() if facts.vcpus is not None else None,
        "memory": facts.memory._asdict() if facts.memory is not None else None,
        "rss_bytes": facts.rss_bytes,
        "cpu_percent": facts.cpu_percent,
        "restarts": facts.restarts,
        "last_exit": facts.last_exit.to_json() if facts.last_exit is not None else None,
        "qmp_socket": run.file(QMP_SOCKET),
        "serial_log": run.file(SERIAL_LOG),
        "qemu_log": run.file(QEMU_LOG),
        "console_socket": run.file(CONSOLE_SOCKET),
        "run_dir": run.location,
        "machine_file": facts.machine_file,
        "definition_changed": facts.definition_changed,
        "forwards": [forward.to_json() for forward in facts.forwards],
        "networks": [nic.as_json() for nic in facts.networks],
        "error": facts.error,
        "problems": list(facts.problems),
        "record_kept_in": facts.record_kept_in,
        "facts_age": facts.facts_age,
        "supervisor_state": facts.supervisor_state,
    }
    if with_agent:
        guest = facts.guest
        answering = guest is not None and guest.agent == "answering"
        data["agent"] = {
            "state": guest.agent if guest is not None else "not running",
            "detail": guest.detail if guest is not None else None,
            "age": facts.guest_age,
        }
        data["guest"] = (
            {
                "os": guest.os._asdict() if guest.os is not None else None,
                "hostname": guest.hostname,
                "interfaces": [interface.as_json() for interface in guest.interfaces],
            }
            if guest is not None and answering
            else None
        )
    return data


def _network_text(nic: NicNetwork) -> str:
    text = f"{nic.network} {nic.address} ({nic.nic}, mac {nic.mac})"
    if nic.switch != "running":
        text += f", its switch is {nic.switch.upper()}"
    if nic.link == "down":
        return f"{text}, link DOWN: {nic.link_error}"
    if nic.link == "rejoined":
        text += ", rejoined the restarted switch"
    return text + ("" if nic.guest_configured else ", guest not set up yet")


def _status_text(facts: VmStatus) -> str:
    from qvm.ops.status import ACTIVE_STATES

    active = facts.state in ACTIVE_STATES
    head = f"{facts.name}: {facts.state}"
    if facts.reason and not active:
        head += f" ({facts.reason})"
    lines = [head]

    def row(label: str, value: object) -> None:
        if value not in (None, ""):
            lines.append(f"  {label:<11} {value}")

    if facts.pid:
        extra = [f"up {human_seconds(facts.uptime)}"]
        if facts.restarts:
            extra.append(f"{facts.restarts} restarts")
        row("pid", f"{facts.pid} ({', '.join(extra)})")
    if facts.accel:
        row("accel", f"{facts.accel} ({facts.accel_reason})")
    vcpus = facts.vcpus
    if vcpus is not None and facts.pid:
        row("vcpus", f"{vcpus.present} of {vcpus.max}")
    elif vcpus is not None:
        boot = "?" if vcpus.boot is None else vcpus.boot
        row("vcpus", f"{boot} at boot, up to {vcpus.max}")
    memory = facts.memory
    if memory is not None:
        text = human_bytes(memory.bytes)
        if memory.max:
            text += f" (max {human_bytes(memory.max)})"
        row("memory", text)
    if facts.rss_bytes is not None:
        row("host", f"rss {human_bytes(facts.rss_bytes)}, cpu {facts.cpu_percent}%")
    if facts.pid and facts.run is not None:
        row("qmp", facts.run.file(QMP_SOCKET))
        row("console", facts.run.file(CONSOLE_SOCKET))
    if facts.run is not None:
        row("serial log", facts.run.file(SERIAL_LOG))
    for forward in facts.forwards:
        row(
            "forward",
            f"{forward.proto}:{forward.host_addr}:{forward.host_port}"
            f" -> guest port {forward.guest_port} ({forward.nic})",
        )
    for nic in facts.networks:
        row("network", _network_text(nic))
    if facts.last_exit is not None and facts.state not in ("stopped", "crashed"):
        row("last exit", facts.last_exit.reason)
    changed = " (changed since it started)" if facts.definition_changed else ""
    row("definition", facts.machine_file and f"{facts.machine_file}{changed}")
    if facts.record_kept_in is not None:
        row("last record", f"kept in {facts.record_kept_in} (state.json refused it)")
    if facts.supervisor_state not in (None, "ok"):
        row("supervisor", f"{facts.supervisor_state} ({_as_of(facts.facts_age)})")
    for label, value in _guest_rows(facts.guest, facts.guest_age):
        row(label, value)
    for problem in facts.problems:
        row("problem", problem)
    return "\n".join(lines)


def _as_of(age: float | None) -> str:
    return "no record yet" if age is None else f"as of {human_seconds(age)} ago"


def _guest_rows(guest: GuestFacts | None, age: float | None) -> list[tuple[str, str]]:
    """The guest agent's state and what it says (the supervisor's record, ``age``
    seconds old, or ``qvm.ops.status.with_guest_facts``: None)."""
    if guest is None or guest.agent == "not running":
        return []
    state = guest.agent
    if state == "not answering" and guest.detail:
        state += f" ({guest.detail})"
    if age is not None and guest.agent != "not configured":
        state += f", {_as_of(age)}"
    rows = [("agent", state)]
    os_info = guest.os
    if os_info is not None:
        name = os_info.pretty_name or os_info.name or "unknown OS"
        kernel = os_info.kernel_release
        rows.append(("guest os", f"{name}, kernel {kernel}" if kernel else name))
    if guest.hostname:
        rows.append(("hostname", guest.hostname))
    for interface in guest.interfaces:
        if interface.name != "lo":
            addresses = " ".join(f"{a.address}/{a.prefix}" for a in interface.addresses)
            rows.append(("address", f"{interface.name} {addresses or '(none)'}"))
    return rows


@commands.command("list")
def list_vms(as_json: bool = AS_JSON) -> None:
    """Every defined machine and every VM with a run dir, one line each.

    JSON: schemas/list.json
    """
    from qvm.definition.discovery import machine_file_locations, machine_stem
    from qvm.layout.rundir import list_run_dirs
    from qvm.ops.status import list_status

    definitions: dict[str, str | None] = {}
    for file in machine_file_locations(resolve.search_locations()):
        definitions.setdefault(machine_stem(file), file)
    for run in list_run_dirs(resolve.state_location()):
        definitions.setdefault(run.name, None)
    listed = list_status(definitions.items(), resolve.run_dir, resolve.load)
    if as_json:
        emit_json([_status_json(facts) for facts in listed])
        return
    rows = []
    for facts in listed:
        vcpus, memory = facts.vcpus, facts.memory
        rows.append(
            [
                facts.name,
                facts.state,
                facts.pid,
                facts.accel,
                f"{vcpus.present}/{vcpus.max}" if vcpus is not None else None,
                human_bytes(memory.bytes) if memory is not None and memory.bytes else None,
                human_seconds(facts.uptime) if facts.uptime is not None else None,
                _list_note(facts),
            ]
        )
    say(table(["NAME", "STATE", "PID", "ACCEL", "VCPUS", "MEMORY", "UPTIME", "NOTE"], rows))


def _list_note(facts: VmStatus) -> str | None:
    if facts.supervisor_state not in (None, "ok"):
        return f"supervisor {facts.supervisor_state} ({_as_of(facts.facts_age)})"
    return facts.error or facts.reason if facts.state != "running" else None


@commands.command("logs")
def logs(
    name: str = MACHINE,
    follow: bool = Option(False, "--follow", "-f", help="Keep printing new output."),
    qemu: bool = Option(False, "--qemu", help="QEMU's own stderr instead of the serial log."),
    lines: int = Option(0, "--lines", "-n", help="Only the last N lines (0: all)."),
    raw: bool = Option(
        False,
        "--raw",
        help="Pass the guest's bytes through as they are, terminal control sequences "
        "included (the default when stdout is not a terminal).",
    ),
) -> None:
    """Print the serial console log (or QEMU's log).

    On a terminal, control sequences the guest wrote (ESC, CSI, OSC...) are shown escaped,
    e.g. ^[[6n, so that they cannot drive your terminal; piped, or with --raw, the log's
    bytes pass through as they are.
    """
    from qvm.ops.console import follow_file, read_tail
    from qvm.ops.files import TerminalSafe

    run = resolve.run_dir_of(name)
    path = run.qemu_log if qemu else run.serial_log
    if not path.exists():
        abort(f"{name}: no log yet at {path} (hint: qvm up {name})")
    out = sys.stdout.buffer
    safe = None if raw or not sys.stdout.isatty() else TerminalSafe()
    out.write(safe.feed(read_tail(path, lines)) if safe else read_tail(path, lines))
    out.flush()
    if follow:
        from qvm.supervisor.client import supervisor_alive

        for chunk in follow_file(path, keep_going=lambda: supervisor_alive(run)):
            out.write(safe.feed(chunk) if safe else chunk)
            out.flush()
    if safe:
        out.write(safe.flush())
        out.flush()


@commands.command("console")
def console(name: str = MACHINE) -> None:
    """Attach to the serial console. Detach with Ctrl-] (the VM keeps running).

    Piped input is sent as fast as the guest reads it; at its end, qvm detaches once the
    guest has taken all of it and gone quiet (its answer is printed).
    """
    from qvm.ops.console import ESCAPE_NAME, attach
    from qvm.supervisor.client import supervisor_alive

    run = resolve.run_dir_of(name)
    if not supervisor_alive(run) or not run.console_socket.exists():
        from qvm.errors import NotRunningError

        raise NotRunningError(name)
    if sys.stdin.isatty():
        warn(f"Connected to {name}'s serial console. Detach with {ESCAPE_NAME}.")
    from qvm.ops.console import DRAIN_TIMEOUT

    unread = attach(run.console_socket, sys.stdin.fileno(), sys.stdout.fileno())
    if sys.stdin.isatty():
        warn("\nDetached.")
    if unread:
        abort(
            f"{name}: the guest did not read the last {unread} bytes of the input within "
            f"{DRAIN_TIMEOUT:g} s (hint: is its serial console ready? qvm logs {name})"
        )


@commands.command("cmdline")
def cmdline(
    name: str = Argument(..., help="Machine name or TOML file."),
    as_json: bool = AS_JSON,
) -> None:
    """Print the exact QEMU command line `qvm up` would run. Starts nothing.

    JSON: schemas/cmdline.json
    """
    from qvm.ops.up import plan_launch

    machine = resolve.load(name)
    try:
        plan = plan_launch(machine, resolve.run_dir(machine.name))
    except DefinitionError:
        raise
    if as_json:
        emit_json({"name": machine.name, "argv": list(plan.argv)})
        return
    say(" \\\n  ".join(_pairs(plan.argv)))


def _pairs(argv: list[str]) -> list[str]:
    """Group '-option value' pairs on one line each; still one valid shell command."""
    import shlex  # compiles a regular expression: every command of this module would pay

    quoted = [shlex.quote(a) for a in argv]
    lines: list[str] = [quoted[0]]
    i = 1
    while i < len(argv):
        if argv[i].startswith("-") and i + 1 < len(argv) and not argv[i + 1].startswith("-"):
            lines.append(f"{quoted[i]} {quoted[i + 1]}")
            i += 2
        else:
            lines.append(quoted[i])
            i += 1
    return lines
