"""Clones: `qvm new CLONE --from VM@TAG`, one booted template, many running VMs.

A snapshot with memory is frozen once per template and tag, in ``STATE/VM@TAG/`` (not a
VM name, so never listed as a VM, and outliving `qvm rm VM`): copies of the template's
snapshot images, brought to the snapshot's state by a helper QEMU (``-loadvm TAG -S``,
under its own supervisor) that then writes its RAM and device state as a migration
stream (``migrate exec:cat > memory.bin``: QEMU 7.2 has no ``file:`` URI). The
template's own images are only read.

A clone is a machine file like the template's whose disks are ``base =`` the frozen
copies (so qvm gives it its own overlays), with its own name, MAC and forwards (host
ports picked at start), and a ``clone.json`` in its run dir: its first start is QEMU
with the snapshot's device set and ``-incoming "exec:cat memory.bin"``, which resumes
the guest where the template was (``qvm.ops.up.plan_launch`` asks ``clone_start``).
Later starts boot the clone's disks cold, as any VM's.

The guest keeps what it had in memory: its hostname, its clock (which stood still since
the save: the first start sets it to the host's through the agent, as a restore does,
when an agent answered at the save), and its NICs' MACs: virtio-net's MAC is part of the
migration stream, so QEMU's device and the guest's driver both come back with the
template's whatever ``-device ...,mac=`` says.
The first start therefore sets each NIC's address in the guest through the agent
(``ip link set dev IF address MAC``; the driver passes it on to QEMU's device), and
``clone.json`` says what happened; without an agent the clone keeps the template's MACs,
and says so (each VM has its own user-mode network, so two equal MACs never meet there).
"""

from __future__ import annotations

import shlex
import shutil
import time
import tomllib
from pathlib import Path
from typing import Any

from qvm.base.record import Record
from qvm.cmdline.argv import LaunchInputs, build_argv
from qvm.control.qmp_session import QmpSession
from qvm.control.session import ControlSession
from qvm.definition.naming import overlay_name
from qvm.definition.schema import Machine
from qvm.errors import ControlError, QvmError, VmStateError
from qvm.host.accel import choose_accel, probe_kvm
from qvm.host.qemu_img_snapshots import image_snapshots, qemu_img_snapshot
from qvm.layout.locks import waiting_lock
from qvm.layout.rundir import RunDir
from qvm.ops.frozen import frozen_dir
from qvm.ops.incoming import MIGRATE_TIMEOUT, nic_macs
from qvm.ops.new import write_new
from qvm.ops.snapshot import check_tag, no_snapshot, start_from
from qvm.ops.stop import kill
from qvm.ops.up import LaunchPlan
from qvm.store.snapshots import (
    CloneRecord,
    SnapshotRecord,
    find_snapshot,
    shape_differences,
    shape_of_argv,
    write_clone,
)
from qvm.supervisor.boot import start_supervisor

MEMORY_IMAGE = "memory.bin"


def parse_source(text: str) -> tuple[str, str]:
    """``vm1@booted`` -> (``vm1``, ``booted``)."""
    name, sep, tag = text.partition("@")
    if not sep or not name or not tag:
        raise VmStateError(f"--from {text}: expected VM@TAG, e.g. vm1@booted")
    return name, tag


class CloneResult(Record):
    name: str
    template: str
    tag: str
    machine_file: str
    memory: str
    froze_seconds: float | None  # None: the frozen copy existed already

    def as_json(self) -> dict[str, Any]:
        return self._asdict()


