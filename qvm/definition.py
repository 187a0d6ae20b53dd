"""Machine definitions: a TOML file parsed and validated into frozen, typed objects.

Parsing collects every problem before giving up, so a user fixes a file in one pass.
Checks that need this host's QEMU (CPU models, machine types) or the file system
(kernels, images) live in ``check_host`` and run at ``up``, not at load.

The records are ``typing.NamedTuple``s, not frozen dataclasses, for start-up time: creating
these classes took ~10 ms as dataclasses and ~2.5 ms as NamedTuples (measured); as class
attributes their fields are accessors, so defaults come from ``_field_defaults``.
"""

from __future__ import annotations

import json
import math
import os
import re
import tomllib
from collections.abc import Callable, Collection, Mapping, Sequence
from pathlib import Path
from typing import Any, NamedTuple, TypeVar

from qvm.errors import DefinitionError, Problem, QvmError
from qvm.sizes import SizeError, format_size, parse_size

MACHINE_TYPES = ("q35", "pc", "microvm")
ACCELS = ("auto", "kvm", "tcg")
RESTART_POLICIES = ("no", "on-failure", "always")
DISK_INTERFACES = ("virtio", "ide", "scsi", "nvme")
DISK_FORMATS = ("qcow2", "raw")
NAME_PATTERN = r"[a-z0-9][a-z0-9_-]{0,62}"
USER_PATTERN = r"[a-z_][a-z0-9_-]{0,31}"
SEED_DEVICE_ID = "cidata"  # the cloud-init seed's device id
NIC_MODES = ("user",)
NIC_MODELS = ("virtio-net-pci", "e1000", "e1000e", "rtl8139")
FORWARD_PROTOCOLS = ("tcp", "udp")
ID_PATTERN = r"[a-zA-Z][a-zA-Z0-9_-]{0,31}"
MAX_CPUS = 1024  # QEMU's limit for q35
MIN_MEMORY = 16 * 1024**2
MAX_MEMORY_SLOTS = 256
DEFAULT_PCI_SLOTS_Q35 = 4
# each root port takes a slot of pcie.0 (32, host bridge and ICH9 included) and, unless
# its devices need none, 4 KiB of the 64 KiB x86 I/O space
MAX_PCI_SLOTS = 16
HOTPLUG_PORT_PREFIX = "hp"
DEFAULT_HOST_ADDR = "127.0.0.1"  # forwards are private to this host unless the file says so


class CpuSpec(NamedTuple):
    model: str | None = None  # None: "host" under KVM, "max" under TCG
    count: int = 1
    max: int = 1
    sockets: int | None = None
    dies: int | None = None
    cores: int | None = None
    threads: int | None = None


class MemorySpec(NamedTuple):
    size: int = 512 * 1024**2  # bytes
    max: int | None = None  # bytes; None: no memory hotplug
    slots: int = 0


class BootSpec(NamedTuple):
    kernel: Path | None = None
    initrd: Path | None = None
    append: str | None = None


class DiskSpec(NamedTuple):
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


class CloudInitSpec(NamedTuple):
    """A cloud-init NoCloud seed (``cidata``) built by qvm and attached read-only."""

    user: str = "qvm"
    # key lines (str) and public key files (Path); None: the user's ~/.ssh/id_*.pub, or a
    # key pair qvm makes for this VM when there is none
    ssh_authorized_keys: tuple[str | Path, ...] | None = None
    packages: tuple[str, ...] = ()
    runcmd: tuple[str | tuple[str, ...], ...] = ()
    user_data: Path | None = None  # a user-data file used as is instead of the generated one


class PortForward(NamedTuple):
    protocol: str  # "tcp" or "udp"
    host_addr: str  # "127.0.0.1" unless the file says otherwise
    host_port: int  # 0: pick a free port at start
    guest_port: int


class NicSpec(NamedTuple):
    mode: str = "user"
    model: str = "virtio-net-pci"
    mac: str | None = None  # None: stable, derived from the machine name and the NIC's index
    forwards: tuple[PortForward, ...] = ()
    id: str | None = None


