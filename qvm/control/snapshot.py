"""Snapshots on a running VM, over QMP through the supervisor: QEMU's ``snapshot-save``,
``snapshot-load`` and ``snapshot-delete`` jobs, the block nodes that hold a snapshot, the
device set QEMU has now, and the guest's clock through the agent.

What QEMU 7.2 does here, measured (see the project's qemu-facts):

- ``snapshot-save`` writes the RAM and device state into one qcow2 node (``vmstate``) and
  an internal snapshot into every node of ``devices``; a 256 MiB guest saves in ~0.1 s.
  The VM is stopped during the save and resumed after it.
- ``snapshot-load`` does not check the device set: loaded into a VM with one more vCPU,
  it concludes without error and the guest's memory then says one CPU fewer than QEMU
  has. The caller compares the device sets (``qvm.store.snapshots``) before loading.
- The jobs conclude (``JOB_STATUS_CHANGE``) and wait to be dismissed; a failed job's
  error is in ``query-jobs``. A job that fails before writing the snapshot (ENOSPC in the
  vmstate) leaves no snapshot in any node.

Nothing here prints: every operation returns a record for the caller.
"""

from __future__ import annotations

import os
import shlex
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from qvm.base.record import Record
from qvm.base.text import display_path
from qvm.cmdline.argv import STATE_NODE
from qvm.control.agent import AgentError, open_agent
from qvm.control.guest_exec import run_to_end
from qvm.control.qmp_session import QmpSession
from qvm.control.transaction import peripheral_types, reconcile_devices
from qvm.definition.topology import Topology, slot_index
from qvm.errors import ControlError, QmpTimeoutError, VmStateError
from qvm.layout.kinds import (
    DIMM,
    SNAPSHOT_MEMORY,
    SNAPSHOT_PLUGGED,
    SNAPSHOT_REFUSED,
    VIRTIO_MEM,
    kind_named,
)
from qvm.layout.rundir import RunDir
from qvm.store.guest import parse_interfaces
from qvm.store.launch import LaunchRecord
from qvm.store.shares import read_shares
from qvm.store.snapshots import DeviceSet, MemoryDevice, PluggedDevice
from qvm.supervisor.qmp_replies import (
    BlockNodeInfo,
    ImageSnapshot,
    block_devices,
    hotpluggable_cpus,
    memory_devices,
    memory_summary,
    named_block_nodes,
)

JOB_EVENT = "JOB_STATUS_CHANGE"
JOB_TIMEOUT = 600.0  # a save of many GiB of RAM to a slow disk
JOB_POLL = 0.2  # how often a waiting job's progress is read
SEED_NODE = "cidata"  # the cloud-init seed: read-only, qvm's own, never snapshotted
# (bytes done, bytes in all): how a job reports progress
JobProgress = Callable[[int, int], None]


class BlockNode(Record):
    """A top block node QEMU has: a device's image, or the state disk (no device)."""

    node: str
    device: str | None  # the guest device's id
    file: str
    driver: str
    readonly: bool
    snapshots: tuple[str, ...]  # the tags of its internal snapshots
    snapshot_info: tuple[ImageSnapshot, ...] = ()


def _node(device: str | None, info: BlockNodeInfo) -> BlockNode:
    return BlockNode(
        node=info.node,
        device=device,
        file=info.file,
        driver=info.driver,
        readonly=info.readonly,
        snapshots=tuple(s.name for s in info.snapshots),
        snapshot_info=info.snapshots,
    )


def block_nodes(session: QmpSession) -> list[BlockNode]:
    """Every guest disk's top node, and the state disk's node when QEMU has one."""
    nodes = []
    for block in block_devices(session.execute("query-block")):
        if block.inserted is None:
            continue
        device = block.device_id or block.qdev or block.device or None
        nodes.append(_node(device, block.inserted))
    named = named_block_nodes(session.execute("query-named-block-nodes", {"flat": True}))
    nodes += [_node(None, info) for info in named if info.node == STATE_NODE]
    return nodes


