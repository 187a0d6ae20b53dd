"""Every kind of device qvm plugs into a running VM, once: the plain facts each consumer
reads (cheap to import: completion and status read it; it imports only ``Record``).

A kind's behaviour (how it is listed, added, removed, and recorded again after a start
from a snapshot) is its own module's in ``qvm.control``, collected by
``qvm.control.kinds``. Who reads this table, and so must know every kind in it
(``tests/unit/layout/test_kinds.py`` walks it against each of them):

- ids: ``qvm.definition.naming`` keeps each kind's ``<id_prefix><N>`` for that kind;
- hotplug: ``qvm.control.kinds`` (one entry per kind), the CLI group of ``group``;
- ``devices.json`` (``qvm.store.devices``): the kinds ``recorded``;
- snapshots (``qvm.store.snapshots``, ``qvm.control.snapshot``): ``snapshot`` says where
  a snapshot's device set keeps the kind, or that a snapshot is refused while one is
  present (never silently left out);
- status and summaries: ``counted``, for the kinds ``shown_in_status``;
- the JSON schemas (``schemas/*.json``): the ``kind`` enumerations;
- shell completion (``qvm.cli.completion``): the ids of ``group`` and of each kind, from
  ``boot_ids`` and the records.

A new kind (a NIC on a network, a shared folder) is one entry here and its own module in
``qvm.control``; docs/design.md ("Extending qvm") has the checklist.
"""

from __future__ import annotations

from qvm.base.record import Record

# where a snapshot's device set keeps a kind (qvm.store.snapshots.DeviceSet)
SNAPSHOT_CPU_SLOTS = "cpu_slots"  # the slots present, by their linear index
SNAPSHOT_MEMORY = "memory"  # MemoryDevice: id, backend, size (a RAM block of the vmstate)
SNAPSHOT_PLUGGED = "plugged"  # PluggedDevice: what the command line needs to recreate it
# QEMU cannot save or recreate it: a snapshot is refused while one is present
SNAPSHOT_REFUSED = "refused"
SNAPSHOT_PARTS = (SNAPSHOT_CPU_SLOTS, SNAPSHOT_MEMORY, SNAPSHOT_PLUGGED, SNAPSHOT_REFUSED)

# where completion finds the ids of a kind's devices besides qvm's records
BOOT_IDS_QEMU = "qemu"  # asked of QEMU (vCPUs: no record keeps them)
BOOT_IDS_DRIVES = "drives"  # the -device options with a drive= in launch.json's argv
BOOT_IDS_NICS = "nics"  # launch.json's NIC ids
BOOT_IDS_NONE = "none"  # only hotplugged ones (qvm's records)
BOOT_IDS_SHARES = "shares"  # shares.json: a share is named by its guest path


class Kind(Record):
    name: str  # "dimm": its name in devices.json, snapshots and JSON output
    noun: str  # "DIMM": how a message names one device
    family: str  # "memory": how a message names what the id prefix is kept for
    group: str  # "mem": its command group (qvm mem add/del/list) and completion key
    id_prefix: str  # "dimm": the ids qvm makes for it are <id_prefix><N>
    recorded: bool  # devices.json records what qvm hotplugged of it
    snapshot: str  # one of SNAPSHOT_PARTS
    counted: tuple[str, str]  # ("DIMM", "DIMMs"): how status and summaries count them
    boot_ids: str  # one of the BOOT_IDS_*: where completion finds the boot ones


CPU = Kind(
    name="cpu",
    noun="vCPU",
    family="vCPU",
    group="cpu",
    id_prefix="cpu",
    recorded=False,
    snapshot=SNAPSHOT_CPU_SLOTS,
    counted=("vCPU", "vCPUs"),
    boot_ids=BOOT_IDS_QEMU,
)
DIMM = Kind(
    name="dimm",
    noun="DIMM",
    family="memory",
    group="mem",
    id_prefix="dimm",
    recorded=True,
    snapshot=SNAPSHOT_MEMORY,
    counted=("DIMM", "DIMMs"),
    boot_ids=BOOT_IDS_NONE,
)
VIRTIO_MEM = Kind(
    name="virtio-mem",
    noun="virtio-mem device",
    family="memory",
    group="mem",
    id_prefix="vmem",
    recorded=True,
    snapshot=SNAPSHOT_MEMORY,
    counted=("virtio-mem", "virtio-mem"),
    boot_ids=BOOT_IDS_NONE,
)
DISK = Kind(
    name="disk",
    noun="disk",
    family="disk",
    group="disk",
    id_prefix="disk",
    recorded=True,
    snapshot=SNAPSHOT_PLUGGED,
    counted=("hotplugged disk", "hotplugged disks"),
    boot_ids=BOOT_IDS_DRIVES,
)
NIC = Kind(
    name="nic",
    noun="NIC",
    family="NIC",
    group="nic",
    id_prefix="net",
    recorded=True,
    snapshot=SNAPSHOT_PLUGGED,
    counted=("hotplugged NIC", "hotplugged NICs"),
    boot_ids=BOOT_IDS_NICS,
)

# how a share reaches the guest: virtiofsd (vhost-user-fs-pci), or QEMU's own 9p server
SHARE_VIAS = ("virtiofs", "9p")
# a host folder (vhost-user-fs-pci, QEMU 7.2 cannot migrate it; 9p is never hotplugged)
SHARE = Kind(
    name="share",
    noun="share",
    family="share",
    group="share",
    id_prefix="fs",
    recorded=False,  # shares.json, by the supervisor that owns their virtiofsd
    snapshot=SNAPSHOT_REFUSED,
    counted=("share", "shares"),
    boot_ids=BOOT_IDS_SHARES,
)

KINDS: tuple[Kind, ...] = (CPU, DIMM, VIRTIO_MEM, DISK, NIC, SHARE)
BY_NAME = {kind.name: kind for kind in KINDS}


def kind_named(name: str) -> Kind | None:
    return BY_NAME.get(name)


def recorded_kinds() -> tuple[str, ...]:
    """The names ``devices.json`` may hold."""
    return tuple(k.name for k in KINDS if k.recorded)


def snapshot_kinds(part: str) -> tuple[str, ...]:
    """The names a snapshot's device set keeps in ``part`` (one of SNAPSHOT_PARTS)."""
    return tuple(k.name for k in KINDS if k.snapshot == part)


def group_kinds(group: str) -> tuple[Kind, ...]:
    """The kinds a command group handles: ``mem`` -> DIMM and virtio-mem."""
    return tuple(k for k in KINDS if k.group == group)


def groups() -> tuple[str, ...]:
    return tuple(dict.fromkeys(k.group for k in KINDS))


def shown_in_status() -> tuple[Kind, ...]:
    """The kinds `qvm status` shows, in this order, each counted under its
    ``counted`` (``count_text``)."""
    return KINDS


def count_text(kind: Kind, count: int) -> str:
    """``2 DIMMs``, ``1 vCPU``."""
    return f"{count} {kind.counted[0] if count == 1 else kind.counted[1]}"
