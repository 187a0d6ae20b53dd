"""Machine definitions: a TOML file parsed and validated into frozen, typed objects.

Parsing collects every problem before giving up, so a user fixes a file in one pass.
Checks that need this host's QEMU (CPU models, machine types) or the file system
(kernels, images) live in ``qvm.definition.host_checks`` and run at ``up``, not at load.

The records are ``qvm.base.record.Record``s: as class attributes their fields are
accessors, so defaults come from ``_field_defaults``.
"""

from __future__ import annotations

import math
import os
import re
from pathlib import Path

from qvm.base.checking import TYPE_CHECKING
from qvm.base.sizes import format_size
from qvm.definition.forwards import FORWARD_HINT, ForwardError, parse_forward
from qvm.definition.naming import (
    disk_node_name,
    generated_id_kind,
    hotplug_port_id,
    nic_id,
    pci_ports,
)
from qvm.definition.networks import read_network_keys
from qvm.definition.parsed import parse_toml
from qvm.definition.reader import Report, Table, expand_path, find_nul, is_int, shown
from qvm.definition.schema import (
    ACCELS,
    DISK_FORMATS,
    DISK_INTERFACES,
    MACHINE_TYPES,
    MAX_CPUS,
    MAX_MEMORY_SLOTS,
    MAX_PCI_SLOTS,
    MIN_MEMORY,
    NIC_MODELS,
    NIC_MODES,
    RESTART_POLICIES,
    SEED_DEVICE_ID,
    TOP_LEVEL_KEYS,
    USER_PATTERN,
    AgentSpec,
    BootSpec,
    CloudInitSpec,
    CpuSpec,
    DiskSpec,
    HotplugSpec,
    Machine,
    MemorySpec,
    NicSpec,
    PortForward,
    QemuSpec,
    SerialSpec,
    ShareSpec,
    SnapshotsSpec,
    SupervisorSpec,
)
from qvm.errors import DefinitionError, Problem
from qvm.layout.cache import cached_image
from qvm.layout.names import NAME_RULE, is_vm_name

if TYPE_CHECKING:
    from typing import Any

_MIB = 1024**2
_MAC = r"[0-9a-fA-F]{2}(?::[0-9a-fA-F]{2}){5}"


# --- the sections of a machine file ---------------------------------------------


def _suggest_name(text: str) -> str | None:
    candidate = re.sub(r"[^a-z0-9_-]+", "-", text.lower()).strip("-_")[:63]
    return candidate if is_vm_name(candidate) else None


def _read_name(root: Table, path: Path, override: str | None) -> str:
    in_file = root.string("name", None)
    if in_file is not None and not is_vm_name(in_file):
        root.fail("name", f"must be {NAME_RULE}")
    if override is not None:
        if not is_vm_name(override):
            root.report.add("name", f"must be {NAME_RULE}", shown(override))
        return override
    if "name" in root.data:
        return in_file or ""
    stem = path.stem
    if not is_vm_name(stem):
        suggestion = _suggest_name(stem)
        hint = (
            f'set name = "{suggestion}" in the file, or rename it to {suggestion}.toml'
            if suggestion
            else "set name in the file, or rename it"
        )
        root.report.add(
            "name",
            f"not set, and the file's name is not a valid machine name ({NAME_RULE})",
            shown(stem),
            hint,
        )
    return stem


def _read_cpu(cpu: Table, machine_type: str) -> CpuSpec:
    model = cpu.string("model", None)
    count = cpu.integer("count", 1, minimum=1)
    cpu_max = cpu.integer("max", count, minimum=1)
    topology = {name: cpu.integer(name, None, minimum=1) for name in _TOPOLOGY}
    if cpu.ok("count", "max"):
        _check_cpu_counts(cpu, count, cpu_max, machine_type)
    filled = _fill_topology(cpu, topology, count, cpu_max)
    sockets, dies, cores, threads = filled or (None, None, None, None)
    return CpuSpec(model, count, cpu_max, sockets, dies, cores, threads)


_TOPOLOGY = ("sockets", "dies", "cores", "threads")
_CPU_LIMIT_HINT = f"QEMU allows at most {MAX_CPUS} vCPUs"


