"""vCPU hotplug commands: cpu list, add, del, set."""

from __future__ import annotations

from qvm.base.checking import TYPE_CHECKING
from qvm.cli import resolve
from qvm.cli.output import abort, emit_json, fail_all, human_seconds, ms, say, table, warn
from qvm.cli.parsing.declare import (
    AS_JSON,
    FORCE,
    LIVE,
    MACHINE,
    Argument,
    Commands,
    Option,
    persist_option,
)
from qvm.errors import EXIT_FAILURE, EXIT_PENDING, EXIT_USAGE
from qvm.layout.rundir import RunDir

if TYPE_CHECKING:
    import re
    from typing import Any

    from qvm.control.cpu import AddResult, RemoveResult
    from qvm.control.cpu_slots import CpuSlot

commands = Commands(help="List, add and remove vCPUs of a running VM.")

PERSIST = persist_option("write the new vCPU count into the machine's TOML ([cpu] count)")


@commands.command("list")
def list_cmd(name: str = MACHINE, as_json: bool = AS_JSON, live: bool = LIVE) -> None:
    """Every vCPU slot: present, free or unplug-pending, with QEMU's topology props, and
    (when the guest agent answers) the guest's CPU number and whether it is online: as
    the VM's supervisor last recorded them, or with --live as QEMU and the agent say now.

    JSON: schemas/cpu-list.json
    """
    run = resolve.run_dir_of(name)
    age = guest_age = None
    if live:
        from qvm.control.cpu import list_cpus

        cpus = list_cpus(run)
    else:
        from qvm.control.cpu_record import recorded_cpus

        recorded = recorded_cpus(run)
        cpus, age, guest_age = recorded.cpus, recorded.age, recorded.guest_age
        if recorded.stuck:
            warn(
                f"qvm: {name}: its supervisor is stopped (SIGSTOP?): this is as of"
                f" {human_seconds(age)} ago (hint: qvm status {name})"
            )
    if as_json:
        emit_json(
            [
                {
                    **s.as_json(),
                    "guest_source": cpus.guest_source,
                    "age": age,
                    "guest_age": guest_age,
                }
                for s in cpus.slots
            ]
        )
        return
    rows = [
        [
            s.index,
            s.id or ("(boot)" if s.boot else None),
            s.state,
            _guest_column(s),
            s.props_text(),
            s.cpu_index,
            s.thread_id,
            s.qom_path,
        ]
        for s in cpus.slots
    ]
    say(table(["SLOT", "ID", "STATE", "GUEST", "PROPS", "CPU", "THREAD", "QOM PATH"], rows))
    if cpus.guest_source == "agent":
        when = f", {human_seconds(guest_age)} ago" if guest_age is not None else ""
        say(f"{cpus.name}: GUEST is the guest's own word (guest agent: guest-get-vcpus{when})")
    else:
        say(f"{cpus.name}: GUEST unknown: {cpus.guest_detail} (source: QEMU only)")
    say(cpus.summary())


def _guest_column(slot: CpuSlot) -> str | None:
    """``cpu1 online``: the guest's CPU number and state; ``offline``; None: not told."""
    if slot.guest_online is None:
        return None
    state = "online" if slot.guest_online else "offline"
    return f"cpu{slot.guest_cpu} {state}" if slot.guest_cpu is not None else state


