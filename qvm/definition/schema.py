"""The machine definition's records and vocabulary: every key, its meaning (``KEYS``,
also the did-you-mean source), the allowed values, and the frozen records the loader
fills. The records are ``qvm.base.record.Record``s (see there why not dataclasses or
NamedTuples: start-up time); as class attributes their fields are accessors, so defaults
come from ``_field_defaults``.
"""

from __future__ import annotations

from pathlib import Path

from qvm.base.record import Record

MACHINE_TYPES = ("q35", "pc", "microvm")
ACCELS = ("auto", "kvm", "tcg")
RESTART_POLICIES = ("no", "on-failure", "always")
DISK_INTERFACES = ("virtio", "ide", "scsi", "nvme")
DISK_FORMATS = ("qcow2", "raw")
USER_PATTERN = r"[a-z_][a-z0-9_-]{0,31}"
SEED_DEVICE_ID = "cidata"  # the cloud-init seed's device id
NIC_MODES = ("user",)
NIC_MODELS = ("virtio-net-pci", "e1000", "e1000e", "rtl8139")
FORWARD_PROTOCOLS = ("tcp", "udp")
ID_PATTERN = r"[a-zA-Z][a-zA-Z0-9_-]{0,31}"
MAX_CPUS = 1024  # QEMU's limit for q35
MIN_MEMORY = 16 * 1024**2
MAX_MEMORY_SLOTS = 256
# each root port takes a slot of pcie.0 (32, host bridge and ICH9 included) and, unless
# its devices need none, 4 KiB of the 64 KiB x86 I/O space
MAX_PCI_SLOTS = 16
DEFAULT_PCI_SLOTS_Q35 = 4
HOTPLUG_PORT_PREFIX = "hp"
DEFAULT_HOST_ADDR = "127.0.0.1"  # forwards are private to this host unless the file says so


class CpuSpec(Record):
    model: str | None = None  # None: "host" under KVM, "max" under TCG
    count: int = 1  # type: ignore[assignment]  # a field may shadow tuple.count
    max: int = 1
    sockets: int | None = None
    dies: int | None = None
    cores: int | None = None
    threads: int | None = None


class MemorySpec(Record):
    size: int = 512 * 1024**2  # bytes
    max: int | None = None  # bytes; None: no memory hotplug
    slots: int = 0
    # the RAM as shared memory (memfd, share=on), DIMMs too: what virtiofs needs; a VM
    # with a virtiofs [[share]] gets it whatever this says (``shared_memory``)
    shared: bool = False


class BootSpec(Record):
    kernel: Path | None = None
    initrd: Path | None = None
    append: str | None = None


class DiskSpec(Record):
    file: Path | None = None  # used as is
    base: Path | None = None  # a copy-on-write overlay on this image lives in the VM's folder
    size: int | None = None  # bytes; grow the overlay to this size
    format: str | None = None  # of ``file`` or ``base``; None: qcow2 by suffix, else raw
    interface: str = "virtio"
    readonly: bool = False
    id: str | None = None
    # ``base`` given as an http(s) URL: downloaded once into qvm's image cache (``base`` is
    # then the cached file) and verified against exactly one of the checksums
    url: str | None = None
    sha256: str | None = None
    sha512: str | None = None


class CloudInitSpec(Record):
    """A cloud-init NoCloud seed (``cidata``) built by qvm and attached read-only."""

    user: str = "qvm"
    # key lines (str) and public key files (Path); None: the user's ~/.ssh/id_*.pub, or a
    # key pair qvm makes for this VM when there is none
    ssh_authorized_keys: tuple[str | Path, ...] | None = None
    packages: tuple[str, ...] = ()
    runcmd: tuple[str | tuple[str, ...], ...] = ()
    user_data: Path | None = None  # a user-data file used as is instead of the generated one


class PortForward(Record):
    protocol: str  # "tcp" or "udp"
    host_addr: str  # "127.0.0.1" unless the file says otherwise
    host_port: int  # 0: pick a free port at start
    guest_port: int


class NicSpec(Record):
    mode: str = "user"
    model: str = "virtio-net-pci"
    mac: str | None = None  # None: stable, derived from the machine name and the NIC's index
    forwards: tuple[PortForward, ...] = ()
    id: str | None = None
    # a private L2 network shared with every VM that names it (qvm.layout.netfiles);
    # None: user-mode networking
    network: str | None = None
    address: str | None = None  # on the network; None: stable, given by qvm