def _check_cpu_counts(cpu: Table, count: int, cpu_max: int, machine_type: str) -> None:
    if count > MAX_CPUS:
        cpu.fail("count", f"must be <= {MAX_CPUS}", _CPU_LIMIT_HINT)
    if cpu.given("max") and cpu_max > MAX_CPUS:
        cpu.fail("max", f"must be <= {MAX_CPUS}", _CPU_LIMIT_HINT)
    if not cpu.ok("count", "max"):
        return
    if count > cpu_max:
        cpu.fail("count", f"must be <= cpu.max ({cpu_max})", "raise cpu.max")
    elif machine_type == "microvm" and cpu_max != count:
        cpu.fail(
            "max",
            f"must equal cpu.count ({count}) on microvm",
            "microvm has no CPU hotplug; use q35",
        )


def _fill_topology(
    cpu: Table, given: dict[str, int | None], count: int, cpu_max: int
) -> tuple[int, int, int, int] | None:
    """sockets, dies, cores, threads with the missing ones filled in; None if none is set.

    None as well when the topology cannot be checked or is wrong, after reporting why.
    """
    if not any(name in cpu.data for name in _TOPOLOGY):
        return None
    if not cpu.ok("count", "max", *_TOPOLOGY):
        return None
    dies = given["dies"] or 1
    threads = given["threads"] or 1
    sockets = given["sockets"]
    cores = given["cores"]
    if sockets is None and cores is None:
        sockets = cores = 1
    elif sockets is None:
        sockets = _derive_topology(
            cpu, "sockets", cpu_max, ("dies", dies), ("cores", cores), ("threads", threads)
        )
    elif cores is None:
        cores = _derive_topology(
            cpu, "cores", cpu_max, ("sockets", sockets), ("dies", dies), ("threads", threads)
        )
    if sockets is None or cores is None:
        return None
    product = sockets * dies * cores * threads
    if product != cpu_max:
        hint = None
        if not cpu.given("max") and product >= count:
            hint = f"cpu.max defaults to cpu.count; set cpu.max = {product}"
        cpu.report.add(
            cpu.where,
            f"sockets*dies*cores*threads must equal cpu.max ({cpu_max})",
            f"{sockets}*{dies}*{cores}*{threads} = {product}",
            hint,
        )
        return None
    return sockets, dies, cores, threads


def _derive_topology(
    cpu: Table, missing: str, cpu_max: int, *others: tuple[str, int | None]
) -> int | None:
    """``missing`` as cpu.max divided by the ``others``, if that divides exactly."""
    divisor = math.prod(value or 1 for _, value in others)
    if cpu_max % divisor == 0:
        return cpu_max // divisor
    names = "*".join(name for name, _ in others)
    values = "*".join(str(value) for _, value in others)
    cpu.fail(
        missing,
        f"cannot be derived: cpu.max ({cpu_max}) is not a multiple of"
        f" {names} = {values} = {divisor}",
        f"set cpu.{missing} or change cpu.max",
    )
    return None


def _read_memory(memory: Table, machine_type: str) -> MemorySpec:
    size = memory.size("size", MemorySpec._field_defaults["size"])
    if memory.given("size"):
        _check_memory_size(memory, "size", size)
    memory_max = memory.size("max", None)
    if memory_max is not None:
        _check_memory_size(memory, "max", memory_max)
    slots = memory.integer("slots", 0, minimum=0, maximum=MAX_MEMORY_SLOTS)
    if machine_type == "microvm":
        for name in ("max", "slots"):
            if memory.given(name):
                memory.fail(
                    name, "not supported on microvm", "microvm has no memory hotplug; use q35"
                )
        return MemorySpec(size=size)
    if memory.ok("size", "max", "slots"):
        _check_memory_hotplug(memory, size, memory_max, slots)
    return MemorySpec(size, memory_max, slots, memory.boolean("shared", False))


def _check_memory_size(memory: Table, name: str, size: int) -> None:
    if size < MIN_MEMORY:
        raw = memory.data[name]
        hint = None
        if is_int(raw) or (isinstance(raw, str) and raw.strip().isdigit()):
            hint = f'a bare number means bytes; did you mean "{str(raw).strip()}M"?'
        memory.fail(name, f"must be at least {format_size(MIN_MEMORY)}", hint)
    elif size % _MIB:
        memory.fail(name, "must be a multiple of 1M")


