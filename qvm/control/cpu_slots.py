"""vCPU slots: what ``query-hotpluggable-cpus`` lists, in the order qvm fills them, and
the choice of the slots ``cpu add`` fills and of the vCPUs ``cpu del`` unplugs.

Slots come from QEMU, never from arithmetic: this module only orders them (QEMU lists
free slots highest first; qvm fills the lowest first) and names the devices it plugs
with the stable ids of ``qvm.definition.topology`` (``cpu<slot index>``, the same ids the
boot-time ``-device`` vCPUs get). Pure: no QMP, no files.
"""

from __future__ import annotations

from qvm.base.checking import TYPE_CHECKING

if TYPE_CHECKING:
    from typing import Any

from collections.abc import Iterable, Sequence

from qvm.base.record import Record
from qvm.definition.topology import Topology, cpu_device_id, slot_index
from qvm.errors import HotplugError, UsageError
from qvm.layout.rundir import RunDir
from qvm.store.launch import LaunchRecord
from qvm.store.pending import PERIPHERAL, PERIPHERAL_ANON, device_state
from qvm.supervisor.qmp_replies import cpus_fast as parse_cpus_fast
from qvm.supervisor.qmp_replies import hotpluggable_cpus

SLOT_KEYS = ("node-id", "drawer-id", "book-id", "socket-id", "die-id", "cluster-id", "core-id")


class CpuSlot(Record):
    """One vCPU slot of the VM, present or free."""

    # position in topology order: slot 0 is the boot vCPU (the field shadows tuple.index)
    index: int  # type: ignore[assignment]
    props: dict[str, int]  # QEMU's dict, as device_add wants it
    type: str  # the device driver for this slot
    vcpus_count: int = 1
    qom_path: str | None = None  # None: the slot is free
    cpu_index: int | None = None
    thread_id: int | None = None
    id: str | None = None  # the device id; None for a vCPU from -smp
    removable: bool = False
    pending: bool = False  # device_del was requested, the guest has not released it
    # the guest agent's word (None: no agent, or it cannot tell): the guest's CPU number
    # and whether the guest has it online
    guest_cpu: int | None = None
    guest_online: bool | None = None

    @property
    def present(self) -> bool:
        return self.qom_path is not None

    @property
    def state(self) -> str:
        if not self.present:
            return "free"
        return device_state(self.pending)

    @property
    def boot(self) -> bool:
        """Started by -smp (not a device): it can never be unplugged."""
        return self.present and not self.removable

    @property
    def label(self) -> str:
        """How the CLI names the vCPU: its id (a QOM path for a device added without
        one), or for a -smp vCPU and a free slot the qvm id the slot would get."""
        if self.id:
            return self.id
        if self.removable and self.qom_path:
            return self.qom_path
        return cpu_device_id(self.index)

    def props_text(self) -> str:
        return props_text(self.props)

    def as_json(self) -> dict[str, Any]:
        return {
            "index": self.index,
            "props": dict(self.props),
            "type": self.type,
            "vcpus_count": self.vcpus_count,
            "present": self.present,
            "state": self.state,
            "qom_path": self.qom_path,
            "cpu_index": self.cpu_index,
            "thread_id": self.thread_id,
            "id": self.id,
            "removable": self.removable,
            "boot": self.boot,
            "guest_cpu": self.guest_cpu,
            "guest_online": self.guest_online,
        }


class CpuList(Record):
    name: str
    slots: list[CpuSlot]
    guest_source: str | None = None  # "agent", or "QEMU only" (then guest_detail says why)
    guest_detail: str | None = None

    @property
    def max(self) -> int:
        return sum(s.vcpus_count for s in self.slots)

    @property
    def present(self) -> int:
        return sum(s.vcpus_count for s in self.slots if s.present)

    @property
    def pending(self) -> int:
        return sum(1 for s in self.slots if s.pending and s.present)

    def free(self) -> list[CpuSlot]:
        """Free slots, lowest first: the order ``cpu add`` fills them in."""
        return [s for s in self.slots if not s.present]

    def summary(self) -> str:
        text = f"{self.present} of {self.max} vCPUs present"
        if self.pending:
            text += f", {self.pending} unplug pending"
        return text