def snapshot_nodes(run: RunDir, nodes: list[BlockNode]) -> list[BlockNode]:
    """The nodes a snapshot goes into: every writable one. Refused (VmStateError, naming
    the disk and the way out), before anything is written, when one cannot take it: a raw
    image, an image used as is (``file =``, or ``disk attach`` of the user's file), or a
    read-only disk (qvm could not vouch that it is the same at restore)."""
    chosen = []
    for node in nodes:
        if node.node == SEED_NODE or node.node == STATE_NODE + "-file":
            continue
        label = f"{run.name}: disk {node.device or node.node} ({node.file})"
        if node.readonly:
            raise VmStateError(
                f"{label} is read-only: qvm cannot record its state, and could not vouch at "
                "restore that it is unchanged (hint: set readonly = false on it, or detach it)"
            )
        if node.driver != "qcow2":
            raise VmStateError(
                f"{label} is {node.driver}: snapshots need qcow2 images (hint: give it as "
                "`base =`, where qvm keeps a qcow2 overlay, or convert it: "
                "qemu-img convert -O qcow2)"
            )
        if Path(node.file).parent != run.path:
            raise VmStateError(
                f"{label} is the user's image, used as is: a snapshot would be written into "
                "it (hint: give it as `base =` instead of `file =`: qvm then keeps an "
                "overlay in the VM's folder)"
            )
        chosen.append(node)
    return chosen


def vmstate_node(nodes: list[BlockNode]) -> BlockNode | None:
    """Where the RAM state goes: the state disk when there is one, else the first disk."""
    state = next((n for n in nodes if n.node == STATE_NODE), None)
    return state or (nodes[0] if nodes else None)


def add_state_node(session: QmpSession, run: RunDir) -> None:
    """The run dir's state.qcow2 (made by the caller) as node ``qvm-state``, at run time."""
    session.execute(
        "blockdev-add",
        {
            "driver": "qcow2",
            "node-name": STATE_NODE,
            "file": {"driver": "file", "filename": str(run.state_disk)},
        },
    )


# --- the device set ----------------------------------------------------------------------


def device_set(
    session: QmpSession, run: RunDir, launch: LaunchRecord, topology: Topology | None
) -> DeviceSet:
    """The device set QEMU has now, as a snapshot records it."""
    cpus = hotpluggable_cpus(session.execute("query-hotpluggable-cpus"))
    present = [slot for slot in cpus if slot.qom_path]
    if topology is None:
        slots = tuple(range(len(present)))
    else:
        slots = tuple(sorted(slot_index(slot.props, topology) for slot in present))
    peripherals = peripheral_types(session)
    refuse_shares(run, launch, peripherals)
    records = reconcile_devices(session, run, set(peripherals))
    plugged = []
    for record in records.values():
        kind = kind_named(record.kind)
        part = kind.snapshot if kind is not None else None
        if part == SNAPSHOT_PLUGGED:
            plugged.append(PluggedDevice.kept_of(record))
        elif part == SNAPSHOT_REFUSED and kind is not None:
            raise VmStateError(
                f"{run.name}: {kind.noun} {record.id} cannot be kept in a snapshot (hint: "
                f"qvm {kind.group} del {run.name} {record.id}, then save)"
            )
        elif part != SNAPSHOT_MEMORY:  # memory devices: QEMU's list below, qvm's or not
            # never silently left out: a kind the table gives no place in a snapshot
            raise ControlError(f"{run.name}: {record.kind} {record.id}: no place in a snapshot")
    memory = []
    for device in memory_devices(session.execute("query-memory-devices")):
        kind_name = VIRTIO_MEM.name if device.type == VIRTIO_MEM.name else DIMM.name
        recorded = records.get(device.id)
        memory.append(
            (
                device.addr or 0,
                MemoryDevice(
                    id=device.id,
                    kind=kind_name,
                    backend=device.backend or "",
                    size=device.backend_size,
                    requested_size=device.requested_size if kind_name == VIRTIO_MEM.name else None,
                    bus=recorded.bus if recorded is not None else None,
                ),
            )
        )
    return DeviceSet(
        cpu_slots=slots,
        memory=tuple(device for _, device in sorted(memory)),
        plugged=tuple(plugged),
        forwards=launch.forwards,
    )


# what QEMU 7.2 cannot migrate, so cannot save: "State blocked by non-migratable device
# '...vhost-user-fs'" (measured); a mounted 9p share blocks migration too (reported)
SHARE_DEVICE_TYPES = ("vhost-user-fs-pci", "virtio-9p-pci")