def _check_memory_hotplug(memory: Table, size: int, memory_max: int | None, slots: int) -> None:
    if memory_max is not None and memory_max < size:
        memory.fail("max", f"must be >= memory.size ({format_size(size)})")
    elif memory_max is not None and memory_max > size and slots == 0:
        memory.fail(
            "slots",
            f"must be >= 1 when memory.max ({format_size(memory_max)})"
            f" is larger than memory.size ({format_size(size)})",
            "set memory.slots",
        )
    if slots >= 1 and memory_max is None:
        memory.fail(
            "max",
            "required when memory.slots is set",
            "set memory.max to the most memory the VM may grow to",
        )


def _read_boot(boot: Table, base_dir: Path) -> BootSpec:
    kernel = boot.path("kernel", base_dir)
    initrd = boot.path("initrd", base_dir)
    append = boot.string("append", None, allow_empty=True)
    if "kernel" not in boot.data:
        for name in ("initrd", "append"):
            if boot.given(name):
                boot.fail(name, "needs boot.kernel", f"set boot.kernel or remove boot.{name}")
    return BootSpec(kernel, initrd, append)


def _read_disk(disk: Table, base_dir: Path) -> DiskSpec:
    file = disk.path("file", base_dir)
    url, base, checksums = _read_base(disk, base_dir)
    size = disk.size("size", None)
    if size == 0:
        disk.fail("size", "must be > 0")
    has_file, has_base = "file" in disk.data, "base" in disk.data
    if has_file and has_base:
        disk.report.add(disk.where, "file and base are mutually exclusive", hint=_DISK_HINT)
    elif not has_file and not has_base:
        disk.report.add(disk.where, "needs file or base", hint=_DISK_HINT)
    elif has_file and disk.given("size"):
        disk.fail(
            "size",
            "only allowed with base",
            "qvm uses a file disk as is; resize it with qemu-img resize",
        )
    if isinstance(disk.data.get("file"), str) and disk.data["file"].startswith(
        ("http://", "https://")
    ):
        disk.fail("file", "must be a local path", "a downloaded image goes in base = URL")
    return DiskSpec(
        file=file,
        base=base,
        size=size,
        format=disk.choice("format", DISK_FORMATS, None),
        interface=disk.choice("interface", DISK_INTERFACES, "virtio"),
        readonly=disk.boolean("readonly", False),
        id=disk.identifier("id"),
        url=url,
        sha256=checksums.get("sha256"),
        sha512=checksums.get("sha512"),
    )


def _read_base(disk: Table, base_dir: Path) -> tuple[str | None, Path | None, dict[str, str]]:
    """base as (URL or None, the image file, checksums): a URL's file is in the cache."""
    # only machine files with a [[disk]] base read it: not on `list` and `status` of the rest
    from qvm.base.urls import DIGESTS, is_url  # noqa: PLC0415

    checksums = {}
    for algorithm, length in DIGESTS.items():
        digest = disk.string(algorithm, None)
        if digest is None:
            continue
        if not re.fullmatch(f"[0-9a-fA-F]{{{length}}}", digest):
            disk.fail(algorithm, f"must be {length} hexadecimal digits")
        else:
            checksums[algorithm] = digest.lower()
    text = disk.data.get("base")
    if not (isinstance(text, str) and is_url(text)):
        for algorithm in DIGESTS:
            if disk.given(algorithm):
                disk.fail(
                    algorithm,
                    "only allowed with a base URL",
                    "a local image is used as it is; remove the checksum",
                )
        return None, disk.path("base", base_dir), {}
    if "sha256" in disk.data and "sha512" in disk.data:
        disk.report.add(disk.where, "sha256 and sha512 are mutually exclusive", hint="keep one")
        return text, None, {}
    if not checksums:
        if not any(algorithm in disk.data for algorithm in DIGESTS):
            disk.report.add(
                disk.key("base"),
                "a downloaded image needs a checksum",
                shown(text),
                'add sha256 = "..." (or sha512) from the image\'s publisher',
            )
        return text, None, {}
    ((algorithm, digest),) = checksums.items()
    return text, cached_image(text, algorithm, digest), checksums