def props_text(props: dict[str, int]) -> str:
    """``socket-id=0,core-id=1,thread-id=0``: outermost level first, as --slot takes it."""
    order = {k: i for i, k in enumerate((*SLOT_KEYS, "thread-id"))}
    keys = sorted(props, key=lambda k: order.get(k, len(order)))
    return ",".join(f"{k}={props[k]}" for k in keys)


def peripheral_id(qom_path: str | None) -> str | None:
    """``/machine/peripheral/cpu2`` -> ``cpu2``; anything else (a -smp vCPU) -> None."""
    if qom_path and qom_path.startswith(PERIPHERAL):
        rest = qom_path[len(PERIPHERAL) :]
        if rest and "/" not in rest:
            return rest
    return None


def slot_order_key(props: dict[str, int], topo: Topology | None) -> tuple[int, ...]:
    if topo is not None:
        return (slot_index(props, topo),)
    return tuple(props.get(k, 0) for k in (*SLOT_KEYS, "thread-id"))


def merge_slots(
    hotpluggable: Sequence[dict[str, Any]],
    cpus_fast: Sequence[dict[str, Any]],
    pending_ids: Iterable[str] = (),
    topo: Topology | None = None,
) -> list[CpuSlot]:
    """One ``CpuSlot`` per entry of ``query-hotpluggable-cpus``, in topology order,
    completed from ``query-cpus-fast`` (cpu index, host thread) and the pending marks."""
    pending = set(pending_ids)
    by_path = {c.qom_path: c for c in parse_cpus_fast(cpus_fast) if c.qom_path}
    slots_of_qemu = hotpluggable_cpus(hotpluggable)
    ordered = sorted(slots_of_qemu, key=lambda h: slot_order_key(h.props, topo))
    slots = []
    for position, entry in enumerate(ordered):
        props = dict(entry.props)
        qom_path = entry.qom_path
        running = by_path.get(qom_path) if qom_path else None
        dev_id = peripheral_id(qom_path)
        index = slot_index(props, topo) if topo is not None else position
        slots.append(
            CpuSlot(
                index=index,
                props=props,
                type=entry.type,
                vcpus_count=entry.vcpus_count,
                qom_path=qom_path,
                cpu_index=running.cpu_index if running else None,
                thread_id=running.thread_id if running else None,
                id=dev_id,
                removable=dev_id is not None or (qom_path or "").startswith(PERIPHERAL_ANON),
                pending=dev_id is not None and dev_id in pending,
            )
        )
    return slots


def parse_slot_spec(text: str) -> dict[str, int]:
    """``socket-id=0,core-id=1,thread-id=0`` -> props (integers, QEMU's key names)."""
    props: dict[str, int] = {}
    for part in text.split(","):
        key, sep, value = part.strip().partition("=")
        if not sep or not key:
            raise ValueError(f"expected key=value pairs like socket-id=0,core-id=1, got {text!r}")
        try:
            props[key.strip()] = int(value)
        except ValueError:
            raise ValueError(f"{key.strip()} must be an integer, got {value!r}") from None
    return props


def topology_from_launch(launch: LaunchRecord) -> Topology | None:
    return Topology(*launch.topology) if launch.topology is not None else None


def check_count(name: str, count: int) -> None:
    """``--count`` of `cpu add`/`cpu del`: a usage error, said before the VM is asked."""
    if count < 1:
        raise UsageError(f"{name}: --count must be at least 1, got {count}")