class HotplugSpec(NamedTuple):
    # spare pcie-root-ports (ids hp0..) for hotplugged PCI devices, q35 only; None: the
    # file does not say (see ``pci_ports``)
    pci_slots: int | None = None


class SerialSpec(NamedTuple):
    enabled: bool = True


class SupervisorSpec(NamedTuple):
    restart: str = "no"
    max_restarts: int = 5
    restart_delay: float = 1.0  # seconds; doubles after each restart


class QemuSpec(NamedTuple):
    binary: str = "qemu-system-x86_64"
    extra_args: tuple[str, ...] = ()


class Machine(NamedTuple):
    name: str
    path: Path  # the TOML file, absolute
    type: str = "q35"
    accel: str = "auto"
    cpu: CpuSpec = CpuSpec()
    memory: MemorySpec = MemorySpec()
    boot: BootSpec = BootSpec()
    disks: tuple[DiskSpec, ...] = ()
    nics: tuple[NicSpec, ...] = ()
    hotplug: HotplugSpec = HotplugSpec()
    serial: SerialSpec = SerialSpec()
    supervisor: SupervisorSpec = SupervisorSpec()
    qemu: QemuSpec = QemuSpec()
    cloud_init: CloudInitSpec | None = None


# Every key a machine file may hold, by table ("" is the top level; "disk" and "nic"
# are arrays of tables, [[disk]] and [[nic]]). Unknown-key checks and did-you-mean
# hints read this, and the README's reference table is copied from it.
KEYS: dict[str, dict[str, str]] = {
    "": {
        "name": "string matching NAME_PATTERN; default: the file's name without .toml",
        "description": "string; free text for people, ignored by qvm",
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
        "format": '"qcow2" or "raw"; default: qcow2 for a .qcow2 file, else raw',
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
    },
    "hotplug": {
        "pci_slots": "spare PCIe root ports for hotplugged disks, NICs and virtio-mem devices"
        f" (one each; ids hp0, hp1, ...), 0..{MAX_PCI_SLOTS}; q35 only, default"
        f" {DEFAULT_PCI_SLOTS_Q35} (q35's pcie.0 takes no hotplug; pc's pci.0 does, as is)",
    },
    "serial": {
        "enabled": "true or false; default true (a serial console qvm can attach to)",
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

_TOP_LEVEL_KEYS = (*KEYS[""], *(table for table in KEYS if table))

NAME_RULE = "1 to 63 lowercase letters, digits, '_' or '-', starting with a letter or digit"
_ID_RULE = "a letter then up to 31 letters, digits, '_' or '-'"
_MIB = 1024**2
_SIZE_HINT = 'sizes look like "512M" or "2G"; K, M, G and T are powers of 1024'
_FORWARD_FORM = "PROTO:[HOSTADDR:]HOSTPORT:GUESTPORT"
_FORWARD_HINT = 'forwards look like "tcp:2222:22" or "udp:0.0.0.0:5353:53"'
_MAC = re.compile(r"[0-9a-fA-F]{2}(?::[0-9a-fA-F]{2}){5}")
_PORT = re.compile(r"[0-9]{1,5}")
_BARE_KEY = re.compile(r"[A-Za-z0-9_-]+")
_NOT_SET = object()

_T = TypeVar("_T")


# --- rendering values for messages ------------------------------------------------


def render(value: Any) -> str:
    """Write a TOML value the way TOML would, so "got ..." shows what the user wrote."""
    if isinstance(value, str):
        return json.dumps(value, ensure_ascii=False)
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, float):
        return _render_float(value)
    if isinstance(value, list):
        return "[" + ", ".join(render(item) for item in value) + "]"
    if isinstance(value, dict):
        pairs = (f"{_render_key(key)} = {render(item)}" for key, item in value.items())
        return "{" + ", ".join(pairs) + "}"
    from datetime import date, datetime, time  # only TOML dates reach here, rarely

    if isinstance(value, datetime | date | time):
        return value.isoformat()
    return str(value)


def _render_float(value: float) -> str:
    if math.isnan(value):
        return "nan"
    if math.isinf(value):
        return "inf" if value > 0 else "-inf"
    return repr(value)


def _render_key(key: str) -> str:
    return key if _BARE_KEY.fullmatch(key) else json.dumps(key, ensure_ascii=False)


def _did_you_mean(word: str, choices: Collection[str]) -> str | None:
    import difflib  # only on error paths

    matches = difflib.get_close_matches(word, list(choices), n=3, cutoff=0.6)
    if not matches:
        return None
    return "did you mean " + ", ".join(f"'{match}'" for match in matches) + "?"


def _must_be_one_of(choices: Sequence[str]) -> str:
    if len(choices) == 1:
        return f"must be {render(choices[0])}"
    return "must be one of " + ", ".join(render(choice) for choice in choices)


def _is_int(value: Any) -> bool:
    # TOML booleans arrive as Python bools, which are ints: "count = true" is a mistake.
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value: Any) -> bool:
    return _is_int(value) or isinstance(value, float)