def refuse_shares(run: RunDir, launch: LaunchRecord, peripherals: dict[str, str]) -> None:
    """A save is refused while the VM has a share, naming it and the way out: QEMU would
    refuse it anyway, and a snapshot without the share would restore a guest whose
    mount lost its device."""
    found = sorted(dev_id for dev_id, kind in peripherals.items() if kind in SHARE_DEVICE_TYPES)
    if not found:
        return
    shares = {share.id: share for share in read_shares(run.shares_file)}
    share = shares.get(found[0])
    named = f"{found[0]} ({share.host} at {share.guest})" if share else found[0]
    if share is not None and share.origin == "qvm":
        way_out = f"qvm share del {run.name} {share.guest}, then save"
    else:
        file = f" of {display_path(launch.machine_file)}" if launch.machine_file else ""
        way_out = f"remove the [[share]]{file} and qvm restart {run.name}, then save"
    more = f" and {len(found) - 1} more" if len(found) > 1 else ""
    raise VmStateError(
        f"{run.name}: share {named}{more} cannot be kept in a snapshot: QEMU 7.2 cannot save "
        f"a VM with a shared folder (hint: {way_out})"
    )


def ram_bytes(session: QmpSession) -> int:
    return memory_summary(session.execute("query-memory-size-summary")).total


# --- jobs --------------------------------------------------------------------------------


def run_job(
    session: QmpSession,
    command: str,
    arguments: dict[str, Any],
    timeout: float = JOB_TIMEOUT,
    progress: JobProgress | None = None,
) -> float:
    """Start a job (``arguments`` carry its ``job-id``), wait until it concludes, dismiss
    it; its seconds. A failed job is a ControlError with QEMU's own message; QEMU ending
    meanwhile, the ControlError of the session (``qemu_exited``)."""
    job_id = arguments["job-id"]
    started = time.monotonic()
    deadline = started + timeout
    with session.listen([JOB_EVENT]) as events:
        session.execute(command, arguments)
        while True:
            event = events.wait(
                lambda e: (e.get("data") or {}).get("id") == job_id,
                min(deadline, time.monotonic() + JOB_POLL),
            )
            job = _job(session, job_id)  # also: QEMU gone is said here, by the session
            if event is not None and (event.get("data") or {}).get("status") == "concluded":
                break
            if job is None:
                raise ControlError(f"{session.name}: {command}: the job {job_id} vanished")
            if job.get("status") == "concluded":
                break
            if progress is not None:
                progress(int(job.get("current-progress", 0)), int(job.get("total-progress", 0)))
            if time.monotonic() > deadline:
                raise QmpTimeoutError(
                    f"{session.name}: {command} did not finish within {timeout:g} s (hint: "
                    f"qvm qmp {session.name} query-jobs; job-cancel id={job_id})"
                )
    job = _job(session, job_id)
    error = job.get("error") if job else None
    session.execute("job-dismiss", {"id": job_id})
    if error:
        raise ControlError(f"{session.name}: {command}: {error}", qemu_desc=str(error))
    return time.monotonic() - started


def _job(session: QmpSession, job_id: str) -> dict[str, Any] | None:
    return next((j for j in session.execute("query-jobs") if j.get("id") == job_id), None)


def job_id(what: str) -> str:
    return f"qvm-{what}-{os.getpid()}"


def save_job(
    session: QmpSession,
    tag: str,
    vmstate: str,
    nodes: list[str],
    progress: JobProgress | None = None,
) -> float:
    arguments = {"job-id": job_id("save"), "tag": tag, "vmstate": vmstate, "devices": nodes}
    return run_job(session, "snapshot-save", arguments, progress=progress)


def load_job(session: QmpSession, tag: str, vmstate: str, nodes: list[str]) -> float:
    arguments = {"job-id": job_id("load"), "tag": tag, "vmstate": vmstate, "devices": nodes}
    return run_job(session, "snapshot-load", arguments)


def delete_job(session: QmpSession, tag: str, nodes: list[str]) -> float:
    arguments = {"job-id": job_id("delete"), "tag": tag, "devices": nodes}
    return run_job(session, "snapshot-delete", arguments)


def save_disk_only(session: QmpSession, tag: str, nodes: list[str]) -> float:
    """An internal snapshot of every node at once, without RAM, the guest running on."""
    started = time.monotonic()
    actions = [
        {"type": "blockdev-snapshot-internal-sync", "data": {"device": node, "name": tag}}
        for node in nodes
    ]
    session.execute("transaction", {"actions": actions})
    return time.monotonic() - started


def vm_clock_ns(nodes: list[BlockNode], node: str, tag: str) -> tuple[int | None, int | None]:
    """(QEMU's virtual clock, the vmstate's size) that QEMU recorded with ``tag``."""
    for block in nodes:
        if block.node != node:
            continue
        for info in block.snapshot_info:
            if info.name == tag:
                return info.vm_clock_ns, info.vm_state_size
    return None, None