def clone(
    template_run: RunDir,
    template: Machine,
    tag: str,
    clone_name: str,
    clone_path: Path,
    clone_run: RunDir,
) -> CloneResult:
    """Freeze ``template``'s snapshot ``tag`` (once) and write the clone's machine file."""
    check_tag(template_run.name, tag)
    record = find_snapshot(template_run, tag)
    if record is None:
        raise no_snapshot(template_run, tag)
    if record.disk_only:
        raise VmStateError(
            f"{template_run.name}: snapshot {tag!r} holds disks only: a clone starts from "
            f"memory (hint: qvm snapshot save {template_run.name} TAG on the running VM)"
        )
    if record.devices.plugged:
        raise VmStateError(
            f"{template_run.name}: snapshot {tag!r} was taken with hotplugged disks or NICs: "
            "a clone cannot have them (hint: save a snapshot without them)"
        )
    if clone_run.path.exists() and any(clone_run.path.iterdir()):
        raise VmStateError(
            f"{clone_name}: its run dir {clone_run.path} exists (hint: qvm rm {clone_name})"
        )
    frozen = frozen_dir(template_run, tag)
    argv = _frozen_argv(template, frozen, record)
    differences = shape_differences(record.shape, shape_of_argv(argv))
    if differences:
        raise VmStateError(
            f"{template_run.name}: snapshot {tag!r} cannot be cloned: the definition changed: "
            f"{'; '.join(differences[:3])} (hint: undo the change, or take a new snapshot)"
        )
    froze = None
    memory = frozen.path / MEMORY_IMAGE
    frozen.create()
    with waiting_lock(frozen.freeze_lock):  # another clone may be freezing it right now
        if not memory.exists():
            froze = _freeze(template_run, template, record, frozen, argv)
    doc = clone_document(template, frozen, clone_name, tag)
    _share_login_key(template_run, template, frozen, doc)
    machine = write_new(doc, clone_path, clone_run)
    write_clone(
        clone_run,
        CloneRecord(
            template=template_run.name,
            tag=tag,
            memory=str(memory),
            devices=record.devices,
            template_macs=nic_macs(template),
            guest_time_ns=record.guest_time_ns,
        ),
    )
    return CloneResult(
        name=machine.name,
        template=template_run.name,
        tag=tag,
        machine_file=str(machine.path),
        memory=str(memory),
        froze_seconds=froze,
    )


def _share_login_key(
    template_run: RunDir, template: Machine, frozen: RunDir, doc: dict[str, Any]
) -> None:
    """The guest authorized the key pair qvm made for the template: the clone logs in with
    it (a copy beside the frozen images, which outlive the template)."""
    spec = template.cloud_init
    key = template_run.path / "id_ed25519"
    if spec is None or spec.ssh_authorized_keys is not None or spec.user_data is not None:
        return
    if not key.exists():
        return
    for name in ("id_ed25519", "id_ed25519.pub"):
        if not (frozen.path / name).exists():
            shutil.copy2(template_run.path / name, frozen.path / name)
    doc.setdefault("cloud_init", {})["ssh_authorized_keys"] = [str(frozen.path / "id_ed25519.pub")]


def _frozen_machine(template: Machine) -> Machine:
    """The template, as the helper QEMU runs it: no host ports, no restarts (and its
    network NICs joined to no switch: ``LaunchInputs.no_uplinks``)."""
    return template._replace(
        nics=tuple(nic._replace(forwards=()) for nic in template.nics),
        supervisor=template.supervisor._replace(restart="no"),
    )


def _frozen_argv(template: Machine, frozen: RunDir, record: SnapshotRecord) -> list[str]:
    accel = choose_accel(template.accel, probe_kvm()).accel
    inputs = LaunchInputs(
        accel=accel,
        run_dir=frozen,
        disk_formats=tuple("qcow2" for _ in template.disks),
        state_disk=record.vmstate_node == "qvm-state",
        # not user-mode instead: its slirp state would be in the memory image, which the
        # clone's hub could not load
        no_uplinks=True,
    )._replace(**start_from(record)._asdict())
    return [*build_argv(_frozen_machine(template), inputs), "-S"]


