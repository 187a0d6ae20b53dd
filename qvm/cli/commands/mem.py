"""Memory hotplug commands: mem list, add, del, resize."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from qvm.cli import resolve
from qvm.cli.device_options import size_argument, unplug_problems, unplug_waiting
from qvm.cli.output import (
    abort,
    emit_json,
    human_bytes,
    ms,
    say,
    table,
    warn,
)
from qvm.cli.parsing import declare
from qvm.cli.parsing.declare import AS_JSON, MACHINE, Argument, Commands, Option

if TYPE_CHECKING:
    from qvm.control.memory import MemoryAdd, MemoryState

commands = Commands(
    help="List, add, remove and resize memory devices (DIMMs, virtio-mem) of a running VM."
)


@commands.command("list")
def list_cmd(name: str = MACHINE, as_json: bool = AS_JSON) -> None:
    """Boot memory, every DIMM and virtio-mem device, room left, and what the guest says.

    JSON: schemas/mem-list.json
    """
    from qvm.control.memory import list_memory

    state = list_memory(resolve.run_dir_of(name))
    if as_json:
        emit_json(in_bytes(state.as_json()))
        return
    _say_state(state)


def in_bytes(data: Any) -> Any:
    """``data`` with the guest's MemTotal in bytes (``guest_mem_bytes``), as every size
    in qvm's JSON is; the control layer keeps the guest's own unit, KiB."""
    if isinstance(data, dict):
        data = {key: in_bytes(value) for key, value in data.items()}
        if "guest_mem_kb" in data:
            kb = data.pop("guest_mem_kb")
            data["guest_mem_bytes"] = kb * 1024 if kb is not None else None
    return data


def _say_state(state: MemoryState) -> None:
    rows: list[list[Any]] = [["(boot)", "boot", human_bytes(state.boot), None, None, None]]
    for d in state.devices:
        size = human_bytes(d.size)
        if d.kind == "virtio-mem":
            size += f" of {human_bytes(d.max_size)}"
            if d.requested_size is not None and d.requested_size != d.size:
                size += f" (asked {human_bytes(d.requested_size)})"
        where = f"slot {d.slot}" if d.slot is not None else d.bus
        rows.append([d.id, d.kind, size, where, d.state, d.backend])
    say(table(["ID", "KIND", "SIZE", "WHERE", "STATE", "BACKEND"], rows))
    say(f"{state.name}: {state.summary()}")
    if state.guest_kb is not None:
        say(
            f"{state.name}: the guest reports MemTotal {human_bytes(state.guest_kb * 1024)} "
            "(its own QVM-STATE line on the serial console)"
        )


@commands.command("add")
def add(
    name: str = MACHINE,
    size: str = Argument(..., help='Size, e.g. "256M" or "1G" (a multiple of 2M).'),
    virtio_mem: bool = Option(
        False,
        "--virtio-mem",
        help="Add a virtio-mem device (on a PCIe root port on q35) instead of a DIMM: no "
        "slot, resizable with 'qvm mem resize'; the guest needs a virtio_mem driver. QEMU "
        "7.2 cannot unplug it.",
    ),
    max_size: str | None = Option(
        None,
        "--max",
        help="virtio-mem: the most it may grow to (default: all the room memory.max leaves).",
    ),
    dev_id: str | None = Option(None, "--id", help="Device id (default: dimmN/vmemN)."),
    timeout: float = Option(
        10.0,
        "--timeout",
        help="Seconds to wait for the guest: to plug SIZE (virtio-mem), to have the DIMM's "
        "blocks online (DIMM, when the guest agent answers).",
    ),
    force: bool = declare.FORCE,
    no_online: bool = Option(
        False,
        "--no-online",
        help="DIMM: leave the blocks the guest left offline as they are (and fail).",
    ),
    as_json: bool = AS_JSON,
) -> None:
    """Hotplug a DIMM (object-add memory-backend-ram + device_add pc-dimm), or a virtio-mem
    device.

    A DIMM must be a whole number of the guest's memory blocks (128 MiB on x86-64 Linux).
    When the guest agent answers, qvm waits until the guest has the DIMM's blocks online
    (guest-get-memory-blocks) and onlines those it leaves offline (guest-set-memory-blocks).
    There is no --persist: a DIMM is not boot memory (edit memory.size yourself).

    JSON: schemas/mem-add.json
    """
    timeout = resolve.timeout_seconds(timeout)
    from qvm.cli.progress import run_waiting
    from qvm.control.memory import add_memory

    run = resolve.run_dir_of(name)
    maximum = size_argument(name, "--max", max_size) if max_size is not None else None
    result = run_waiting(
        f"{name}: adding memory, waiting for the guest to use it",
        add_memory,
        run,
        size_argument(name, "SIZE", size),
        virtio_mem=virtio_mem,
        max_size=maximum,
        dev_id=dev_id,
        timeout=timeout,
        force=force,
        online_them=not no_online,
    )
    if as_json:
        emit_json(in_bytes(result.as_json()))
    else:
        device = result.device
        if device.kind == "dimm":
            say(
                f"{name}: added {device.id} (DIMM, {human_bytes(device.size)}, "
                f"slot {device.slot}, backend {device.backend})"
            )
        else:
            where = f" on {device.bus}" if device.bus else ""
            say(
                f"{name}: added {device.id} (virtio-mem{where}, up to "
                f"{human_bytes(device.max_size)}, backend {device.backend})"
            )
            if result.seconds is not None and device.requested_size:
                say(
                    f"{name}: the guest plugged {human_bytes(result.plugged)} "
                    f"after {ms(result.seconds)}"
                )
        if result.forced_after_unplug:
            warn(f"qvm: {name}: added after a vCPU unplug under TCG (--force)")
        say(f"{name}: {result.state.summary()}")
        if device.kind == "dimm":
            _say_guest_blocks(name, result)
    if result.guest is not None and not result.guest.complete:
        _blocks_offline(name, result, timeout, no_online)
    if not result.complete:
        _not_plugged(name, result.device.id, result.plugged, result.device.requested_size, timeout)


def _say_guest_blocks(name: str, result: MemoryAdd) -> None:
    guest = result.guest
    if guest is None:
        say(f"{name}: guest view: {result.source} ({result.source_detail})")
        return
    count = len(guest.blocks)
    size = human_bytes(guest.block_size)
    blocks = f"its {count} memory block{'s' if count != 1 else ''} of {size}"
    if not guest.complete:
        return
    if guest.onlined_by_qvm:
        say(
            f"{name}: the guest left {len(guest.onlined_by_qvm)} of {blocks} offline: qvm "
            f"onlined them (guest-set-memory-blocks); all online after {ms(guest.seconds)} "
            "(guest agent)"
        )
    else:
        say(f"{name}: the guest has {blocks} online after {ms(guest.seconds)} (guest agent)")


def _blocks_offline(name: str, result: MemoryAdd, timeout: float, no_online: bool) -> None:
    guest = result.guest
    assert guest is not None  # the caller asks only about the blocks the agent listed
    offline = len(guest.blocks) - len(guest.online)
    what = f"{offline} of its {len(guest.blocks)} memory blocks"
    if no_online:
        why = f"the guest left {what} offline within {timeout:g} s; --no-online: qvm left them so"
    elif guest.detail:
        why = f"{what} are not online: {guest.detail}"
    else:
        why = f"{what} are not online within {timeout:g} s"
    abort(
        f"{name}: {result.device.id} was added, but {why} (hint: qvm mem list {name}; "
        f"qvm mem del {name} {result.device.id} takes it out again)"
    )


def _not_plugged(
    name: str, dev_id: str, size: int | None, wanted: int | None, timeout: float
) -> None:
    abort(
        f"{name}: {dev_id}: the guest has plugged {human_bytes(size)} of the "
        f"{human_bytes(wanted)} asked within {timeout:g} s; the request stands and the guest "
        "may still complete it (hint: the guest needs a virtio_mem driver; "
        f"qvm mem list {name} shows the size)",
    )


@commands.command("del")
def delete(
    name: str = MACHINE,
    dev_id: str = Argument(..., metavar="ID", help="The DIMM's id (see qvm mem list)."),
    timeout: float = declare.UNPLUG_TIMEOUT,
    as_json: bool = AS_JSON,
) -> None:
    """Unplug a DIMM (device_del), wait for DEVICE_DELETED, then delete its backend.

    Pending (the guest has not released it within --timeout) exits with status 3; the
    request stands, and the backend is deleted when the guest releases the DIMM.

    JSON: schemas/mem-del.json
    """
    from qvm.control.memory import remove_memory

    _, result = unplug_waiting(name, dev_id, timeout, remove_memory)
    unplug = result.unplug
    if as_json:
        emit_json(in_bytes(result.as_json()))
    elif unplug.outcome == "removed":
        backend = f"; deleted its backend {result.device.backend}" if unplug.cleaned else ""
        size = human_bytes(result.device.size)
        say(f"{name}: removed {dev_id} ({size}) in {ms(unplug.seconds)}{backend}")
        say(f"{name}: {result.state.summary()}")
    unplug_problems(name, unplug, "DIMM")


@commands.command("resize")
def resize(
    name: str = MACHINE,
    dev_id: str = Argument(..., metavar="ID", help="The virtio-mem device's id."),
    size: str = Argument(..., help='What the guest should have of it, e.g. "512M" or 0.'),
    timeout: float = Option(10.0, "--timeout", help="Seconds to wait for the guest to reach SIZE."),
    as_json: bool = AS_JSON,
) -> None:
    """Grow or shrink a virtio-mem device (qom-set requested-size) and wait until the guest
    has (MEMORY_DEVICE_SIZE_CHANGE). Not reached in time: exit status 3.

    JSON: schemas/mem-resize.json
    """
    timeout = resolve.timeout_seconds(timeout)
    from qvm.cli.progress import run_waiting
    from qvm.control.memory import resize_memory

    result = run_waiting(
        f"{name}: waiting for the guest to resize {dev_id}",
        resize_memory,
        resolve.run_dir_of(name),
        dev_id,
        size_argument(name, "SIZE", size),
        timeout=timeout,
    )
    if as_json:
        emit_json(in_bytes(result.as_json()))
    elif result.complete:
        say(
            f"{name}: {dev_id}: {human_bytes(result.before)} -> {human_bytes(result.size)} "
            f"in {ms(result.seconds)}"
        )
    if not result.complete:
        _not_plugged(name, dev_id, result.size, result.requested, timeout)