def choose_free_slots(
    cpus: CpuList,
    count: int,
    slot: dict[str, int] | None,
    launch: LaunchRecord,
    run: RunDir,
) -> list[CpuSlot]:
    """The slots ``cpu add`` will fill: the lowest free ones, or the one asked for."""
    name = run.name
    check_count(name, count)
    if slot is not None:
        if count != 1:
            raise UsageError(f"{name}: --slot names one slot; use it with --count 1")
        matches = [s for s in cpus.slots if all(s.props.get(k) == v for k, v in slot.items())]
        spec = props_text(slot)
        if len(matches) != 1:
            choices = " ".join(s.props_text() for s in cpus.free()) or "none"
            problem = "no vCPU slot" if not matches else f"{len(matches)} vCPU slots match"
            raise HotplugError(
                f"{name}: {problem} {spec} (hint: free slots: {choices}; see qvm cpu list {name})"
            )
        chosen = matches[0]
        if chosen.present:
            holder = chosen.id or "the boot vCPU"
            raise HotplugError(
                f"{name}: slot {chosen.props_text()} is already taken by {holder} "
                f"(hint: qvm cpu list {name} shows the free slots)"
            )
        return [chosen]
    free = cpus.free()
    if len(free) >= count:
        return free[:count]
    where = f"{cpus.present} of {cpus.max} present (maxcpus={cpus.max})"
    # not at the top: `cpu list` reads the slots without the transaction's modules (~9 ms)
    from qvm.control.transaction import restart_hint  # noqa: PLC0415

    hint = restart_hint(run, launch, "cpu.max")
    if not free:
        boot, cpu_max = launch.vcpus_boot, launch.vcpus_max
        if boot is not None and boot == cpu_max and cpus.present == cpu_max:
            raise HotplugError(
                f"{name}: no free vCPU slot: {where}; it was started with cpu.count = "
                f"cpu.max = {cpu_max}, which leaves no slot to hotplug into (hint: {hint})"
            )
        raise HotplugError(f"{name}: no free vCPU slot: {where} (hint: {hint})")
    raise HotplugError(
        f"{name}: only {len(free)} free vCPU slot{'s' if len(free) != 1 else ''} for "
        f"{count} new vCPUs: {where} (hint: add fewer, or {hint})"
    )


def choose_removals(
    cpus: CpuList, ids: Sequence[str] | None, count: int | None, name: str
) -> list[CpuSlot]:
    """The vCPUs ``cpu del`` will unplug: those named, or the ``count`` newest
    (highest slot first: ``cpu add`` fills the lowest free slot, so that is the newest)."""
    removable = [s for s in cpus.slots if s.present and s.removable]
    if ids:
        chosen: list[CpuSlot] = []
        for wanted in ids:
            found = [s for s in cpus.slots if wanted in (s.id, s.qom_path)]
            if found and found[0].removable:
                if found[0] not in chosen:
                    chosen.append(found[0])
                continue
            boot = [s for s in cpus.slots if s.boot and wanted in (s.label, s.qom_path)]
            if found or boot:
                raise HotplugError(
                    f"{name}: {wanted} is a boot vCPU (started by -smp, not as a device): "
                    "it cannot be unplugged"
                )
            free = [s for s in cpus.slots if not s.present and s.label == wanted]
            if free:
                raise HotplugError(
                    f"{name}: {wanted} is not present (its slot {free[0].props_text()} is free)"
                )
            names = ", ".join(s.label for s in removable) or "none"
            raise HotplugError(
                f"{name}: no vCPU with id {wanted!r} (removable: {names}) "
                f"(hint: qvm cpu list {name})"
            )
        return chosen
    wanted_count = 1 if count is None else count
    check_count(name, wanted_count)
    candidates = [s for s in removable if not s.pending]
    if wanted_count > len(candidates):
        names = ", ".join(s.label for s in candidates)
        have = (
            f"only {len(candidates)} can be unplugged ({names})"
            if candidates
            else ("no vCPU can be unplugged")
        )
        pending = f", {cpus.pending} already unplug-pending" if cpus.pending else ""
        raise HotplugError(
            f"{name}: cannot remove {wanted_count} vCPU{'s' if wanted_count != 1 else ''}: "
            f"{have}{pending}; the boot vCPU stays"
        )
    return sorted(candidates, key=lambda s: s.index, reverse=True)[:wanted_count]