def _is_table_like(value: Any) -> bool:
    if isinstance(value, dict):
        return True
    return isinstance(value, list) and bool(value) and all(isinstance(v, dict) for v in value)


# --- reading tables ---------------------------------------------------------------


class _Report:
    """The problems found so far in one file."""

    def __init__(self, file: str) -> None:
        self.file = file
        self.problems: list[Problem] = []

    def add(self, key: str, problem: str, got: str | None = None, hint: str | None = None) -> None:
        self.problems.append(Problem(self.file, key, problem, got, hint))


class _Table:
    """One TOML table being read.

    Getters return the default after reporting a problem instead of raising, so reading
    goes on and finds every problem. ``invalid`` remembers the keys that were present but
    wrong, so rules that relate several keys skip them rather than pile on.
    """

    def __init__(self, data: Mapping[str, Any], where: str, report: _Report) -> None:
        self.data = data
        self.where = where
        self.report = report
        self.invalid: set[str] = set()

    def key(self, name: str) -> str:
        return f"{self.where}.{name}" if self.where else name

    def given(self, name: str) -> bool:
        """True if the file sets ``name`` to a valid value."""
        return name in self.data and name not in self.invalid

    def ok(self, *names: str) -> bool:
        """True if none of ``names`` is set to an invalid value."""
        return not self.invalid.intersection(names)

    def fail(self, name: str, problem: str, hint: str | None = None) -> None:
        self.invalid.add(name)
        got = render(self.data[name]) if name in self.data else None
        self.report.add(self.key(name), problem, got, hint)

    def reject_unknown(self, valid: Sequence[str]) -> None:
        for name in self.data:
            if name in valid:
                continue
            problem = "unknown table" if _is_table_like(self.data[name]) else "unknown key"
            hint = _did_you_mean(name, valid) or "valid keys: " + ", ".join(valid)
            self.report.add(self.key(name), problem, hint=hint)

    def _typed(self, name: str, accept: Callable[[Any], bool], kind: str) -> Any:
        """The value of ``name`` if it has the right type; _NOT_SET if absent or wrong."""
        if name not in self.data:
            return _NOT_SET
        value = self.data[name]
        if not accept(value):
            self.fail(name, f"must be {kind}")
            return _NOT_SET
        return value

    def string(self, name: str, default: _T, *, allow_empty: bool = False) -> str | _T:
        value = self._typed(name, lambda v: isinstance(v, str), "a string")
        if value is _NOT_SET:
            return default
        if not value and not allow_empty:
            self.fail(name, "must not be empty")
            return default
        return str(value)

    def integer(
        self, name: str, default: _T, *, minimum: int | None = None, maximum: int | None = None
    ) -> int | _T:
        value = self._typed(name, _is_int, "an integer")
        if value is _NOT_SET:
            return default
        if minimum is not None and maximum is not None:
            if not minimum <= value <= maximum:
                self.fail(name, f"must be between {minimum} and {maximum}")
                return default
        elif minimum is not None and value < minimum:
            self.fail(name, f"must be >= {minimum}")
            return default
        return int(value)

    def number(self, name: str, default: _T) -> float | _T:
        value = self._typed(name, _is_number, "a number")
        return default if value is _NOT_SET else float(value)

    def boolean(self, name: str, default: _T) -> bool | _T:
        value = self._typed(name, lambda v: isinstance(v, bool), "true or false")
        return default if value is _NOT_SET else value

    def choice(
        self, name: str, choices: Sequence[str], default: _T, hint: str | None = None
    ) -> str | _T:
        value = self._typed(name, lambda v: isinstance(v, str), "a string")
        if value is _NOT_SET:
            return default
        if value not in choices:
            self.fail(name, _must_be_one_of(choices), _did_you_mean(value, choices) or hint)
            return default
        return str(value)

    def size(self, name: str, default: _T) -> int | _T:
        value = self._typed(
            name, lambda v: _is_int(v) or isinstance(v, str), 'a size like "512M" or a number'
        )
        if value is _NOT_SET:
            return default
        try:
            return parse_size(value)
        except SizeError as error:
            self.fail(name, error.reason, _SIZE_HINT)
            return default

    def path(self, name: str, base_dir: Path) -> Path | None:
        text = self.string(name, None)
        if text is None:
            return None
        # base_dir / an absolute path is that absolute path, so one expression does both.
        return Path(os.path.normpath(base_dir / Path(text).expanduser()))

    def identifier(self, name: str) -> str | None:
        text = self.string(name, None)
        if text is not None and not re.fullmatch(ID_PATTERN, text):
            self.fail(name, f"must be {_ID_RULE}")
            return None
        return text

    def array(self, name: str, kind: str) -> list[tuple[str, Any]] | None:
        """(key path, item) for each item of the array ``name``; None if absent or wrong."""
        value = self._typed(name, lambda v: isinstance(v, list), kind)
        if value is _NOT_SET:
            return None
        return [(f"{self.key(name)}[{index}]", item) for index, item in enumerate(value)]

    def strings(self, name: str) -> tuple[str, ...] | None:
        items = self.array(name, "a list of strings")
        if items is None:
            return None
        for key, item in items:
            if not isinstance(item, str):
                self.invalid.add(name)
                self.report.add(key, "must be a string", render(item))
        return None if name in self.invalid else tuple(item for _, item in items)

    def section(self, name: str) -> _Table:
        """The sub-table ``name`` with its unknown keys reported; empty if absent or wrong."""
        value = self._typed(name, lambda v: isinstance(v, dict), "a table")
        table = _Table({} if value is _NOT_SET else value, self.key(name), self.report)
        table.reject_unknown(tuple(KEYS[name]))
        return table

    def sections(self, name: str) -> list[_Table]:
        """The tables of the array of tables ``name`` ([[name]]), unknown keys reported."""
        if isinstance(self.data.get(name), dict):
            self.fail(name, "must be an array of tables", f"write [[{name}]], not [{name}]")
            return []
        items = self.array(name, "an array of tables") or []
        tables = []
        for key, item in items:
            if not isinstance(item, dict):
                self.invalid.add(name)
                self.report.add(key, "must be a table", render(item))
                continue
            table = _Table(item, key, self.report)
            table.reject_unknown(tuple(KEYS[name]))
            tables.append(table)
        return tables