_DISK_HINT = "file uses an image as is; base puts a copy-on-write overlay on an image"


def _read_nic(nic: Table) -> tuple[NicSpec, list[tuple[str, str, PortForward]]]:
    """The NIC, and its forwards with their key paths and texts for the clash check."""
    mode = nic.choice("mode", NIC_MODES, "user", "only user-mode networking is supported for now")
    model = nic.choice("model", NIC_MODELS, "virtio-net-pci")
    mac = _read_mac(nic)
    forwards = _read_forwards(nic)
    network, address = read_network_keys(nic, bool(forwards))
    spec = NicSpec(
        mode=mode,
        model=model,
        mac=mac,
        forwards=tuple(forward for _, _, forward in forwards),
        id=nic.identifier("id"),
        network=network,
        address=address,
    )
    return spec, forwards


def _read_mac(nic: Table) -> str | None:
    mac = nic.string("mac", None)
    if mac is None:
        return None
    if not re.fullmatch(_MAC, mac):
        nic.fail("mac", 'must be a MAC address like "52:54:00:12:34:56"')
        return None
    if int(mac[:2], 16) & 1:
        nic.fail(
            "mac",
            "must be a unicast MAC address (an even first byte)",
            "QEMU's own prefix 52:54:00 is a safe choice",
        )
        return None
    return mac.lower()


def _read_forwards(nic: Table) -> list[tuple[str, str, PortForward]]:
    items = nic.array("forwards", "a list of strings") or []
    forwards = []
    for key, item in items:
        if not isinstance(item, str):
            nic.report.add(key, "must be a string", shown(item))
            continue
        try:
            forwards.append((key, item, parse_forward(item)))
        except ForwardError as error:
            nic.report.add(key, error.reason, shown(item), FORWARD_HINT)
    return forwards


def _read_share(share: Table, base_dir: Path, machine_type: str) -> ShareSpec | None:
    host = share.path("host", base_dir)
    guest = share.string("guest", None)
    readonly = share.boolean("readonly", False)
    # a [[share]] only: `qvm status` and `list` of machines without one skip the kinds' table
    from qvm.layout.kinds import SHARE_VIAS  # noqa: PLC0415 -- see the comment above

    via = share.choice("via", SHARE_VIAS, "virtiofs")
    for name in ("host", "guest"):
        if name not in share.data:
            share.report.add(share.key(name), "is required", hint=_SHARE_HINT)
    if isinstance(share.data.get("host"), str) and "," in share.data["host"]:
        share.fail("host", "must not contain a comma (virtiofsd's -o options cannot carry one)")
    if guest is not None:
        problem = guest_path_problem(guest)
        if problem is not None:
            share.fail("guest", problem, _SHARE_HINT)
    if machine_type == "microvm" and share.data:
        share.report.add(share.where, "not supported on microvm", hint="use q35 or pc")
    if host is None or guest is None or not share.ok("host", "guest", "via", "readonly"):
        return None
    return ShareSpec(host, guest.rstrip("/"), readonly, via)


_SHARE_HINT = 'a share looks like host = "data", guest = "/mnt/data"'
_GUEST_PATH_CHARS = re.compile(r"[^\s\x00-\x1f\x7f\\]+")


def guest_path_problem(guest: str) -> str | None:
    """Why ``guest`` cannot be a share's mount point in the guest, or None."""
    if not guest.startswith("/"):
        return "must be an absolute path in the guest"
    parts = guest.strip("/").split("/")
    if guest.strip("/") == "":
        return "must not be the guest's root folder"
    if any(part in ("", ".", "..") for part in parts):
        return "must be a plain path: no '.', '..' or '//' in it"
    if len(guest) > 255 or not _GUEST_PATH_CHARS.fullmatch(guest):
        return "must be at most 255 characters, without spaces, backslashes or control characters"
    return None