@commands.command("add")
def add(
    name: str = MACHINE,
    count: int = Option(1, "--count", "-n", help="How many vCPUs to add."),
    slot: str | None = Option(
        None,
        "--slot",
        help="Plug into this slot, e.g. socket-id=0,core-id=1,thread-id=0 "
        "(default: the lowest free slots).",
    ),
    wait_guest: bool = Option(
        False,
        "--wait-guest",
        help="Wait until the guest has each new vCPU online: its ACPI _OST reply (a refusal "
        "fails at once), then the guest agent's guest-get-vcpus, onlining (guest-set-vcpus) a "
        "vCPU the guest leaves offline; without an answering agent, the guest starting to run "
        "on the vCPU (read from its registers), which needs a guest that onlines hotplugged "
        "CPUs itself, e.g. with a udev rule (see docs/hotplug.md).",
    ),
    no_online: bool = Option(
        False,
        "--no-online",
        help="With --wait-guest: leave a vCPU the guest left offline as it is (and fail).",
    ),
    wait_serial: str | None = Option(
        None,
        "--wait-serial",
        metavar="REGEX",
        help="Wait until the guest prints a line matching REGEX on its serial console.",
    ),
    timeout: float = Option(10.0, "--timeout", help="Seconds to wait for the guest."),
    force: bool = FORCE,
    persist: bool = PERSIST,
    as_json: bool = AS_JSON,
) -> None:
    """Hotplug vCPUs into free slots (the lowest first), with stable ids cpu<slot>.

    JSON: schemas/cpu-add.json
    """
    timeout = resolve.timeout_seconds(timeout)
    from qvm.cli.progress import run_waiting
    from qvm.control.cpu import add_cpus
    from qvm.control.cpu_slots import parse_slot_spec

    run = resolve.run_dir_of(name)
    props = None
    if slot is not None:
        try:
            props = parse_slot_spec(slot)
        except ValueError as error:
            abort(f"{name}: --slot: {error}", EXIT_USAGE)
    pattern = _compile(name, wait_serial)
    result = run_waiting(
        f"{name}: adding vCPUs, waiting for the guest to bring them online",
        add_cpus,
        run,
        count=count,
        slot=props,
        wait_guest=wait_guest,
        serial_pattern=pattern,
        guest_timeout=timeout,
        force=force,
        online_them=not no_online,
    )
    problems = _add_problems(result)
    persisted = _persist(run, result.present) if persist and not problems else None
    if as_json:
        emit_json({**result.as_json(), "persisted": persisted})
    else:
        _say_added(result)
        say(f"{result.name}: {result.present} of {result.max} vCPUs present")
        _say_persisted(result.name, persist, persisted)
    if problems:
        fail_all(problems, EXIT_FAILURE)


@commands.command("del")
def delete(
    name: str = MACHINE,
    ids: list[str] | None = Argument(
        None, help="vCPU ids to unplug (see qvm cpu list); default: the newest."
    ),
    count: int | None = Option(
        None, "--count", "-n", help="How many vCPUs to unplug, newest (highest slot) first."
    ),
    timeout: float = Option(
        5.0, "--timeout", help="Seconds to wait for the guest to release each vCPU."
    ),
    persist: bool = PERSIST,
    as_json: bool = AS_JSON,
) -> None:
    """Unplug vCPUs and wait until the guest released them.

    Each vCPU ends removed, refused by the guest, or pending: the guest has not released
    it within --timeout. Pending exits with status 3; the request stands, and the slot
    becomes free by itself if the guest releases it later.

    JSON: schemas/cpu-del.json
    """
    timeout = resolve.timeout_seconds(timeout)
    from qvm.cli.progress import run_waiting
    from qvm.control.cpu import remove_cpus

    if ids and count is not None:
        abort(f"{name}: give vCPU ids or --count, not both", EXIT_USAGE)
    if count is not None:
        from qvm.control.cpu_slots import check_count

        check_count(name, count)  # said first, running or not
    run = resolve.run_dir_of(name)
    result = run_waiting(
        f"{name}: waiting for the guest to release the vCPUs",
        remove_cpus,
        run,
        ids=ids or None,
        count=count,
        timeout=timeout,
    )
    persisted = _persist(run, result.present) if persist and result.complete else None
    problems, code = _remove_problems(result)
    if as_json:
        emit_json({**result.as_json(), "persisted": persisted})
    else:
        _say_removed(result)
        say(_present_line(result.name, result.present, result.max, result))
        _say_persisted(result.name, persist, persisted)
    if problems:
        fail_all(problems, code)