class ShareSpec(Record):
    """A host folder the guest mounts (``[[share]]``)."""

    host: Path  # absolute (relative paths are the definition's folder's)
    guest: str  # absolute path in the guest
    readonly: bool = False
    via: str = "virtiofs"  # one of qvm.layout.kinds.SHARE_VIAS


class HotplugSpec(Record):
    # spare pcie-root-ports (ids hp0..) for hotplugged PCI devices, q35 only; None: the
    # file does not say (see ``pci_ports``)
    pci_slots: int | None = None


class SerialSpec(Record):
    enabled: bool = True


class AgentSpec(Record):
    # a virtio-serial port org.qemu.guest_agent.0 on the run dir's agent.sock, for the
    # QEMU guest agent (qemu-ga) in the guest
    enabled: bool = True


class SnapshotsSpec(Record):
    # a small qcow2 state disk in the run dir at boot, for the RAM state of snapshots of a
    # VM without a writable qcow2 disk (without it, the first save adds one at run time)
    enabled: bool = False


class SupervisorSpec(Record):
    restart: str = "no"
    max_restarts: int = 5
    restart_delay: float = 1.0  # seconds; doubles after each restart


class QemuSpec(Record):
    binary: str = "qemu-system-x86_64"
    extra_args: tuple[str, ...] = ()


class Machine(Record):
    name: str
    path: Path  # the TOML file, absolute
    type: str = "q35"
    accel: str = "auto"
    cpu: CpuSpec = CpuSpec()
    memory: MemorySpec = MemorySpec()
    boot: BootSpec = BootSpec()
    disks: tuple[DiskSpec, ...] = ()
    nics: tuple[NicSpec, ...] = ()
    shares: tuple[ShareSpec, ...] = ()
    hotplug: HotplugSpec = HotplugSpec()
    serial: SerialSpec = SerialSpec()
    agent: AgentSpec = AgentSpec()
    supervisor: SupervisorSpec = SupervisorSpec()
    qemu: QemuSpec = QemuSpec()
    cloud_init: CloudInitSpec | None = None
    snapshots: SnapshotsSpec = SnapshotsSpec()
    group: str | None = None  # `qvm up @GROUP` (qvm.definition.groups)