# --- the sections of a machine file ---------------------------------------------


def _suggest_name(text: str) -> str | None:
    candidate = re.sub(r"[^a-z0-9_-]+", "-", text.lower()).strip("-_")[:63]
    return candidate if re.fullmatch(NAME_PATTERN, candidate) else None


def _read_name(root: _Table, path: Path, override: str | None) -> str:
    in_file = root.string("name", None)
    if in_file is not None and not re.fullmatch(NAME_PATTERN, in_file):
        root.fail("name", f"must be {NAME_RULE}")
    if override is not None:
        if not re.fullmatch(NAME_PATTERN, override):
            root.report.add("name", f"must be {NAME_RULE}", render(override))
        return override
    if "name" in root.data:
        return in_file or ""
    stem = path.stem
    if not re.fullmatch(NAME_PATTERN, stem):
        suggestion = _suggest_name(stem)
        hint = (
            f'set name = "{suggestion}" in the file, or rename it to {suggestion}.toml'
            if suggestion
            else "set name in the file, or rename it"
        )
        root.report.add(
            "name",
            f"not set, and the file's name is not a valid machine name ({NAME_RULE})",
            render(stem),
            hint,
        )
    return stem


def _read_cpu(cpu: _Table, machine_type: str) -> CpuSpec:
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


