"""QEMU's replies to the QMP queries qvm asks in more than one place, each parsed once,
here, into a record: the supervisor (its status answer) and the control layer (hotplug,
snapshots) read attributes, never the reply's keys.

A reply is QEMU's, not qvm's: a key QEMU leaves out is a default, never an error (QEMU
7.2's are what the unit tests hold). Stdlib only and without pathlib: the supervisor
imports it.
"""

from __future__ import annotations

from qvm.base.checking import TYPE_CHECKING

if TYPE_CHECKING:
    from typing import Any


from qvm.base.record import Record


def _entries(reply: Any) -> list[dict[str, Any]]:
    return [e for e in reply if isinstance(e, dict)] if isinstance(reply, list) else []


def _object(value: Any) -> dict[str, Any]:
    return value if isinstance(value, dict) else {}


def _int_or_none(value: Any) -> int | None:
    return value if isinstance(value, int) and not isinstance(value, bool) else None


# --- query-memory-devices, query-memory-size-summary ------------------------------------


class QemuMemoryDevice(Record):
    """One entry of ``query-memory-devices``: a DIMM, virtio-mem, NVDIMM... device."""

    id: str
    type: str  # QEMU's: "dimm", "virtio-mem", "nvdimm", ...
    size: int  # bytes plugged now
    backend: str | None  # the memory backend object's id (its QOM path's last part)
    slot: int | None = None  # a DIMM's slot
    max_size: int | None = None  # virtio-mem: its backend's size
    requested_size: int | None = None  # virtio-mem: what the guest is asked to plug
    block_size: int | None = None
    addr: int | None = None

    @property
    def backend_size(self) -> int:
        """The backend's size: virtio-mem's maximum, else what is plugged."""
        return self.max_size if self.max_size is not None else self.size


def memory_devices(reply: Any) -> list[QemuMemoryDevice]:
    devices = []
    for entry in _entries(reply):
        data = _object(entry.get("data"))
        memdev = str(data.get("memdev") or "")
        devices.append(
            QemuMemoryDevice(
                id=str(data.get("id") or ""),
                type=str(entry.get("type") or ""),
                size=_int_or_none(data.get("size")) or 0,
                backend=memdev.rsplit("/", 1)[-1] or None,
                slot=_int_or_none(data.get("slot")),
                max_size=_int_or_none(data.get("max-size")),
                requested_size=_int_or_none(data.get("requested-size")),
                block_size=_int_or_none(data.get("block-size")),
                addr=_int_or_none(data.get("addr", data.get("memaddr"))),
            )
        )
    return devices


class MemorySummary(Record):
    """``query-memory-size-summary``: boot memory and what memory devices plug."""

    base: int | None  # None: QEMU did not say
    plugged: int

    @property
    def total(self) -> int:
        return (self.base or 0) + self.plugged


def memory_summary(reply: Any) -> MemorySummary:
    data = _object(reply)
    return MemorySummary(
        base=_int_or_none(data.get("base-memory")) or None,
        plugged=_int_or_none(data.get("plugged-memory")) or 0,
    )


# --- query-hotpluggable-cpus, query-cpus-fast ---------------------------------------------


class HotpluggableCpu(Record):
    """One vCPU slot of ``query-hotpluggable-cpus``; ``qom_path`` is set when present."""

    type: str
    vcpus_count: int
    props: dict[str, int]  # socket-id, core-id, thread-id, ...
    qom_path: str | None = None


def hotpluggable_cpus(reply: Any) -> list[HotpluggableCpu]:
    slots = []
    for entry in _entries(reply):
        props = _object(entry.get("props"))
        qom_path = entry.get("qom-path")
        slots.append(
            HotpluggableCpu(
                type=str(entry.get("type") or ""),
                vcpus_count=_int_or_none(entry.get("vcpus-count")) or 1,
                props={k: v for k, v in props.items() if _int_or_none(v) is not None},
                qom_path=qom_path if isinstance(qom_path, str) and qom_path else None,
            )
        )
    return slots


class RunningCpu(Record):
    """One vCPU of ``query-cpus-fast``."""

    cpu_index: int | None
    qom_path: str | None
    thread_id: int | None


def cpus_fast(reply: Any) -> list[RunningCpu]:
    return [
        RunningCpu(
            cpu_index=_int_or_none(entry.get("cpu-index")),
            qom_path=entry.get("qom-path") if isinstance(entry.get("qom-path"), str) else None,
            thread_id=_int_or_none(entry.get("thread-id")),
        )
        for entry in _entries(reply)
    ]


# --- query-block, query-named-block-nodes ---------------------------------------------------


class ImageSnapshot(Record):
    """An internal snapshot a qcow2 node holds (``image.snapshots``)."""

    name: str
    vm_clock_ns: int  # QEMU's virtual clock when it was taken
    vm_state_size: int  # bytes of RAM and device state (0: disk only)


class BlockNodeInfo(Record):
    """A block node as QEMU describes it: ``inserted`` of ``query-block``, or an entry of
    ``query-named-block-nodes``."""

    node: str
    file: str  # the image's file name
    driver: str  # "qcow2", "raw", ...
    readonly: bool
    virtual_size: int | None = None
    snapshots: tuple[ImageSnapshot, ...] = ()


class BlockDevice(Record):
    """One entry of ``query-block``: a guest device's drive."""

    qdev: str  # the device's QOM path (``/machine/peripheral/disk1/virtio-backend``)
    device: str  # the legacy drive name ("" for -blockdev drives)
    inserted: BlockNodeInfo | None  # its top node; None when no medium is inserted

    @property
    def device_id(self) -> str | None:
        """The guest device's id, for a device with one (``/machine/peripheral/ID/...``)."""
        parts = self.qdev.split("/")
        if len(parts) >= 4 and parts[1:3] == ["machine", "peripheral"]:
            return parts[3] or None
        return None


def _node_info(data: dict[str, Any]) -> BlockNodeInfo:
    image = _object(data.get("image"))
    snapshots = tuple(
        ImageSnapshot(
            name=str(info.get("name") or ""),
            vm_clock_ns=(_int_or_none(info.get("vm-clock-sec")) or 0) * 10**9
            + (_int_or_none(info.get("vm-clock-nsec")) or 0),
            vm_state_size=_int_or_none(info.get("vm-state-size")) or 0,
        )
        for info in _entries(image.get("snapshots"))
    )
    return BlockNodeInfo(
        node=str(data.get("node-name") or ""),
        file=str(data.get("file") or image.get("filename") or ""),
        driver=str(data.get("drv") or image.get("format") or ""),
        readonly=bool(data.get("ro")),
        virtual_size=_int_or_none(image.get("virtual-size")),
        snapshots=snapshots,
    )


def block_devices(reply: Any) -> list[BlockDevice]:
    devices = []
    for entry in _entries(reply):
        inserted = entry.get("inserted")
        devices.append(
            BlockDevice(
                qdev=str(entry.get("qdev") or ""),
                device=str(entry.get("device") or ""),
                inserted=_node_info(inserted) if isinstance(inserted, dict) and inserted else None,
            )
        )
    return devices


def named_block_nodes(reply: Any) -> list[BlockNodeInfo]:
    return [_node_info(entry) for entry in _entries(reply)]


# --- query-status ------------------------------------------------------------------------------


def runstate(reply: Any, default: str = "unknown") -> str:
    """``query-status``'s ``status``: "running", "paused", "inmigrate", ..."""
    status = reply.get("status") if isinstance(reply, dict) else None
    return status if isinstance(status, str) else default