@commands.command("set")
def set_cmd(
    name: str = MACHINE,
    target: int = Argument(..., metavar="N", help="How many vCPUs should be present."),
    timeout: float = Option(
        5.0, "--timeout", help="Seconds to wait for the guest (unplug; with --wait-guest, plug)."
    ),
    wait_guest: bool = Option(
        False,
        "--wait-guest",
        help="When adding, wait until the guest has each new vCPU online (as cpu add).",
    ),
    no_online: bool = Option(
        False, "--no-online", help="With --wait-guest: do not online what the guest left offline."
    ),
    force: bool = FORCE,
    persist: bool = PERSIST,
    as_json: bool = AS_JSON,
) -> None:
    """Add or remove vCPUs until N are present, reporting each step.

    JSON: schemas/cpu-set.json
    """
    timeout = resolve.timeout_seconds(timeout)
    from qvm.cli.progress import run_waiting
    from qvm.control.cpu import set_cpus

    run = resolve.run_dir_of(name)
    result = run_waiting(
        f"{name}: waiting for the guest to reach {target} vCPUs",
        set_cpus,
        run,
        target,
        timeout=timeout,
        wait_guest=wait_guest,
        guest_timeout=timeout,
        force=force,
        online_them=not no_online,
    )
    problems: list[str] = []
    code = EXIT_FAILURE
    if result.added is not None:
        problems += _add_problems(result.added)
    if result.removed is not None:
        more, code = _remove_problems(result.removed)
        problems += more
    persisted = _persist(run, result.present) if persist and result.complete else None
    if as_json:
        emit_json({**result.as_json(), "persisted": persisted})
    else:
        if result.target == result.before:
            say(f"{name}: already {result.before} vCPUs present: nothing to do")
        else:
            say(f"{result.name}: {result.before} -> {result.target} vCPUs")
        if result.added is not None:
            _say_added(result.added)
        if result.removed is not None:
            _say_removed(result.removed)
        say(_present_line(result.name, result.present, result.max, result.removed))
        _say_persisted(result.name, persist, persisted)
    if problems:
        fail_all(problems, code)


# --- rendering ---------------------------------------------------------------------------


def _compile(name: str, pattern: str | None) -> re.Pattern[str] | None:
    if pattern is None:
        return None
    import re  # `cpu list` compiles nothing

    try:
        return re.compile(pattern)
    except re.error as error:
        abort(f"{name}: --wait-serial: not a regular expression: {error}", EXIT_USAGE)


def _say_added(result: AddResult) -> None:
    for cpu in result.added:
        line = f"{result.name}: added {cpu.id} ({_props(cpu.props)})"
        seen = []
        if cpu.acknowledged:
            seen.append(f"the guest acknowledged it (ACPI _OST) after {ms(cpu.ack_seconds)}")
        if cpu.online and cpu.onlined_by_qvm:
            seen.append(
                f"the guest left it offline, qvm onlined it (guest-set-vcpus) as guest CPU "
                f"{cpu.guest_cpu}: online after {ms(cpu.online_seconds)}"
            )
        elif cpu.online:
            seen.append(f"online after {ms(cpu.online_seconds)}")
        if seen:
            line += "; " + ", ".join(seen)
        say(line)
    online = [cpu for cpu in result.added if cpu.online]
    if result.source == "agent" and online:
        which = ", ".join(f"{cpu.id} is guest CPU {cpu.guest_cpu}" for cpu in online)
        say(f"{result.name}: online by the guest's word (guest agent, guest-get-vcpus): {which}")
    elif result.source is not None and online:
        say(
            f"{result.name}: online read from the vCPUs' registers (QEMU only: "
            f"{result.source_detail})"
        )
    if result.forced_after_unplug:
        warn(f"qvm: {result.name}: added after a vCPU unplug under TCG (--force)")
    if result.serial is not None and result.serial.matched is not None:
        say(
            f"{result.name}: the guest printed {result.serial.matched!r} "
            f"after {ms(result.serial.seconds)}"
        )