def _check_unique_guests(
    report: Report, tables: list[Table], shares: list[ShareSpec | None]
) -> None:
    seen: dict[str, str] = {}  # guest path (without a trailing "/") -> its key
    for table, share in zip(tables, shares, strict=True):
        if share is None:
            continue
        where = table.key("guest")
        if share.guest in seen:
            report.add(where, f"already mounted by {seen[share.guest]}", shown(table.data["guest"]))
        else:
            seen[share.guest] = where


_KEY_LINE = r"(ssh-|ecdsa-|sk-)[a-z0-9@.-]+\s+\S+"


def _read_cloud_init(table: Table, base_dir: Path) -> CloudInitSpec:
    default_user = CloudInitSpec._field_defaults["user"]
    user = table.string("user", default_user)
    if table.given("user") and not re.fullmatch(USER_PATTERN, user):
        table.fail(
            "user",
            "must be a user name: a lowercase letter or '_', then up to 31 of"
            " lowercase letters, digits, '_' or '-'",
        )
    keys: list[str | Path] | None = None
    for key, item in table.array("ssh_authorized_keys", "a list of strings") or []:
        keys = keys or []
        if not isinstance(item, str) or not item.strip():
            table.report.add(
                key, "must be a public key line or the path of a .pub file", shown(item)
            )
        elif re.match(_KEY_LINE, item.strip()):
            keys.append(item.strip())
        elif item.lstrip().startswith(("ssh-", "ecdsa-", "sk-")):
            table.report.add(
                key,
                "is not a whole public key line (TYPE BASE64 [COMMENT])",
                shown(item),
                "paste the whole line of the .pub file",
            )
        else:
            path = expand_path(item, base_dir)
            if path is None:
                table.report.add(
                    key,
                    "starts with ~ and a user this host does not have",
                    shown(item),
                    "write ~/... for your own home folder, or an absolute path",
                )
            else:
                keys.append(path)
    if "ssh_authorized_keys" in table.data and keys is None:
        keys = []  # an empty list: no keys at all, on purpose
    packages = table.strings("packages") or ()
    runcmd: list[str | tuple[str, ...]] = []
    for key, item in table.array("runcmd", "a list of commands") or []:
        if isinstance(item, str):
            runcmd.append(item)
        elif isinstance(item, list) and item and all(isinstance(a, str) for a in item):
            runcmd.append(tuple(item))
        else:
            table.report.add(key, "must be a string or a non-empty list of strings", shown(item))
    user_data = table.path("user_data", base_dir)
    if "user_data" in table.data:
        for name in ("ssh_authorized_keys", "packages", "runcmd"):
            if name in table.data:
                table.fail(
                    name,
                    "cannot be combined with user_data (qvm uses that file as is)",
                    f"put {name} into the user_data file, or drop user_data",
                )
    return CloudInitSpec(
        user=user if table.ok("user") else default_user,
        ssh_authorized_keys=None if keys is None else tuple(keys),
        packages=packages,
        runcmd=tuple(runcmd),
        user_data=user_data,
    )


def _read_hotplug(hotplug: Table, machine_type: str) -> HotplugSpec:
    pci_slots = hotplug.integer("pci_slots", None, minimum=0, maximum=MAX_PCI_SLOTS)
    if machine_type != "q35" and hotplug.given("pci_slots"):
        hint = (
            "pc's PCI bus takes hotplugged devices as is; remove the key"
            if machine_type == "pc"
            else "microvm has no PCI hotplug; use q35"
        )
        hotplug.fail("pci_slots", "only used on q35", hint)
        return HotplugSpec()
    return HotplugSpec(pci_slots)


def _read_supervisor(supervisor: Table) -> SupervisorSpec:
    default = SupervisorSpec._field_defaults
    restart = supervisor.choice("restart", RESTART_POLICIES, default["restart"])
    max_restarts = supervisor.integer("max_restarts", default["max_restarts"], minimum=0)
    delay = supervisor.number("restart_delay", default["restart_delay"])
    if supervisor.given("restart_delay") and not (delay > 0 and math.isfinite(delay)):
        supervisor.fail("restart_delay", "must be a number of seconds > 0")
        delay = default["restart_delay"]
    return SupervisorSpec(restart, max_restarts, delay)