def _check_cpu_counts(cpu: _Table, count: int, cpu_max: int, machine_type: str) -> None:
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
    cpu: _Table, given: dict[str, int | None], count: int, cpu_max: int
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
    cpu: _Table, missing: str, cpu_max: int, *others: tuple[str, int | None]
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


def _read_memory(memory: _Table, machine_type: str) -> MemorySpec:
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
    return MemorySpec(size, memory_max, slots)


def _check_memory_size(memory: _Table, name: str, size: int) -> None:
    if size < MIN_MEMORY:
        raw = memory.data[name]
        hint = None
        if _is_int(raw) or (isinstance(raw, str) and raw.strip().isdigit()):
            hint = f'a bare number means bytes; did you mean "{str(raw).strip()}M"?'
        memory.fail(name, f"must be at least {format_size(MIN_MEMORY)}", hint)
    elif size % _MIB:
        memory.fail(name, "must be a multiple of 1M")


def _check_memory_hotplug(memory: _Table, size: int, memory_max: int | None, slots: int) -> None:
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


def _read_boot(boot: _Table, base_dir: Path) -> BootSpec:
    kernel = boot.path("kernel", base_dir)
    initrd = boot.path("initrd", base_dir)
    append = boot.string("append", None, allow_empty=True)
    if "kernel" not in boot.data:
        for name in ("initrd", "append"):
            if boot.given(name):
                boot.fail(name, "needs boot.kernel", f"set boot.kernel or remove boot.{name}")
    return BootSpec(kernel, initrd, append)


def _read_disk(disk: _Table, base_dir: Path) -> DiskSpec:
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


def _read_base(disk: _Table, base_dir: Path) -> tuple[str | None, Path | None, dict[str, str]]:
    """base as (URL or None, the image file, checksums): a URL's file is in the cache."""
    from qvm.images import DIGESTS, cached_image, is_url

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
                render(text),
                'add sha256 = "..." (or sha512) from the image\'s publisher',
            )
        return text, None, {}
    ((algorithm, digest),) = checksums.items()
    return text, cached_image(text, algorithm, digest), checksums


_DISK_HINT = "file uses an image as is; base puts a copy-on-write overlay on an image"


def _read_nic(nic: _Table) -> tuple[NicSpec, list[tuple[str, str, PortForward]]]:
    """The NIC, and its forwards with their key paths and texts for the clash check."""
    mode = nic.choice("mode", NIC_MODES, "user", "only user-mode networking is supported for now")
    model = nic.choice("model", NIC_MODELS, "virtio-net-pci")
    mac = _read_mac(nic)
    forwards = _read_forwards(nic)
    spec = NicSpec(
        mode=mode,
        model=model,
        mac=mac,
        forwards=tuple(forward for _, _, forward in forwards),
        id=nic.identifier("id"),
    )
    return spec, forwards


def _read_mac(nic: _Table) -> str | None:
    mac = nic.string("mac", None)
    if mac is None:
        return None
    if not _MAC.fullmatch(mac):
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


def _read_forwards(nic: _Table) -> list[tuple[str, str, PortForward]]:
    items = nic.array("forwards", "a list of strings") or []
    forwards = []
    for key, item in items:
        if not isinstance(item, str):
            nic.report.add(key, "must be a string", render(item))
            continue
        try:
            forwards.append((key, item, parse_forward(item)))
        except ForwardError as error:
            nic.report.add(key, error.reason, render(item), _FORWARD_HINT)
    return forwards


_KEY_LINE = re.compile(r"(ssh-|ecdsa-|sk-)[a-z0-9@.-]+\s+\S+")


def _read_cloud_init(table: _Table, base_dir: Path) -> CloudInitSpec:
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
                key, "must be a public key line or the path of a .pub file", render(item)
            )
        elif _KEY_LINE.match(item.strip()):
            keys.append(item.strip())
        elif item.lstrip().startswith(("ssh-", "ecdsa-", "sk-")):
            table.report.add(
                key,
                "is not a whole public key line (TYPE BASE64 [COMMENT])",
                render(item),
                "paste the whole line of the .pub file",
            )
        else:
            keys.append(Path(os.path.normpath(base_dir / Path(item).expanduser())))
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
            table.report.add(key, "must be a string or a non-empty list of strings", render(item))
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