# --- the guest's clock -------------------------------------------------------------------

AGENT_WAIT = 1.0  # a snapshot never waits long for an agent that may not be there


def guest_time_ns(run: RunDir) -> int | None:
    """The guest's clock by its agent, or None when no agent answers at once."""
    try:
        with open_agent(run, sync_timeout=AGENT_WAIT, lock_timeout=AGENT_WAIT) as client:
            value = client.execute("guest-get-time", timeout=AGENT_WAIT)
    except (AgentError, VmStateError, OSError):
        return None
    return int(value) if isinstance(value, int) else None


def set_guest_time(run: RunDir, timeout: float = 3.0) -> str:
    """Set the guest's clock to the host's after a restore; what happened, for people.

    qemu-ga's ``guest-set-time`` sets the clock first (settimeofday) and then runs
    ``hwclock -w``, which spins until the RTC's next half second: measured on the Debian
    image under TCG, 0.8-1.3 s of the guest's only vCPU before the reply, and past 3 s
    when the restored guest is busy, when a blocking wait said "not set" of a clock that
    was set. So the command goes once the agent has answered the sync, and its reply is
    not waited for; the next command on the channel resynchronises past it."""
    try:
        with open_agent(run, sync_timeout=timeout, lock_timeout=timeout) as client:
            client.send("guest-set-time", {"time": time.time_ns()})
    except (AgentError, VmStateError, OSError) as error:
        return f"not set: {str(error).removeprefix(run.name + ': ')}"
    return "set to the host's by the guest agent (its reply, after hwclock -w, not awaited)"


# --- a clone's own MACs --------------------------------------------------------------------

MAC_TIMEOUT = 10.0  # a resumed guest's agent answers at once; `ip` under TCG takes ~0.1 s
# arp_notify on for the change: the guest's kernel then sends a gratuitous ARP with the
# new MAC, and QEMU's user-mode network (slirp), which learnt the template's MAC from the
# resumed guest, sends to the new one at once: without it, measured on the Debian image,
# the first ssh connection lost its SYNs to the old MAC for about 4 s. The guest's own
# arp_notify setting is put back.
MAC_SCRIPT = (
    "PATH=/usr/sbin:/usr/bin:/sbin:/bin; f={notify}; old=$(cat $f 2>/dev/null); "
    '[ -n "$old" ] && echo 1 > $f; ip link set dev {name} address {mac}; rc=$?; '
    '[ -n "$old" ] && echo "$old" > $f; exit $rc'
)


def set_guest_macs(run: RunDir, macs: dict[str, tuple[str, str]]) -> str:
    """Give a resumed clone's NICs their own MACs (``macs``: NIC id -> (the template's,
    the clone's)), in the guest: virtio-net's MAC travels in the migration stream, so QEMU
    and the guest's driver both hold the template's. ``ip link set dev IF address MAC``
    through the agent changes the guest's, and the driver hands it to QEMU's device
    (VIRTIO_NET_CTRL_MAC_ADDR_SET), so both say the clone's after it. What happened,
    for people; nothing is raised."""
    if not macs:
        return "no NICs"
    try:
        with open_agent(run, sync_timeout=MAC_TIMEOUT, lock_timeout=MAC_TIMEOUT) as client:
            by_mac = {
                i.mac.lower(): i.name
                for i in parse_interfaces(client.execute("guest-network-get-interfaces"))
                if i.mac
            }
            done, problems = [], []
            for nic, (old, new) in sorted(macs.items()):
                name = by_mac.get(old.lower())
                if name is None:
                    problems.append(f"{nic}: no guest interface has {old}")
                    continue
                script = MAC_SCRIPT.format(
                    notify=shlex.quote(f"/proc/sys/net/ipv4/conf/{name}/arp_notify"),
                    name=shlex.quote(name),
                    mac=shlex.quote(new),
                )
                ended = run_to_end(client, ["/bin/sh", "-c", script], MAC_TIMEOUT)
                if ended is None or ended.status != 0:
                    why = ended.stderr.decode(errors="replace").strip() if ended else "timed out"
                    problems.append(f"{nic}: ip link set {name} failed: {why}")
                else:
                    done.append(f"{name} {new} ({nic})")
    except (AgentError, VmStateError, OSError) as error:
        why = str(error).removeprefix(run.name + ": ")
        return f"not set, the guest keeps the template's: {why}"
    said = f"set in the guest by its agent: {', '.join(done)}" if done else ""
    if problems:
        said += ("; " if said else "") + "not set: " + "; ".join(problems)
    return said