def _read_qemu(qemu: Table) -> QemuSpec:
    return QemuSpec(
        binary=qemu.string("binary", QemuSpec._field_defaults["binary"]),
        extra_args=qemu.strings("extra_args") or (),
    )


def _check_unique_ids(
    report: Report, ids: list[tuple[str, str | None]], kinds: dict[str, str]
) -> None:
    """``ids``: (key, id) in order; ``kinds``: key -> the kind of device set there, whose
    own generated form ("disk0" for a disk) its id may take, but no other kind's."""
    seen: dict[str, str] = {}
    for key, device_id in ids:
        if device_id is None:
            continue
        if device_id in seen:
            report.add(key, f"already used by {seen[device_id]}", shown(device_id))
            continue
        # only an id set in the file may take a generated form (the kinds' table loads then)
        owner = generated_id_kind(device_id) if key in kinds else None
        if owner is not None and owner != kinds[key]:
            report.add(
                key,
                f"has the form of a {owner} id, which qvm keeps for {owner} devices",
                shown(device_id),
                "pick another id",
            )
        else:
            seen[device_id] = key


def _check_forward_clashes(report: Report, forwards: list[tuple[str, str, PortForward]]) -> None:
    taken: list[tuple[str, PortForward]] = []
    for key, text, forward in forwards:
        if forward.host_port == 0:
            continue  # each gets its own free port at start
        clash = next((other_key for other_key, other in taken if _clash(forward, other)), None)
        if clash is not None:
            report.add(
                key,
                f"host port {forward.host_port} ({forward.protocol})"
                f" is already forwarded by {clash}",
                shown(text),
            )
        else:
            taken.append((key, forward))


def _clash(one: PortForward, other: PortForward) -> bool:
    # 0.0.0.0 binds every address, so it collides with any address on the same port.
    same_port = (one.protocol, one.host_port) == (other.protocol, other.host_port)
    addrs = {one.host_addr, other.host_addr}
    return same_port and (len(addrs) == 1 or "0.0.0.0" in addrs)


def _read_machine(root: Table, path: Path, name: str | None) -> Machine:
    root.reject_unknown(TOP_LEVEL_KEYS)
    base_dir = path.parent
    machine_name = _read_name(root, path, name)
    root.string("description", None, allow_empty=True)
    group = root.string("group", None)
    if group is not None and not is_vm_name(group):
        root.fail("group", f"must be {NAME_RULE}")
    section = root.section("machine")
    machine_type = section.choice("type", MACHINE_TYPES, Machine._field_defaults["type"])
    accel = section.choice("accel", ACCELS, Machine._field_defaults["accel"])
    cpu = _read_cpu(root.section("cpu"), machine_type)
    memory = _read_memory(root.section("memory"), machine_type)
    boot = _read_boot(root.section("boot"), base_dir)
    disk_tables = root.sections("disk")
    disks = [_read_disk(table, base_dir) for table in disk_tables]
    nic_tables = root.sections("nic")
    nics_and_forwards = [_read_nic(table) for table in nic_tables]
    share_tables = root.sections("share")
    shares = [_read_share(table, base_dir, machine_type) for table in share_tables]
    _check_unique_guests(root.report, share_tables, shares)
    hotplug = _read_hotplug(root.section("hotplug"), machine_type)
    serial = SerialSpec(
        root.section("serial").boolean("enabled", SerialSpec._field_defaults["enabled"])
    )
    agent = AgentSpec(
        root.section("agent").boolean("enabled", AgentSpec._field_defaults["enabled"])
    )
    snapshots = SnapshotsSpec(
        root.section("snapshots").boolean("enabled", SnapshotsSpec._field_defaults["enabled"])
    )
    supervisor = _read_supervisor(root.section("supervisor"))
    qemu = _read_qemu(root.section("qemu"))
    cloud_init = None
    if "cloud_init" in root.data:
        cloud_init = _read_cloud_init(root.section("cloud_init"), base_dir)
    nics = [nic for nic, _ in nics_and_forwards]
    # the cloud-init seed's disk has its own id: no other device may take it
    seed_ids = [("cloud_init (its seed disk)", SEED_DEVICE_ID)] if cloud_init is not None else []
    port_ids = [
        ("hotplug.pci_slots (a PCIe root port)", hotplug_port_id(index))
        for index in range(pci_ports(machine_type, hotplug))
    ]
    # the ids qvm gives disks and NICs without one come first: an id set elsewhere that
    # takes one of them is the one reported
    default_ids = [
        (f"{table.where} (its default id)", disk_node_name(index, disk))
        for index, (table, disk) in enumerate(zip(disk_tables, disks, strict=True))
        if disk.id is None
    ] + [
        (f"{table.where} (its default id)", nic_id(index, nic))
        for index, (table, nic) in enumerate(zip(nic_tables, nics, strict=True))
        if nic.id is None
    ]
    disk_ids = [(table.key("id"), disk.id) for table, disk in zip(disk_tables, disks, strict=True)]
    nic_ids = [(table.key("id"), nic.id) for table, nic in zip(nic_tables, nics, strict=True)]
    kinds = {key: "disk" for key, _ in disk_ids} | {key: "NIC" for key, _ in nic_ids}
    _check_unique_ids(root.report, seed_ids + port_ids + default_ids + disk_ids + nic_ids, kinds)
    _check_forward_clashes(
        root.report, [forward for _, forwards in nics_and_forwards for forward in forwards]
    )
    return Machine(
        name=machine_name,
        path=path,
        type=machine_type,
        accel=accel,
        cpu=cpu,
        memory=memory,
        boot=boot,
        disks=tuple(disks),
        nics=tuple(nics),
        shares=tuple(share for share in shares if share is not None),
        hotplug=hotplug,
        serial=serial,
        agent=agent,
        supervisor=supervisor,
        qemu=qemu,
        cloud_init=cloud_init,
        snapshots=snapshots,
        group=group,
    )