def hotplug_port_id(index: int) -> str:
    """The id of qvm's ``index``-th spare PCIe root port: hp0, hp1, ..."""
    return f"{HOTPLUG_PORT_PREFIX}{index}"


def pci_ports(machine_type: str, hotplug: HotplugSpec) -> int:
    """How many spare PCIe root ports the machine gets: hotplug.pci_slots, by default
    DEFAULT_PCI_SLOTS_Q35 on q35 and none elsewhere."""
    if machine_type != "q35":
        return 0
    return DEFAULT_PCI_SLOTS_Q35 if hotplug.pci_slots is None else hotplug.pci_slots


def _read_hotplug(hotplug: _Table, machine_type: str) -> HotplugSpec:
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


def _read_supervisor(supervisor: _Table) -> SupervisorSpec:
    default = SupervisorSpec._field_defaults
    restart = supervisor.choice("restart", RESTART_POLICIES, default["restart"])
    max_restarts = supervisor.integer("max_restarts", default["max_restarts"], minimum=0)
    delay = supervisor.number("restart_delay", default["restart_delay"])
    if supervisor.given("restart_delay") and not (delay > 0 and math.isfinite(delay)):
        supervisor.fail("restart_delay", "must be a number of seconds > 0")
        delay = default["restart_delay"]
    return SupervisorSpec(restart, max_restarts, delay)


def _read_qemu(qemu: _Table) -> QemuSpec:
    return QemuSpec(
        binary=qemu.string("binary", QemuSpec._field_defaults["binary"]),
        extra_args=qemu.strings("extra_args") or (),
    )


def _check_unique_ids(report: _Report, ids: list[tuple[str, str | None]]) -> None:
    seen: dict[str, str] = {}
    for key, device_id in ids:
        if device_id is None:
            continue
        if device_id in seen:
            report.add(key, f"already used by {seen[device_id]}", render(device_id))
        else:
            seen[device_id] = key


def _check_forward_clashes(report: _Report, forwards: list[tuple[str, str, PortForward]]) -> None:
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
                render(text),
            )
        else:
            taken.append((key, forward))


def _clash(one: PortForward, other: PortForward) -> bool:
    # 0.0.0.0 binds every address, so it collides with any address on the same port.
    same_port = (one.protocol, one.host_port) == (other.protocol, other.host_port)
    addrs = {one.host_addr, other.host_addr}
    return same_port and (len(addrs) == 1 or "0.0.0.0" in addrs)


def _read_machine(root: _Table, path: Path, name: str | None) -> Machine:
    root.reject_unknown(_TOP_LEVEL_KEYS)
    base_dir = path.parent
    machine_name = _read_name(root, path, name)
    root.string("description", None, allow_empty=True)
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
    hotplug = _read_hotplug(root.section("hotplug"), machine_type)
    serial = SerialSpec(
        root.section("serial").boolean("enabled", SerialSpec._field_defaults["enabled"])
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
    _check_unique_ids(
        root.report,
        seed_ids
        + port_ids
        + [(table.key("id"), disk.id) for table, disk in zip(disk_tables, disks, strict=True)]
        + [(table.key("id"), nic.id) for table, nic in zip(nic_tables, nics, strict=True)],
    )
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
        hotplug=hotplug,
        serial=serial,
        supervisor=supervisor,
        qemu=qemu,
        cloud_init=cloud_init,
    )


# --- public API -------------------------------------------------------------------


class ForwardError(ValueError):
    """A port forward that cannot be read; ``reason`` is the message without the text."""

    def __init__(self, text: str, reason: str) -> None:
        self.text = text
        self.reason = reason
        super().__init__(f'invalid port forward "{text}": {reason}')


