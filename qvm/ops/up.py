"""From a validated definition to a launch: host checks, resolved inputs, the argv.

``plan_launch`` does every check that needs this host (QEMU's CPU models and machine
types, files, ports, KVM) and resolves what the pure command-line builder cannot know.
It changes nothing on disk: ``prepare_run_dir`` does that, only for a real start.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path

from qvm.base.checking import TYPE_CHECKING
from qvm.base.digest import file_sha256
from qvm.base.record import Record
from qvm.cmdline.argv import LaunchInputs, StartFrom, build_argv, cpu_model, default_cpu_model
from qvm.cmdline.share_mount import boot_mount_argv
from qvm.definition.host_checks import check_host
from qvm.definition.naming import nic_id, overlay_name, share_id, stable_mac
from qvm.definition.schema import Machine
from qvm.definition.topology import topology_of
from qvm.errors import DefinitionError, HostError, Problem, VmStateError
from qvm.host.accel import AccelChoice, choose_accel, probe_kvm
from qvm.host.holders import image_conflicts
from qvm.host.ports import port_holder, port_in_use
from qvm.host.qemu import qemu_capabilities
from qvm.host.qemu_img import detect_format, ensure_overlay, qemu_img_create
from qvm.layout.rundir import RunDir
from qvm.ops.corrupt_state import set_aside_corrupt_state
from qvm.store.launch import Forward, Image, LaunchRecord, SshFacts, Topology
from qvm.store.shares import ShareRecord
from qvm.supervisor.boot import UpResult as UpResult  # start_vm's, which the CLI reads
from qvm.supervisor.boot import run_foreground, start_supervisor

if TYPE_CHECKING:
    from typing import NoReturn

    from qvm.host.cloudinit import SeedPlan
    from qvm.ops.net import Joined

# the state disk holds no guest data: the RAM state of a snapshot lies beyond its end
STATE_DISK_SIZE = 1024**2
# (what is being fetched, bytes done, bytes in all or None): how a download reports
FetchProgress = Callable[[str, int, int | None], None]


class LaunchPlan(Record):
    machine: Machine
    run_dir: RunDir
    accel: AccelChoice
    argv: list[str]
    inputs: LaunchInputs
    seed: SeedPlan | None = None  # the cloud-init seed, with [cloud_init]

    def forwards(self) -> tuple[Forward, ...]:
        """Every port forward of this launch, as QEMU is asked for it: host port 0 is
        bound by QEMU, and the supervisor records the real port (``forwards.json``)."""
        return tuple(
            Forward(
                nic=nic_id(nic_index, nic),
                proto=fwd.protocol,
                host_addr=fwd.host_addr,
                host_port=fwd.host_port,
                guest_port=fwd.guest_port,
            )
            for nic_index, nic in enumerate(self.machine.nics)
            for fwd in nic.forwards
        )

    def images(self) -> tuple[Image, ...]:
        """The files QEMU opens, and whether it writes them (for other VMs' pre-flight)."""
        images = []
        for index, disk in enumerate(self.machine.disks):
            if disk.base is not None:
                images.append(Image(str(disk.base), writable=False))
                overlay = self.run_dir.path / overlay_name(index)
                images.append(Image(str(overlay), writable=not disk.readonly))
            elif disk.file is not None:
                images.append(Image(str(disk.file), writable=not disk.readonly))
        return tuple(images)

    def shares(self) -> tuple[ShareRecord, ...]:
        """The machine file's shares, as the supervisor starts them before QEMU."""
        records = []
        for index, share in enumerate(self.machine.shares):
            ident = share_id(index)
            socket = self.run_dir.share_socket(ident) if share.via == "virtiofs" else None
            records.append(
                ShareRecord(
                    id=ident,
                    host=str(share.host),
                    guest=share.guest,
                    readonly=share.readonly,
                    via=share.via,
                    socket=str(socket) if socket is not None else None,
                )
            )
        return tuple(records)

    def launch_record(self) -> LaunchRecord:
        """What the supervisor and later commands need to know about this run."""
        machine = self.machine
        topo = topology_of(machine.cpu)
        seed = self.seed
        return LaunchRecord(
            name=machine.name,
            machine_file=str(machine.path),
            argv=tuple(self.argv),
            accel=self.accel.accel,
            accel_reason=self.accel.reason,
            machine_type=machine.type,
            cpu_model=cpu_model(machine, self.accel.accel),
            vcpus_boot=machine.cpu.count,
            vcpus_max=machine.cpu.max,
            topology=Topology(topo.sockets, topo.dies, topo.cores, topo.threads),
            memory_size=machine.memory.size,
            memory_max=machine.memory.max,
            memory_slots=machine.memory.slots,
            forwards=self.forwards(),
            nics=tuple(nic_id(index, nic) for index, nic in enumerate(machine.nics)),
            images=self.images(),
            ssh=(
                SshFacts(
                    user=seed.user,
                    identities=tuple(str(p) for p in seed.identities),
                    generated_key=seed.generate_key,
                    user_data_file=str(seed.user_data_file) if seed.user_data_file else None,
                )
                if seed is not None
                else None
            ),
            restart=machine.supervisor.restart,
            max_restarts=machine.supervisor.max_restarts,
            restart_delay=machine.supervisor.restart_delay,
            created=time.time(),
            restart_argv=self.cold_argv(),
            definition_sha256=file_sha256(machine.path),
            shares=self.shares(),
        )

    def cold_argv(self) -> tuple[str, ...] | None:
        """What the restart policy runs after a start from a snapshot or a memory image:
        the definition's cold boot, never the snapshot again; None for a cold start."""
        inputs = self.inputs
        if inputs.loadvm is None and inputs.incoming is None:
            return None
        cold = inputs._replace(
            cpu_slots=None, memory_devices=(), plugged=(), loadvm=None, incoming=None
        )
        return tuple(build_argv(self.machine, cold))


def share_mounts(machine: Machine) -> tuple[tuple[str, ...], ...]:
    """The commands a cloud image's seed mounts the machine's shares with at every boot."""
    return tuple(
        tuple(boot_mount_argv(share_id(index), share.guest, share.via, share.readonly))
        for index, share in enumerate(machine.shares)
    )


def seed_with_networks(seed: SeedPlan, machine: Machine, run: RunDir, joined: Joined) -> SeedPlan:
    """The seed of a VM that has joined its networks: every NIC by its MAC, those on
    networks with their addresses (network-config), and the members' names and
    addresses as the network records say them now (for /etc/hosts)."""
    from qvm.host.cloudinit import SeedInterface  # noqa: PLC0415 -- only with [cloud_init]
    from qvm.ops.net import member_hosts  # noqa: PLC0415 -- only VMs on networks

    on_networks = {nic.nic: nic for nic in joined.nics}
    interfaces = []
    for index, nic in enumerate(machine.nics):
        ident = nic_id(index, nic)
        member = on_networks.get(ident)
        mac = member.mac if member else nic.mac or stable_mac(machine.name, index)
        address = f"{member.address}/{member.prefix}" if member else None
        interfaces.append(SeedInterface(ident, mac, address))
    hosts = member_hosts(run.path.parent, sorted({nic.network for nic in joined.nics}))
    return seed._replace(interfaces=tuple(interfaces), hosts=tuple(hosts))


def plan_launch(machine: Machine, run_dir: RunDir, start: StartFrom | None = None) -> LaunchPlan:
    """``start``: a snapshot's device set and where QEMU starts from (qvm.ops.snapshot)."""
    caps = qemu_capabilities(machine.qemu.binary)
    problems = check_host(machine, caps.cpu_models, caps.machine_types)
    if problems:
        raise DefinitionError(problems)
    accel = choose_accel(machine.accel, probe_kvm())
    _check_model_under_accel(machine, accel)
    _check_images_free(machine, run_dir)
    _check_fixed_ports(machine)
    seed = None
    if machine.cloud_init is not None:
        # only with [cloud_init]; pycdlib comes with it
        from qvm.host.cloudinit import plan_seed  # noqa: PLC0415 -- see the comment above

        seed = plan_seed(machine, run_dir)
        if machine.shares:
            seed = seed._replace(mounts=share_mounts(machine))
    inputs = LaunchInputs(
        accel=accel.accel,
        run_dir=run_dir,
        disk_formats=tuple(
            disk.format or detect_format(disk.file) if disk.file is not None else "qcow2"
            for disk in machine.disks
        ),
        # the RAM state of snapshots: from boot when asked, and always once a save made it
        state_disk=machine.snapshots.enabled or run_dir.state_disk.exists(),
    )
    if start is None and run_dir.clone_file.exists():
        from qvm.ops.incoming import clone_start  # noqa: PLC0415 -- a clone's first start only

        start = clone_start(run_dir)
    if start is not None:
        inputs = inputs._replace(**start._asdict())
    return LaunchPlan(machine, run_dir, accel, build_argv(machine, inputs), inputs, seed)


def _check_images_free(machine: Machine, run_dir: RunDir) -> None:
    """Refuse, before QEMU starts, images another QEMU holds in a conflicting way."""
    images = []
    for index, disk in enumerate(machine.disks):
        if disk.file is not None:
            images.append((f"disk[{index}].file", disk.file, not disk.readonly))
        elif disk.base is not None and disk.base.exists():
            images.append((f"disk[{index}].base", disk.base, False))
    conflicts = image_conflicts(images, run_dir)
    if conflicts:
        raise HostError(
            "\n".join(
                f"{machine.path}: {key}: {path} is in use by {who}" for key, path, who in conflicts
            )
        )


def _check_model_under_accel(machine: Machine, accel: AccelChoice) -> None:
    model = machine.cpu.model or default_cpu_model(accel.accel)
    if accel.kvm_pvm and model in ("host", "max"):
        where = "cpu.model" if machine.cpu.model else 'cpu.model (unset: defaults to "host")'
        raise DefinitionError(
            [
                Problem(
                    str(machine.path),
                    where,
                    f'"{model}" makes QEMU abort under kvm_pvm (failed to set MSR 0x10a)',
                    hint='set a named model such as "qemu64"',
                )
            ]
        )
    if machine.cpu.model == "host" and accel.accel != "kvm":
        raise DefinitionError(
            [
                Problem(
                    str(machine.path),
                    "cpu.model",
                    f'"host" needs KVM, but this VM runs under TCG ({accel.reason})',
                    hint='use "max", a named model, or leave cpu.model unset',
                )
            ]
        )


def _check_fixed_ports(machine: Machine) -> None:
    """Refuse a fixed host port that is taken, naming who holds it: QEMU would only say
    "Could not set up host forwarding rule". Port 0 is QEMU's to bind (``qvm.host.usernet``):
    no probe here, so nothing for two ``up``s at once to race on."""
    for nic_index, nic in enumerate(machine.nics):
        for fwd_index, fwd in enumerate(nic.forwards):
            if fwd.host_port and port_in_use(fwd.host_addr, fwd.host_port, fwd.protocol):
                holder = port_holder(fwd.host_port)
                held = f" by {holder}" if holder else ""
                raise HostError(
                    f"{machine.path}: nic[{nic_index}].forwards[{fwd_index}]: "
                    f"{fwd.protocol} port {fwd.host_addr}:{fwd.host_port} is already in "
                    f"use{held} (hint: pick another host port, or 0 for any free one)"
                )


def start_vm(plan: LaunchPlan, wait: bool, progress: FetchProgress | None = None) -> UpResult:
    """Prepare the run dir and start the VM's supervisor (unless one runs): what both
    `qvm up` and `qvm restart` do. ``wait``: until QMP answers, not only QEMU spawned."""
    set_aside_corrupt_state(plan.run_dir)  # `qvm up` did, and said so; others start too
    on_networks = any(nic.network for nic in plan.machine.nics)
    # the seed of a VM on networks holds its addresses: written once it has joined them
    prepare_run_dir(plan, progress, with_seed=not on_networks)
    if on_networks:
        from qvm.ops.net import join_networks  # noqa: PLC0415 -- only VMs on networks

        with join_networks(plan.machine, plan.run_dir) as joined:
            if plan.seed is not None:
                seed = seed_with_networks(plan.seed, plan.machine, plan.run_dir, joined)
                _write_seed(plan.machine, seed, plan.run_dir)
            result = start_supervisor(plan.run_dir, plan.launch_record(), wait=wait)
        result = result._replace(notes=joined.notes)
    else:
        plan.run_dir.networks_file.unlink(missing_ok=True)
        result = start_supervisor(plan.run_dir, plan.launch_record(), wait=wait)
    if plan.inputs.incoming is not None and wait and not result.already_running:
        from qvm.ops.incoming import (  # noqa: PLC0415 -- as above
            adopt_own_macs,
            note_macs,
            resume_incoming,
            set_clock,
        )
        from qvm.ops.netguest import network_nics, release_links  # noqa: PLC0415 -- as above

        # on a network, the clone has the template's MAC and address until the guest is
        # set up: its links stay cut until then (qvm.ops.netguest)
        cut = network_nics(plan.run_dir) if plan.launch_record().has_agent else ()
        resume_incoming(plan.run_dir, cut)
        adopt_own_macs(plan.run_dir, plan.machine)
        set_clock(plan.run_dir)
        problem = release_links(plan.run_dir, cut)
        if problem is not None:
            note_macs(plan.run_dir, problem)
    return result


def run_in_foreground(
    plan: LaunchPlan, stop_budget: float, progress: FetchProgress | None = None
) -> NoReturn:
    """`qvm up --foreground`: prepare as ``start_vm`` does, then supervise the VM in this
    process until it ends (``qvm.supervisor.boot.run_foreground``); never returns. A
    clone's first start is refused: resuming its memory image takes commands after QEMU
    answers, from a process other than its supervisor."""
    if plan.inputs.incoming is not None:
        name = plan.machine.name
        raise VmStateError(
            f"{name}: a clone's first start resumes its template's memory, which "
            f"--foreground cannot (hint: qvm up {name}, qvm down {name}, then again)"
        )
    set_aside_corrupt_state(plan.run_dir)
    prepare_run_dir(plan, progress)
    run_foreground(plan.run_dir, plan.launch_record(), stop_budget)


def prepare_run_dir(
    plan: LaunchPlan, progress: FetchProgress | None = None, with_seed: bool = True
) -> None:
    """Create the run dir, download base images given by URL (reporting through
    ``progress``), create the disks' overlays (never touching a base image) and, unless
    told otherwise, the cloud-init seed."""
    plan.run_dir.create()
    for index, disk in enumerate(plan.machine.disks):
        if disk.url is not None and disk.base is not None:
            _fetch(plan, index, progress)
        if disk.base is not None:
            base_format = disk.format or detect_format(disk.base)
            overlay = plan.run_dir.path / overlay_name(index)
            ensure_overlay(Path(disk.base), base_format, overlay, disk.size)
    if plan.inputs.state_disk and not plan.run_dir.state_disk.exists():
        qemu_img_create(plan.run_dir.state_disk, STATE_DISK_SIZE)
    if plan.seed is not None and with_seed:
        _write_seed(plan.machine, plan.seed, plan.run_dir)


def _write_seed(machine: Machine, seed: SeedPlan, run: RunDir) -> None:
    from qvm.host.cloudinit import write_seed  # noqa: PLC0415 -- only with [cloud_init]

    write_seed(machine, seed, run)


def _fetch(plan: LaunchPlan, index: int, progress: FetchProgress | None) -> None:
    from qvm.host.images import fetch_image  # noqa: PLC0415 -- only a disk given by URL

    disk = plan.machine.disks[index]
    assert disk.url is not None and disk.base is not None
    algorithm, digest = ("sha512", disk.sha512) if disk.sha512 else ("sha256", disk.sha256)
    report = None
    if progress is not None:
        url = disk.url

        def report(done: int, total: int | None) -> None:
            progress(url, done, total)

    fetch_image(
        disk.url,
        algorithm,
        digest or "",
        disk.base,
        report,
        where=f"{plan.machine.path}: disk[{index}].base",
    )