# Every key a machine file may hold, by table ("" is the top level; "disk" and "nic"
# are arrays of tables, [[disk]] and [[nic]]). Unknown-key checks and did-you-mean
# hints read this, and docs/machines.md's table is checked against it (tests/unit/test_docs.py).
KEYS: dict[str, dict[str, str]] = {
    "": {
        "name": "string matching NAME_PATTERN; default: the file's name without .toml",
        "description": "string; free text for people, ignored by qvm",
        "group": "string matching NAME_PATTERN; commands given @GROUP act on every machine"
        " of the group (`qvm up @web`); default: none",
    },
    "machine": {
        "type": '"q35", "pc" or "microvm"; default "q35"',
        "accel": '"auto", "kvm" or "tcg"; default "auto" (KVM when usable, else TCG)',
    },
    "cpu": {
        "model": 'QEMU CPU model, e.g. "IvyBridge"; default "host" under KVM, "max" under TCG',
        "count": "vCPUs at start, >= 1; default 1",
        "max": "vCPUs the VM may grow to by hotplug, count..1024; default: count",
        "sockets": "topology, >= 1; if any of sockets/dies/cores/threads is set, the missing"
        " ones are 1, except that a lone missing sockets or cores is max divided by the"
        " others; sockets*dies*cores*threads must equal max",
        "dies": "topology, >= 1 (see sockets)",
        "cores": "topology, >= 1 (see sockets)",
        "threads": "topology, >= 1 (see sockets)",
    },
    "memory": {
        "size": 'RAM at start: a size like "512M" or "2G" (powers of 1024) or an integer'
        ' number of bytes; at least 16M, a multiple of 1M; default "512M"',
        "max": "RAM the VM may grow to by hotplug, >= size, needs slots >= 1;"
        " default: no memory hotplug",
        "slots": "memory hotplug slots, 0..256, needs max; default 0",
        "shared": "true or false; default false (true: the RAM, DIMMs included, is shared"
        " memory, memfd with share=on, as `qvm share add` needs; a virtiofs [[share]]"
        " makes it so anyway)",
    },
    "boot": {
        "kernel": "path of a kernel to boot directly; default: boot from the disks",
        "initrd": "path of an initrd; needs kernel",
        "append": "kernel command line; needs kernel",
    },
    "disk": {
        "file": "path of an image used as is; exactly one of file and base",
        "base": "path of an image that a copy-on-write overlay in the VM's folder sits on,"
        " or an http(s) URL of one, downloaded once into the image cache (needs sha256 or"
        " sha512)",
        "sha256": "hex SHA-256 of the image at a base URL; the download is checked against it",
        "sha512": "hex SHA-512 of the image at a base URL (instead of sha256)",
        "size": "grow the overlay to this size; only with base",
        "format": '"qcow2" or "raw"; default: read from the image (qcow2 by its header, else raw)',
        "interface": '"virtio", "ide", "scsi" or "nvme"; default "virtio"',
        "readonly": "true or false; default false",
        "id": "device id, unique among disks and NICs, matching ID_PATTERN; default: generated",
    },
    "nic": {
        "mode": '"user" (QEMU user-mode networking); default "user"',
        "model": '"virtio-net-pci", "e1000", "e1000e" or "rtl8139"; default "virtio-net-pci"',
        "mac": 'unicast MAC like "52:54:00:12:34:56"; default: derived from the machine name'
        " and the NIC's index",
        "forwards": 'list like ["tcp:2222:22", "udp:0.0.0.0:5353:53"]:'
        " PROTO:[HOSTADDR:]HOSTPORT:GUESTPORT, HOSTADDR default 127.0.0.1,"
        " HOSTPORT 0 picks a free port at start",
        "id": "device id, unique among disks and NICs, matching ID_PATTERN; default: generated",
        "network": "name of a private network (1 to 32 lowercase letters, digits or '-',"
        " starting with a letter) shared with every VM whose NIC names it; excludes"
        " forwards; default: user-mode networking",
        "address": 'the NIC\'s IPv4 address on its network, like "10.64.1.9"; needs network;'
        " default: a stable address qvm gives it",
    },
    "share": {
        "host": "path of a host folder (relative: to the machine file's folder); it must"
        " exist and be a folder",
        "guest": "absolute path the guest mounts it at, unique among the shares",
        "readonly": "true or false; default false (true: enforced on the host, the guest"
        " cannot write)",
        "via": '"virtiofs" (virtiofsd, needs root) or "9p" (QEMU\'s -virtfs; the guest'
        ' kernel needs 9p); default "virtiofs"',
    },
    "hotplug": {
        "pci_slots": "spare PCIe root ports for hotplugged disks, NICs and virtio-mem devices"
        f" (one each; ids hp0, hp1, ...), 0..{MAX_PCI_SLOTS}; q35 only, default"
        f" {DEFAULT_PCI_SLOTS_Q35} (q35's pcie.0 takes no hotplug; pc's pci.0 does, as is)",
    },
    "serial": {
        "enabled": "true or false; default true (a serial console qvm can attach to)",
    },
    "agent": {
        "enabled": "true or false; default true (a virtio-serial channel for the QEMU guest"
        " agent, qemu-ga, in the guest; false removes the device)",
    },
    "snapshots": {
        "enabled": "true or false; default false (true: a small qcow2 state disk in the VM's"
        " folder from boot, for the RAM state of `qvm snapshot save`; without it the first"
        " save adds one to the running VM)",
    },
    "supervisor": {
        "restart": '"no", "on-failure" or "always"; default "no"',
        "max_restarts": "integer >= 0; default 5",
        "restart_delay": "seconds before the first restart, > 0, doubling after each; default 1",
    },
    "qemu": {
        "binary": 'QEMU to run, a name or a path; default "qemu-system-x86_64"',
        "extra_args": "list of strings appended to QEMU's command line as is; default []",
    },
    "cloud_init": {
        "user": "the account cloud-init creates (sudo without password) and qvm ssh logs in"
        ' as, matching USER_PATTERN; default "qvm"',
        "ssh_authorized_keys": "list of public key lines or .pub files for user; default: the"
        " files ~/.ssh/id_*.pub, or a key pair qvm makes in the VM's folder if there are none",
        "packages": "list of Debian/Ubuntu/... package names cloud-init installs at first boot",
        "runcmd": "list of commands cloud-init runs once at first boot: strings (run by sh)"
        " or lists of strings (argv)",
        "user_data": "path of a cloud-config file used as the seed's user-data as is; excludes"
        " ssh_authorized_keys, packages and runcmd (user still names whom qvm ssh logs in as)",
    },
}

TOP_LEVEL_KEYS = (*KEYS[""], *(table for table in KEYS if table))


def shared_memory(machine: Machine) -> bool:
    """Whether the RAM is shared memory: virtiofs needs it, ``memory.shared`` asks for it."""
    return machine.memory.shared or any(share.via == "virtiofs" for share in machine.shares)