def _add_problems(result: AddResult) -> list[str]:
    problems = []
    for cpu in result.added:
        if not result.waited_guest or cpu.online:
            continue
        not_started = f"was added but not started by the guest within {result.guest_timeout:g} s"
        as_cpu = f" (guest CPU {cpu.guest_cpu})" if cpu.guest_cpu is not None else ""
        if result.source == "agent" and cpu.onlined_by_qvm and cpu.online_detail:
            why = f"was added{as_cpu}; the guest left it offline and refused to online it: "
            why += cpu.online_detail
        elif result.source == "agent" and cpu.guest_cpu is not None and result.no_online:
            why = (
                f"was added{as_cpu}, but the guest left it offline within "
                f"{result.guest_timeout:g} s; --no-online: qvm left it so (hint: without "
                "--no-online qvm onlines it through the guest agent)"
            )
        elif result.source == "agent" and cpu.guest_cpu is not None:
            why = f"was added{as_cpu}, but the guest agent says it is offline"
            why += f": {cpu.online_detail}" if cpu.online_detail else ""
        elif result.source == "agent" and not cpu.ack_detail:
            why = (
                f"was added, but the guest agent lists no new CPU for it within "
                f"{result.guest_timeout:g} s"
            )
        elif cpu.ack_detail:
            why = f"was added, but the guest rejected it ({cpu.ack_detail})"
        elif cpu.online is None:
            why = (
                "was added, but qvm could not tell whether the guest started it: "
                f"{cpu.online_detail}"
            )
        elif not cpu.acknowledged:
            why = (
                f"{not_started}; the guest did not acknowledge it either (no guest OS, or its "
                "ACPI CPU hotplug is not active)"
            )
        else:
            why = (
                f"{not_started}; the guest acknowledged it (ACPI _OST) after "
                f"{ms(cpu.ack_seconds)} but has not onlined it (hint: the guest must online "
                "hotplugged CPUs itself, e.g. with a udev rule; see docs/hotplug.md)"
            )
        problems.append(f"{result.name}: {cpu.id} {why}")
    if result.serial is not None and result.serial.matched is None:
        problems.append(
            f"{result.name}: the guest printed nothing matching /{result.serial.pattern}/ "
            f"within {result.guest_timeout:g} s (the vCPUs were added)"
        )
    return problems


def _say_removed(result: RemoveResult) -> None:
    for unplug in result.unplugs:
        if unplug.outcome == "removed":
            where = _props(unplug.props)
            if unplug.guest_offlined:
                first = f"; the guest offlined its CPU {unplug.guest_cpu} first (guest agent)"
            elif result.source == "agent":
                first = "; it was not online in the guest (guest agent)"
            else:
                first = f" (QEMU only: {result.source_detail})"
            say(f"{result.name}: removed {unplug.id} ({where}) in {ms(unplug.seconds)}{first}")


def _remove_problems(result: RemoveResult) -> tuple[list[str], int]:
    problems = []
    code = EXIT_FAILURE
    for unplug in result.unplugs:
        if unplug.outcome == "refused":
            detail = unplug.detail or "the guest refused it"
            prefix = f"{result.name}: "
            text = detail if detail.startswith(prefix) else f"{prefix}{unplug.id}: {detail}"
            problems.append(f"{text}; the vCPU stays")
    pending = [u for u in result.unplugs if u.outcome == "pending"]
    if pending:
        ids = ", ".join(u.id for u in pending)
        why = pending[0].detail
        problems.append(
            f"{result.name}: unplug of {ids} pending: {why}. The request stands: the "
            f"vCPU stays in the VM, 'qvm cpu list {result.name}' shows it as unplug-pending, "
            "and its slot becomes free by itself if the guest releases it later "
            f"(hint: check that the guest can offline CPUs; qvm restart {result.name} ends it)"
        )
        if not any(u.outcome == "refused" for u in result.unplugs):
            code = EXIT_PENDING
    return problems, code


def _present_line(name: str, present: int, maximum: int, removed: RemoveResult | None) -> str:
    line = f"{name}: {present} of {maximum} vCPUs present"
    pending = len(removed.ids("pending")) if removed is not None else 0
    if pending:
        line += f", {pending} unplug pending"
    return line


def _persist(run: RunDir, count: int) -> dict[str, Any] | None:
    from qvm.base.text import display_path
    from qvm.cli.device_options import follow_persist, machine_file
    from qvm.definition.persist import persist_cpu_count

    done = persist_cpu_count(machine_file(run), count)
    follow_persist(run, done)
    return {"file": display_path(done.path), "key": done.key, "old": done.old, "new": done.new}


def _say_persisted(name: str, asked: bool, persisted: dict[str, Any] | None) -> None:
    if not asked:
        return
    if persisted is None:
        warn(f"qvm: {name}: --persist: not written, the live change did not complete")
    elif persisted["old"] == persisted["new"]:
        say(f"{name}: {persisted['file']} already has cpu.count = {persisted['new']}")
    else:
        say(f"{name}: wrote cpu.count = {persisted['new']} to {persisted['file']}")


def _props(props: dict[str, int]) -> str:
    from qvm.control.cpu_slots import props_text

    return props_text(props)