def parse_forward(text: str) -> PortForward:
    """Read ``PROTO:[HOSTADDR:]HOSTPORT:GUESTPORT``, e.g. "tcp:2222:22".

    PROTO is tcp or udp; HOSTADDR an IPv4 address, 127.0.0.1 when left out; HOSTPORT
    0..65535, where 0 means a free port picked at start; GUESTPORT 1..65535.
    Raises ForwardError (a ValueError) saying what is wrong.
    """
    parts = text.split(":")
    if len(parts) == 3:
        protocol, host_port, guest_port = parts
        host_addr = DEFAULT_HOST_ADDR
    elif len(parts) == 4:
        protocol, host_addr, host_port, guest_port = parts
        host_addr = _parse_host_addr(text, host_addr)
    else:
        raise ForwardError(text, f"must look like {_FORWARD_FORM}")
    if protocol.lower() not in FORWARD_PROTOCOLS:
        raise ForwardError(text, 'protocol must be "tcp" or "udp"')
    return PortForward(
        protocol=protocol.lower(),
        host_addr=host_addr,
        host_port=_parse_port(text, host_port, "host port", 0),
        guest_port=_parse_port(text, guest_port, "guest port", 1),
    )


def _parse_host_addr(text: str, addr: str) -> str:
    try:
        import ipaddress

        return str(ipaddress.IPv4Address(addr))
    except ValueError:
        # QEMU's user-mode networking binds IPv4 addresses only.
        raise ForwardError(text, "host address must be an IPv4 address like 127.0.0.1") from None


def _parse_port(text: str, port: str, what: str, lowest: int) -> int:
    if _PORT.fullmatch(port) and lowest <= int(port) <= 65535:
        return int(port)
    raise ForwardError(text, f"{what} must be a number between {lowest} and 65535")


def load_machine(path: Path, name: str | None = None) -> Machine:
    """Read and validate the machine file at ``path``.

    Paths in the file are relative to the file's folder, and ``~`` works. ``name``, if
    given, replaces the machine's name (the file's ``name``, else the file's stem), so one
    file can run as several VMs. Raises DefinitionError with every problem found, each
    naming the file as ``path`` spells it.
    """
    file = str(path)
    data = _read_toml(path, file)
    report = _Report(file)
    machine = _read_machine(_Table(data, "", report), Path(os.path.abspath(path)), name)
    if report.problems:
        raise DefinitionError(report.problems)
    return machine


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
        return tomllib.loads(text)
    except tomllib.TOMLDecodeError as error:
        raise DefinitionError([Problem(file, "", f"invalid TOML: {error}")]) from None


def check_host(
    machine: Machine, cpu_models: Collection[str], machine_types: Collection[str]
) -> list[Problem]:
    """What stops ``machine`` from starting on this host, given what its QEMU supports.

    ``cpu_models`` and ``machine_types`` are what ``-cpu help`` and ``-machine help`` list
    (aliases such as q35 and pc included). Looks at the file system for the kernel,
    initrd and disk images, and nothing else.
    """
    file = str(machine.path)
    binary = machine.qemu.binary
    problems = []
    if machine.type not in machine_types:
        hint = f"'{binary} -machine help' lists them"
        problems.append(
            Problem(file, "machine.type", f"unknown to {binary}", render(machine.type), hint)
        )
    model = machine.cpu.model
    if model is not None and model not in cpu_models:
        hint = f"'{binary} -cpu help' lists them"
        close = _did_you_mean(model, cpu_models)
        problems.append(
            Problem(
                file,
                "cpu.model",
                f"unknown to {binary}",
                render(model),
                f"{close} {hint}" if close else hint,
            )
        )
    for key, path in _files_needed(machine):
        problem = _file_problem(path)
        if problem is not None:
            problems.append(Problem(file, key, problem, render(str(path)), _file_hint(path)))
    return problems


def _files_needed(machine: Machine) -> list[tuple[str, Path]]:
    needed = [("boot.kernel", machine.boot.kernel), ("boot.initrd", machine.boot.initrd)]
    for index, disk in enumerate(machine.disks):
        needed.append((f"disk[{index}].file", disk.file))
        if disk.url is None:  # a URL's image is downloaded at start
            needed.append((f"disk[{index}].base", disk.base))
    cloud_init = machine.cloud_init
    if cloud_init is not None:
        needed.append(("cloud_init.user_data", cloud_init.user_data))
        for index, key in enumerate(cloud_init.ssh_authorized_keys or ()):
            if isinstance(key, Path):
                needed.append((f"cloud_init.ssh_authorized_keys[{index}]", key))
    return [(key, path) for key, path in needed if path is not None]