def _freeze(
    template_run: RunDir,
    template: Machine,
    record: SnapshotRecord,
    frozen: RunDir,
    argv: list[str],
) -> float:
    """Copies of the snapshot's images at its state, and its memory image."""
    started = time.monotonic()
    frozen.create()
    for file in record.files:
        source = Path(file)
        if not source.exists():
            raise VmStateError(
                f"{template_run.name}: snapshot {record.tag!r} cannot be cloned: {source} is gone"
            )
        shutil.copyfile(source, frozen.path / source.name)
    if template.cloud_init is not None and template_run.seed_image.exists():
        shutil.copyfile(template_run.seed_image, frozen.seed_image)
    accel = choose_accel(template.accel, probe_kvm())
    machine = _frozen_machine(template)._replace(name=template.name)
    inputs = LaunchInputs(accel=accel.accel, run_dir=frozen)
    launch = LaunchPlan(machine, frozen, accel, argv, inputs).launch_record()
    tmp = frozen.path / (MEMORY_IMAGE + ".part")
    try:
        start_supervisor(frozen, launch, wait=True)
        with ControlSession(frozen) as session:
            session.execute("migrate", {"uri": f"exec:cat > {shlex.quote(str(tmp))}"})
            _wait_migration(session, record)
        tmp.rename(frozen.path / MEMORY_IMAGE)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    finally:
        kill(frozen)
    # the copies' active layer is the snapshot's state now: their snapshots only take space
    for index in range(len(template.disks)):
        _drop_snapshots(frozen.path / overlay_name(index))
    frozen.state_disk.unlink(missing_ok=True)
    return round(time.monotonic() - started, 3)


def _wait_migration(session: QmpSession, record: SnapshotRecord) -> None:
    deadline = time.monotonic() + MIGRATE_TIMEOUT
    while True:
        status = session.execute("query-migrate")
        state = status.get("status")
        if state == "completed":
            return
        if state in ("failed", "cancelled"):
            raise ControlError(
                f"{session.name}: writing the memory image of {record.tag!r} failed: "
                f"{status.get('error-desc', state)}"
            )
        if time.monotonic() > deadline:
            raise ControlError(f"{session.name}: the memory image took over {MIGRATE_TIMEOUT} s")
        time.sleep(0.05)


def _drop_snapshots(path: Path) -> None:
    if not path.exists():
        return
    for tag in image_snapshots(path):
        try:
            qemu_img_snapshot("-d", tag, path)
        except QvmError:
            return


def clone_document(template: Machine, frozen: RunDir, clone_name: str, tag: str) -> dict[str, Any]:
    """The clone's machine file: the template's, its disks ``base =`` the frozen copies,
    its paths absolute, host ports picked at start, its NICs on the template's networks
    without MACs or addresses: a MAC the template's file fixes is not taken over either
    (each MAC comes from the clone's name, each address is given at its first start), as
    two VMs with one MAC or address on a switch would take each other's frames."""
    data = tomllib.loads(Path(template.path).read_text())
    data.pop("name", None)
    data.pop("description", None)
    # top-level keys before the tables, or TOML reads them into the last table
    data = {"description": f"clone of {template.name}@{tag}", **data}
    boot = data.get("boot")
    if isinstance(boot, dict):
        for key in ("kernel", "initrd"):
            value = getattr(template.boot, key)
            if value is not None:
                boot[key] = str(value)
    disks = []
    for index, disk in enumerate(template.disks):
        entry: dict[str, Any] = {
            "base": str(frozen.path / overlay_name(index)),
            "format": "qcow2",
            "interface": disk.interface,
        }
        if disk.id is not None:
            entry["id"] = disk.id
        disks.append(entry)
    if disks:
        data["disk"] = disks
    nics = []
    for nic in template.nics:
        entry = {"mode": nic.mode, "model": nic.model}
        if nic.id is not None:
            entry["id"] = nic.id
        if nic.network is not None:  # on the template's network, with its own address
            entry["network"] = nic.network
        if nic.forwards:
            entry["forwards"] = [
                f"{f.protocol}:{f.host_addr}:0:{f.guest_port}" for f in nic.forwards
            ]
        nics.append(entry)
    if nics:
        data["nic"] = nics
    cloud = data.get("cloud_init")
    if isinstance(cloud, dict) and template.cloud_init is not None:
        spec = template.cloud_init
        if spec.user_data is not None:
            cloud["user_data"] = str(spec.user_data)
        if spec.ssh_authorized_keys is not None:
            cloud["ssh_authorized_keys"] = [str(k) for k in spec.ssh_authorized_keys]
    return data
