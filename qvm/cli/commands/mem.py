"""Memory hotplug commands: mem list, add, del, resize."""

from __future__ import annotations

from typing import Any

from qvm.cli import resolve
from qvm.cli.device_options import AS_JSON, FORCE, UNPLUG_TIMEOUT, size_argument, unplug_problems
from qvm.cli.output import (
    abort,
    emit_json,
    human_bytes,
    ms,
    say,
    table,
    warn,
)
from qvm.cli.parsing.declare import Argument, Commands, Option

commands = Commands(
    help="List, add, remove and resize memory devices (DIMMs, virtio-mem) of a running VM."
)


@commands.command("list")
def list_cmd(
    name: str = Argument(..., help="Machine name."),
    as_json: bool = AS_JSON,
) -> None:
    """Boot memory, every DIMM and virtio-mem device, room left, and what the guest says."""
    from qvm.control.memory import list_memory

    state = list_memory(resolve.run_dir_of(name))
    if as_json:
        emit_json(state.as_json())
        return
    _say_state(state)


def _say_state(state: Any) -> None:
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
    name: str = Argument(..., help="Machine name."),
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
        10.0, "--timeout", help="virtio-mem: seconds to wait for the guest to plug SIZE."
    ),
    force: bool = FORCE,
    as_json: bool = AS_JSON,
) -> None:
    """Hotplug a DIMM (object-add memory-backend-ram + device_add pc-dimm), or a virtio-mem
    device. There is no --persist: a DIMM is not boot memory (edit memory.size yourself)."""
    timeout = resolve.timeout_seconds(timeout)
    from qvm.control.memory import add_memory

    run = resolve.run_dir_of(name)
    maximum = size_argument(name, "--max", max_size) if max_size is not None else None
    result = add_memory(
        run,
        size_argument(name, "SIZE", size),
        virtio_mem=virtio_mem,
        max_size=maximum,
        dev_id=dev_id,
        timeout=timeout,
        force=force,
    )
    if as_json:
        emit_json(result.as_json())
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
    if not result.complete:
        _not_plugged(name, result.device.id, result.plugged, result.device.requested_size, timeout)


def _not_plugged(name: str, dev_id: str, size: Any, wanted: Any, timeout: float) -> None:
    abort(
        f"{name}: {dev_id}: the guest has plugged {human_bytes(size)} of the "
        f"{human_bytes(wanted)} asked within {timeout:g} s; the request stands and the guest "
        "may still complete it (hint: the guest needs a virtio_mem driver; "
        f"qvm mem list {name} shows the size)",
        )


@commands.command("del")
def delete(
    name: str = Argument(..., help="Machine name."),
    dev_id: str = Argument(..., metavar="ID", help="The DIMM's id (see qvm mem list)."),
    timeout: float = UNPLUG_TIMEOUT,
    as_json: bool = AS_JSON,
) -> None:
    """Unplug a DIMM (device_del), wait for DEVICE_DELETED, then delete its backend.

    Pending (the guest has not released it within --timeout) exits with status 3; the
    request stands, and the backend is deleted when the guest releases the DIMM.
    """
    timeout = resolve.timeout_seconds(timeout)
    from qvm.control.memory import remove_memory

    result = remove_memory(resolve.run_dir_of(name), dev_id, timeout=timeout)
    unplug = result.unplug
    if as_json:
        emit_json(result.as_json())
    elif unplug.outcome == "removed":
        backend = f"; deleted its backend {result.device.backend}" if unplug.cleaned else ""
        size = human_bytes(result.device.size)
        say(f"{name}: removed {dev_id} ({size}) in {ms(unplug.seconds)}{backend}")
        say(f"{name}: {result.state.summary()}")
    unplug_problems(name, unplug, "DIMM")


@commands.command("resize")
def resize(
    name: str = Argument(..., help="Machine name."),
    dev_id: str = Argument(..., metavar="ID", help="The virtio-mem device's id."),
    size: str = Argument(..., help='What the guest should have of it, e.g. "512M" or 0.'),
    timeout: float = Option(10.0, "--timeout", help="Seconds to wait for the guest to reach SIZE."),
    as_json: bool = AS_JSON,
) -> None:
    """Grow or shrink a virtio-mem device (qom-set requested-size) and wait until the guest
    has (MEMORY_DEVICE_SIZE_CHANGE). Not reached in time: exit status 3."""
    timeout = resolve.timeout_seconds(timeout)
    from qvm.control.memory import resize_memory

    result = resize_memory(
        resolve.run_dir_of(name), dev_id, size_argument(name, "SIZE", size), timeout=timeout
    )
    if as_json:
        emit_json(result.as_json())
    elif result.complete:
        say(
            f"{name}: {dev_id}: {human_bytes(result.before)} -> {human_bytes(result.size)} "
            f"in {ms(result.seconds)}"
        )
    if not result.complete:
        _not_plugged(name, dev_id, result.size, result.requested, timeout)