def _file_problem(path: Path) -> str | None:
    if not path.exists():
        return "file not found"
    if path.is_dir():
        return "is a folder, not a file"
    return None


def _file_hint(path: Path) -> str:
    parts = path.parts
    built = any(parts[i : i + 2] == ("build", "test-guest") for i in range(len(parts) - 1))
    return "run scripts/build-test-guest" if built else "check the path"


def find_machine(name_or_path: str, search_dirs: Sequence[Path]) -> Path:
    """The machine file for a name ("vm1") or a path ("vm1.toml", "machines/vm1").

    An argument ending in .toml or holding a "/" is a path; anything else is a name,
    looked up as NAME.toml in each of ``search_dirs`` in turn. Raises QvmError if there
    is no such file.
    """
    if name_or_path.endswith(".toml") or "/" in name_or_path:
        path = Path(name_or_path).expanduser()
        if not path.is_file():
            raise QvmError(f"no machine file at '{name_or_path}' (hint: check the path)")
        return path
    for directory in search_dirs:
        candidate = directory / f"{name_or_path}.toml"
        if candidate.is_file():
            return candidate
    looked = ", ".join(_for_display(directory) for directory in search_dirs) or "nowhere"
    create = _for_display(search_dirs[0] / f"{name_or_path}.toml") if search_dirs else None
    hint = f"create {create} or pass --machines DIR" if create else "pass --machines DIR"
    raise QvmError(f"no machine named '{name_or_path}' (looked in: {looked}) (hint: {hint})")


def _for_display(path: Path) -> str:
    """``path`` as short as it can be said: relative to the current folder, or to ~."""
    bases = [(Path.cwd(), Path()), (Path.home(), Path("~"))]
    holding = [(base, shown) for base, shown in bases if path.is_relative_to(base)]
    if not path.is_absolute() or not holding:
        return str(path)
    # The deepest folder holding the path gives the shortest name; on a tie, cwd wins.
    base, shown = max(holding, key=lambda pair: len(pair[0].parts))
    return str(shown / path.relative_to(base))


def machine_search_dirs(explicit: Path | None, env: Mapping[str, str], cwd: Path) -> list[Path]:
    """Where to look for machine files, first match wins.

    ``--machines DIR``, then each folder in $QVM_MACHINES (separated by os.pathsep), then
    ./machines, then $XDG_CONFIG_HOME/qvm/machines (~/.config/qvm/machines by default).
    Relative folders are taken from ``cwd`` and ~ from $HOME in ``env``; nothing is read
    from the process or the disk.
    """
    home = Path(env["HOME"]) if env.get("HOME") else Path.home()
    dirs = [] if explicit is None else [_absolute(str(explicit), home, cwd)]
    dirs += [
        _absolute(entry, home, cwd)
        for entry in env.get("QVM_MACHINES", "").split(os.pathsep)
        if entry
    ]
    dirs.append(cwd / "machines")
    xdg = env.get("XDG_CONFIG_HOME", "")
    # The XDG spec says to ignore a relative XDG_CONFIG_HOME.
    config = Path(xdg) if xdg and Path(xdg).is_absolute() else home / ".config"
    dirs.append(config / "qvm" / "machines")
    return list(dict.fromkeys(dirs))


def _absolute(text: str, home: Path, cwd: Path) -> Path:
    if text == "~" or text.startswith("~/"):
        return home / text[2:]
    return cwd / text


def list_machine_files(search_dirs: Sequence[Path]) -> list[Path]:
    """Every machine file in ``search_dirs``, sorted by name; an earlier folder wins a tie."""
    found: dict[str, Path] = {}
    for directory in search_dirs:
        for path in sorted(directory.glob("*.toml")):
            # Editors leave dotted lock and backup files next to the real ones.
            if not path.name.startswith(".") and path.is_file():
                found.setdefault(path.stem, path)
    return [found[stem] for stem in sorted(found)]