def load_machine(path: Path, name: str | None = None) -> Machine:
    """Read and validate the machine file at ``path``.

    Paths in the file are relative to the file's folder, and ``~`` works. ``name``, if
    given, replaces the machine's name (the file's ``name``, else the file's stem), so one
    file can run as several VMs. Raises DefinitionError with every problem found, each
    naming the file as ``path`` spells it.
    """
    file = str(path)
    data = _read_toml(path, file)
    report = Report(file)
    find_nul(data, report)
    machine = _read_machine(Table(data, "", report), Path(os.path.abspath(path)), name)
    if report.problems:
        raise DefinitionError(_at_most(report.problems, file))
    return machine


MAX_PROBLEMS = 20


def _at_most(problems: list[Problem], file: str) -> list[Problem]:
    """The first problems and a count of the rest: a file of 100,000 bad items is
    fixed a screenful at a time, not scrolled past."""
    if len(problems) <= MAX_PROBLEMS:
        return problems
    rest = len(problems) - (MAX_PROBLEMS - 1)
    return [*problems[: MAX_PROBLEMS - 1], Problem(file, "", f"and {rest} more problems")]


def _read_toml(path: Path, file: str) -> dict[str, Any]:
    try:
        raw = path.read_bytes()
    except OSError as error:
        raise DefinitionError([Problem(file, "", f"cannot read: {error.strerror}")]) from None
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as error:
        problem = f"invalid TOML: not UTF-8 text (at byte {error.start})"
        raise DefinitionError([Problem(file, "", problem)]) from None
    try:
        return parse_toml(text, file)
    except RecursionError:  # tomllib parses nested arrays and tables recursively
        problem = "invalid TOML: arrays or inline tables nested too deeply"
        raise DefinitionError([Problem(file, "", problem)]) from None
    except ValueError as error:
        # loaded already: only a text parse_toml had to parse raises (a cached one never)
        import tomllib  # noqa: PLC0415 -- a cached definition never loads tomllib

        if isinstance(error, tomllib.TOMLDecodeError):
            raise DefinitionError([Problem(file, "", f"invalid TOML: {error}")]) from None
        # Python's limit on the digits of an int (4,300)
        problem = f"invalid TOML: a number too long to read ({error})"
        raise DefinitionError([Problem(file, "", problem[:200])]) from None
