from __future__ import annotations

import textwrap
from pathlib import Path

import pytest

from qvm.definition import schema
from qvm.definition.discovery import find_machine, list_machine_files, machine_search_dirs
from qvm.definition.forwards import ForwardError, parse_forward
from qvm.definition.host_checks import check_host
from qvm.definition.load import load_machine
from qvm.errors import DefinitionError, Problem, QvmError

MIB = 1024**2
GIB = 1024**3
FILE = Path("machines/vm1.toml")


@pytest.fixture(autouse=True)
def in_tmp(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """Run in an empty folder with a machines/ folder, so messages name machines/vm1.toml."""
    monkeypatch.chdir(tmp_path)
    (tmp_path / "machines").mkdir()
    return tmp_path


def write(text: str, path: Path = FILE) -> Path:
    path.write_text(textwrap.dedent(text))
    return path


def load(text: str) -> schema.Machine:
    return load_machine(write(text))


def error_for(text: str, path: Path = FILE, name: str | None = None) -> DefinitionError:
    write(text, path)
    with pytest.raises(DefinitionError) as caught:
        load_machine(path, name)
    return caught.value


def only_message(text: str, path: Path = FILE, name: str | None = None) -> str:
    error = error_for(text, path, name)
    assert len(error.problems) == 1, str(error)
    return str(error)


# --- reading the file -------------------------------------------------------------


def test_invalid_toml_names_line_and_column() -> None:
    assert only_message("[cpu]\ncount 2\n") == (
        "machines/vm1.toml: invalid TOML: Expected '=' after a key in a key/value pair"
        " (at line 2, column 7)"
    )


def test_missing_file() -> None:
    with pytest.raises(DefinitionError) as caught:
        load_machine(Path("machines/nope.toml"))
    assert str(caught.value) == "machines/nope.toml: cannot read: No such file or directory"


def test_folder_instead_of_file() -> None:
    Path("machines/dir.toml").mkdir()
    with pytest.raises(DefinitionError) as caught:
        load_machine(Path("machines/dir.toml"))
    assert str(caught.value) == "machines/dir.toml: cannot read: Is a directory"


def test_not_utf8() -> None:
    FILE.write_bytes(b'name = "\xff"\n')
    with pytest.raises(DefinitionError) as caught:
        load_machine(FILE)
    assert str(caught.value) == "machines/vm1.toml: invalid TOML: not UTF-8 text (at byte 8)"


def test_definition_error_exit_code() -> None:
    assert error_for("[cpu]\ncount = 0\n").exit_code == 2


# --- one broken file per message, exact text --------------------------------------

CASES: list[tuple[str, str, str]] = [
    # (id, file, the complete message)
    # top level and name
    ("unknown-top-key", 'nmae = "x"', "nmae: unknown key (hint: did you mean 'name'?)"),
    (
        "unknown-table-no-match",
        "[networking]\nx = 1",
        "networking: unknown table (hint: valid keys: name, description, group, machine,"
        " cpu, memory, boot, disk, nic, share, hotplug, serial, agent, snapshots, supervisor,"
        " qemu, cloud_init)",
    ),
    ("unknown-table-close", "[cpus]\ncount = 2", "cpus: unknown table (hint: did you mean 'cpu'?)"),
    (
        "unknown-array-of-tables",
        "[[disks]]\nfile = 'a.img'",
        "disks: unknown table (hint: did you mean 'disk'?)",
    ),
    (
        "name-pattern",
        'name = "My VM"',
        "name: must be 1 to 63 lowercase letters, digits, '_' or '-', starting with a letter"
        ' or digit, got "My VM"',
    ),
    (
        "name-too-long",
        f'name = "{"a" * 64}"',
        "name: must be 1 to 63 lowercase letters, digits, '_' or '-', starting with a letter"
        f' or digit, got "{"a" * 64}"',
    ),
    ("name-type", "name = 5", "name: must be a string, got 5"),
    ("description-type", "description = 1", "description: must be a string, got 1"),
    (
        "group-pattern",
        'group = "Web servers"',
        "group: must be 1 to 63 lowercase letters, digits, '_' or '-', starting with a letter"
        ' or digit, got "Web servers"',
    ),
    ("group-type", 'group = ["web"]', 'group: must be a string, got ["web"]'),
    # [machine]
    (
        "machine-type",
        '[machine]\ntype = "q36"',
        'machine.type: must be one of "q35", "pc", "microvm", got "q36"'
        " (hint: did you mean 'q35'?)",
    ),
    (
        "machine-accel",
        '[machine]\naccel = "xen"',
        'machine.accel: must be one of "auto", "kvm", "tcg", got "xen"',
    ),
    ("machine-not-table", 'machine = "q35"', 'machine: must be a table, got "q35"'),
    (
        "machine-unknown-key",
        '[machine]\ntyp = "pc"',
        "machine.typ: unknown key (hint: did you mean 'type'?)",
    ),
    # [cpu]
    ("cpu-unknown-key", "[cpu]\ncout = 2", "cpu.cout: unknown key (hint: did you mean 'count'?)"),
    (
        "cpu-unknown-key-no-match",
        "[cpu]\nflags = 2",
        "cpu.flags: unknown key (hint: valid keys: model, count, max, sockets, dies, cores,"
        " threads)",
    ),
    ("cpu-count-string", '[cpu]\ncount = "two"', 'cpu.count: must be an integer, got "two"'),
    ("cpu-count-bool", "[cpu]\ncount = true", "cpu.count: must be an integer, got true"),
    ("cpu-count-float", "[cpu]\ncount = 2.0", "cpu.count: must be an integer, got 2.0"),
    ("cpu-count-zero", "[cpu]\ncount = 0", "cpu.count: must be >= 1, got 0"),
    (
        "cpu-count-over-max",
        "[cpu]\ncount = 6\nmax = 4",
        "cpu.count: must be <= cpu.max (4), got 6 (hint: raise cpu.max)",
    ),
    (
        "cpu-count-limit",
        "[cpu]\ncount = 2000",
        "cpu.count: must be <= 1024, got 2000 (hint: QEMU allows at most 1024 vCPUs)",
    ),
    (
        "cpu-max-limit",
        "[cpu]\nmax = 1025",
        "cpu.max: must be <= 1024, got 1025 (hint: QEMU allows at most 1024 vCPUs)",
    ),
    ("cpu-model-empty", '[cpu]\nmodel = ""', 'cpu.model: must not be empty, got ""'),
    ("cpu-model-type", "[cpu]\nmodel = 3", "cpu.model: must be a string, got 3"),
    ("cpu-threads-zero", "[cpu]\nthreads = 0", "cpu.threads: must be >= 1, got 0"),
    (
        "cpu-topology-product",
        "[cpu]\ncount = 4\nmax = 4\nsockets = 2\ncores = 1",
        "cpu: sockets*dies*cores*threads must equal cpu.max (4), got 2*1*1*1 = 2",
    ),
    (
        "cpu-topology-product-max-defaulted",
        "[cpu]\ncount = 2\nsockets = 2\ncores = 2",
        "cpu: sockets*dies*cores*threads must equal cpu.max (2), got 2*1*2*1 = 4"
        " (hint: cpu.max defaults to cpu.count; set cpu.max = 4)",
    ),
    (
        "cpu-topology-sockets-underivable",
        "[cpu]\ncount = 6\nmax = 6\ncores = 4",
        "cpu.sockets: cannot be derived: cpu.max (6) is not a multiple of"
        " dies*cores*threads = 1*4*1 = 4 (hint: set cpu.sockets or change cpu.max)",
    ),
    (
        "cpu-topology-cores-underivable",
        "[cpu]\ncount = 6\nsockets = 4\nthreads = 1",
        "cpu.cores: cannot be derived: cpu.max (6) is not a multiple of"
        " sockets*dies*threads = 4*1*1 = 4 (hint: set cpu.cores or change cpu.max)",
    ),
    (
        "cpu-microvm-hotplug",
        '[machine]\ntype = "microvm"\n[cpu]\ncount = 2\nmax = 4',
        "cpu.max: must equal cpu.count (2) on microvm, got 4"
        " (hint: microvm has no CPU hotplug; use q35)",
    ),
    ("cpu-not-table", "cpu = 4", "cpu: must be a table, got 4"),
    # [memory]
    (
        "memory-unknown-unit",
        '[memory]\nsize = "12X"',
        'memory.size: unknown unit "X", got "12X"'
        ' (hint: sizes look like "512M" or "2G"; K, M, G and T are powers of 1024)',
    ),
    (
        "memory-negative",
        '[memory]\nsize = "-1G"',
        'memory.size: must not be negative, got "-1G"'
        ' (hint: sizes look like "512M" or "2G"; K, M, G and T are powers of 1024)',
    ),
    (
        "memory-not-a-size",
        '[memory]\nsize = "lots"',
        'memory.size: must be a number with an optional unit, got "lots"'
        ' (hint: sizes look like "512M" or "2G"; K, M, G and T are powers of 1024)',
    ),
    (
        "memory-empty",
        '[memory]\nsize = ""',
        'memory.size: must not be empty, got ""'
        ' (hint: sizes look like "512M" or "2G"; K, M, G and T are powers of 1024)',
    ),
    (
        "memory-fraction-of-byte",
        '[memory]\nsize = "1.1"',
        'memory.size: must be a whole number of bytes, got "1.1"'
        ' (hint: sizes look like "512M" or "2G"; K, M, G and T are powers of 1024)',
    ),
    (
        "memory-float",
        "[memory]\nsize = 1.5",
        'memory.size: must be a size like "512M" or a number, got 1.5',
    ),
    ("memory-too-small", '[memory]\nsize = "8M"', 'memory.size: must be at least 16M, got "8M"'),
    (
        "memory-bare-number",
        "[memory]\nsize = 512",
        "memory.size: must be at least 16M, got 512 (hint: a bare number means bytes;"
        ' did you mean "512M"?)',
    ),
    (
        "memory-bare-number-string",
        '[memory]\nsize = "1024"',
        'memory.size: must be at least 16M, got "1024" (hint: a bare number means bytes;'
        ' did you mean "1024M"?)',
    ),
    (
        "memory-not-whole-mib",
        '[memory]\nsize = "16385K"',
        'memory.size: must be a multiple of 1M, got "16385K"',
    ),
    (
        "memory-max-below-size",
        '[memory]\nsize = "1G"\nmax = "512M"',
        'memory.max: must be >= memory.size (1G), got "512M"',
    ),
    (
        "memory-max-without-slots",
        '[memory]\nsize = "1G"\nmax = "2G"',
        "memory.slots: must be >= 1 when memory.max (2G) is larger than memory.size (1G)"
        " (hint: set memory.slots)",
    ),
    (
        "memory-max-with-zero-slots",
        '[memory]\nsize = "1G"\nmax = "2G"\nslots = 0',
        "memory.slots: must be >= 1 when memory.max (2G) is larger than memory.size (1G),"
        " got 0 (hint: set memory.slots)",
    ),
    (
        "memory-slots-without-max",
        "[memory]\nslots = 2",
        "memory.max: required when memory.slots is set"
        " (hint: set memory.max to the most memory the VM may grow to)",
    ),
    (
        "memory-slots-range",
        "[memory]\nslots = 300",
        "memory.slots: must be between 0 and 256, got 300",
    ),
    (
        "memory-microvm-max",
        '[machine]\ntype = "microvm"\n[memory]\nmax = "1G"',
        'memory.max: not supported on microvm, got "1G"'
        " (hint: microvm has no memory hotplug; use q35)",
    ),
    (
        "memory-microvm-slots",
        '[machine]\ntype = "microvm"\n[memory]\nslots = 0',
        "memory.slots: not supported on microvm, got 0"
        " (hint: microvm has no memory hotplug; use q35)",
    ),
    # [hotplug]
    (
        "hotplug-pci-slots-range",
        "[hotplug]\npci_slots = 17",
        "hotplug.pci_slots: must be between 0 and 16, got 17",
    ),
    (
        "hotplug-pci-slots-on-pc",
        '[machine]\ntype = "pc"\n[hotplug]\npci_slots = 2',
        "hotplug.pci_slots: only used on q35, got 2"
        " (hint: pc's PCI bus takes hotplugged devices as is; remove the key)",
    ),
    (
        "hotplug-port-id-taken",
        '[[disk]]\nfile = "a.raw"\nid = "hp1"',
        'disk[0].id: already used by hotplug.pci_slots (a PCIe root port), got "hp1"',
    ),
    # [boot]
    (
        "boot-initrd-without-kernel",
        '[boot]\ninitrd = "initrd.img"',
        'boot.initrd: needs boot.kernel, got "initrd.img"'
        " (hint: set boot.kernel or remove boot.initrd)",
    ),
    (
        "boot-append-without-kernel",
        '[boot]\nappend = "console=ttyS0"',
        'boot.append: needs boot.kernel, got "console=ttyS0"'
        " (hint: set boot.kernel or remove boot.append)",
    ),
    ("boot-kernel-type", "[boot]\nkernel = 5", "boot.kernel: must be a string, got 5"),
    ("boot-kernel-empty", '[boot]\nkernel = ""', 'boot.kernel: must not be empty, got ""'),
    # [[disk]]
    (
        "disk-single-brackets",
        '[disk]\nfile = "a.img"',
        'disk: must be an array of tables, got {file = "a.img"} (hint: write [[disk]], not [disk])',
    ),
    ("disk-not-table", 'disk = ["a.img"]', 'disk[0]: must be a table, got "a.img"'),
    ("disk-not-array", 'disk = "a.img"', 'disk: must be an array of tables, got "a.img"'),
    (
        "disk-neither-file-nor-base",
        "[[disk]]\nreadonly = true",
        "disk[0]: needs file or base"
        " (hint: file uses an image as is; base puts a copy-on-write overlay on an image)",
    ),
    (
        "disk-file-and-base",
        '[[disk]]\nfile = "a.img"\nbase = "b.qcow2"',
        "disk[0]: file and base are mutually exclusive"
        " (hint: file uses an image as is; base puts a copy-on-write overlay on an image)",
    ),
    (
        "disk-size-with-file",
        '[[disk]]\nfile = "a.img"\nsize = "10G"',
        'disk[0].size: only allowed with base, got "10G"'
        " (hint: qvm uses a file disk as is; resize it with qemu-img resize)",
    ),
    (
        "disk-size-zero",
        '[[disk]]\nbase = "b.qcow2"\nsize = "0"',
        'disk[0].size: must be > 0, got "0"',
    ),
    (
        "disk-format",
        '[[disk]]\nfile = "a.vmdk"\nformat = "vmdk"',
        'disk[0].format: must be one of "qcow2", "raw", got "vmdk"',
    ),
    (
        "disk-interface",
        '[[disk]]\nfile = "a.img"\ninterface = "virtio-blk"',
        'disk[0].interface: must be one of "virtio", "ide", "scsi", "nvme", got "virtio-blk"'
        " (hint: did you mean 'virtio'?)",
    ),
    (
        "disk-readonly",
        '[[disk]]\nfile = "a.img"\nreadonly = "yes"',
        'disk[0].readonly: must be true or false, got "yes"',
    ),
    (
        "disk-id-pattern",
        '[[disk]]\nfile = "a.img"\nid = "0disk"',
        "disk[0].id: must be a letter then up to 31 letters, digits, '_' or '-', got \"0disk\"",
    ),
    (
        "disk-id-duplicate",
        '[[disk]]\nfile = "a.img"\nid = "d"\n[[disk]]\nfile = "b.img"\nid = "d"',
        'disk[1].id: already used by disk[0].id, got "d"',
    ),
    (
        "disk-unknown-key",
        '[[disk]]\nfile = "a.img"\n[[disk]]\nfiel = "b.img"\nfile = "c.img"',
        "disk[1].fiel: unknown key (hint: did you mean 'file'?)",
    ),
    # [[nic]]
    (
        "nic-mode",
        '[[nic]]\nmode = "bridge"',
        'nic[0].mode: must be "user", got "bridge"'
        " (hint: only user-mode networking is supported for now)",
    ),
    (
        "nic-mode-typo",
        '[[nic]]\nmode = "usr"',
        'nic[0].mode: must be "user", got "usr" (hint: did you mean \'user\'?)',
    ),
    (
        "nic-model",
        '[[nic]]\nmodel = "e1000x"',
        'nic[0].model: must be one of "virtio-net-pci", "e1000", "e1000e", "rtl8139",'
        " got \"e1000x\" (hint: did you mean 'e1000', 'e1000e'?)",
    ),
    (
        "nic-mac-shape",
        '[[nic]]\nmac = "52:54:00"',
        'nic[0].mac: must be a MAC address like "52:54:00:12:34:56", got "52:54:00"',
    ),
    (
        "nic-mac-multicast",
        '[[nic]]\nmac = "01:00:5e:00:00:01"',
        'nic[0].mac: must be a unicast MAC address (an even first byte), got "01:00:5e:00:00:01"'
        " (hint: QEMU's own prefix 52:54:00 is a safe choice)",
    ),
    (
        "nic-forwards-not-list",
        '[[nic]]\nforwards = "tcp:2222:22"',
        'nic[0].forwards: must be a list of strings, got "tcp:2222:22"',
    ),
    (
        "nic-forward-not-string",
        "[[nic]]\nforwards = [2222]",
        "nic[0].forwards[0]: must be a string, got 2222",
    ),
    (
        "nic-forward-shape",
        '[[nic]]\nforwards = ["tcp:22"]',
        'nic[0].forwards[0]: must look like PROTO:[HOSTADDR:]HOSTPORT:GUESTPORT, got "tcp:22"'
        ' (hint: forwards look like "tcp:2222:22" or "udp:0.0.0.0:5353:53")',
    ),
    (
        "nic-forward-protocol",
        '[[nic]]\nforwards = ["sctp:2222:22"]',
        'nic[0].forwards[0]: protocol must be "tcp" or "udp", got "sctp:2222:22"'
        ' (hint: forwards look like "tcp:2222:22" or "udp:0.0.0.0:5353:53")',
    ),
    (
        "nic-forward-host-addr",
        '[[nic]]\nforwards = ["tcp:localhost:2222:22"]',
        "nic[0].forwards[0]: host address must be an IPv4 address like 127.0.0.1,"
        ' got "tcp:localhost:2222:22"'
        ' (hint: forwards look like "tcp:2222:22" or "udp:0.0.0.0:5353:53")',
    ),
    (
        "nic-forward-host-port",
        '[[nic]]\nforwards = ["tcp:70000:22"]',
        'nic[0].forwards[0]: host port must be a number between 0 and 65535, got "tcp:70000:22"'
        ' (hint: forwards look like "tcp:2222:22" or "udp:0.0.0.0:5353:53")',
    ),
    (
        "nic-forward-guest-port",
        '[[nic]]\nforwards = ["tcp:2222:0"]',
        'nic[0].forwards[0]: guest port must be a number between 1 and 65535, got "tcp:2222:0"'
        ' (hint: forwards look like "tcp:2222:22" or "udp:0.0.0.0:5353:53")',
    ),
    (
        "nic-forward-clash-across-nics",
        '[[nic]]\nforwards = ["tcp:2222:22"]\n[[nic]]\nforwards = ["udp:2222:22", "tcp:2222:23"]',
        "nic[1].forwards[1]: host port 2222 (tcp) is already forwarded by nic[0].forwards[0],"
        ' got "tcp:2222:23"',
    ),
    (
        "nic-forward-clash-any-address",
        '[[nic]]\nforwards = ["tcp:10.0.0.1:80:80", "tcp:0.0.0.0:80:8080"]',
        "nic[0].forwards[1]: host port 80 (tcp) is already forwarded by nic[0].forwards[0],"
        ' got "tcp:0.0.0.0:80:8080"',
    ),
    (
        "nic-id-duplicate-of-disk",
        '[[disk]]\nfile = "a.img"\nid = "dev0"\n[[nic]]\nid = "dev0"',
        'nic[0].id: already used by disk[0].id, got "dev0"',
    ),
    # [serial], [supervisor], [qemu]
    (
        "serial-enabled",
        '[serial]\nenabled = "yes"',
        'serial.enabled: must be true or false, got "yes"',
    ),
    (
        "supervisor-restart",
        '[supervisor]\nrestart = "sometimes"',
        'supervisor.restart: must be one of "no", "on-failure", "always", got "sometimes"',
    ),
    (
        "supervisor-restart-typo",
        '[supervisor]\nrestart = "on_failure"',
        'supervisor.restart: must be one of "no", "on-failure", "always", got "on_failure"'
        " (hint: did you mean 'on-failure'?)",
    ),
    (
        "supervisor-max-restarts",
        "[supervisor]\nmax_restarts = -1",
        "supervisor.max_restarts: must be >= 0, got -1",
    ),
    (
        "supervisor-delay-zero",
        "[supervisor]\nrestart_delay = 0",
        "supervisor.restart_delay: must be a number of seconds > 0, got 0",
    ),
    (
        "supervisor-delay-inf",
        "[supervisor]\nrestart_delay = inf",
        "supervisor.restart_delay: must be a number of seconds > 0, got inf",
    ),
    (
        "supervisor-delay-string",
        '[supervisor]\nrestart_delay = "1s"',
        'supervisor.restart_delay: must be a number, got "1s"',
    ),
    ("qemu-binary-empty", '[qemu]\nbinary = ""', 'qemu.binary: must not be empty, got ""'),
    (
        "qemu-extra-args-string",
        '[qemu]\nextra_args = "-s"',
        'qemu.extra_args: must be a list of strings, got "-s"',
    ),
    (
        "qemu-extra-args-item",
        '[qemu]\nextra_args = ["-s", 1]',
        "qemu.extra_args[1]: must be a string, got 1",
    ),
    # how "got" shows other TOML values
    ("got-array", "[cpu]\ncount = [1, 2]", "cpu.count: must be an integer, got [1, 2]"),
    (
        "got-inline-table",
        '[cpu]\ncount = {a = 1, "b c" = "d"}',
        'cpu.count: must be an integer, got {a = 1, "b c" = "d"}',
    ),
    (
        "got-datetime",
        "[cpu]\ncount = 1979-05-27T07:32:00Z",
        "cpu.count: must be an integer, got 1979-05-27T07:32:00+00:00",
    ),
    ("got-escapes", '[cpu]\ncount = "a\\"b\\n"', 'cpu.count: must be an integer, got "a\\"b\\n"'),
]


@pytest.mark.parametrize(("toml", "message"), [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_one_problem_exact_message(toml: str, message: str) -> None:
    assert only_message(toml + "\n") == f"machines/vm1.toml: {message}"


def test_case_ids_are_unique() -> None:
    ids = [case[0] for case in CASES]
    assert len(ids) == len(set(ids))


@pytest.mark.parametrize(
    ("stem", "hint"),
    [
        ("My VM", 'set name = "my-vm" in the file, or rename it to my-vm.toml'),
        ("__", "set name in the file, or rename it"),  # no name to suggest
    ],
)
def test_invalid_file_stem_without_name(stem: str, hint: str) -> None:
    message = only_message("", Path(f"machines/{stem}.toml"))
    assert message == (
        f"machines/{stem}.toml: name: not set, and the file's name is not a valid machine name"
        " (1 to 63 lowercase letters, digits, '_' or '-', starting with a letter or digit),"
        f' got "{stem}" (hint: {hint})'
    )


def test_invalid_file_stem_is_fine_with_a_name() -> None:
    assert load_machine(write('name = "vm2"\n', Path("machines/My VM.toml"))).name == "vm2"


def test_invalid_name_argument() -> None:
    assert only_message("", name="Bad") == (
        "machines/vm1.toml: name: must be 1 to 63 lowercase letters, digits, '_' or '-',"
        ' starting with a letter or digit, got "Bad"'
    )


def test_file_named_by_absolute_path(in_tmp: Path) -> None:
    path = in_tmp / "machines" / "vm1.toml"
    assert only_message("[cpu]\ncount = 0\n", path) == f"{path}: cpu.count: must be >= 1, got 0"


# --- every problem at once ----------------------------------------------------------


def test_all_problems_are_reported_in_one_error() -> None:
    error = error_for(
        """\
        [cpu]
        cout = 2
        count = "two"
        [memory]
        size = "12X"
        [[disk]]
        readonly = 1
        [[nic]]
        forwards = ["tcp:22"]
        [qemu]
        extra_args = [1]
        """
    )
    assert [problem.key for problem in error.problems] == [
        "cpu.cout",
        "cpu.count",
        "memory.size",
        "disk[0]",
        "disk[0].readonly",
        "nic[0].forwards[0]",
        "qemu.extra_args[0]",
    ]
    assert all(problem.file == "machines/vm1.toml" for problem in error.problems)
    assert (
        str(error).splitlines()[1] == 'machines/vm1.toml: cpu.count: must be an integer, got "two"'
    )


def test_invalid_values_do_not_cascade() -> None:
    # A broken cpu.max must not also produce count/topology complaints built on a default.
    error = error_for('[cpu]\ncount = 4\nmax = "eight"\nsockets = 2\n')
    assert [str(p) for p in error.problems] == [
        'machines/vm1.toml: cpu.max: must be an integer, got "eight"'
    ]


# --- valid files ----------------------------------------------------------------------


def test_minimal_file_gets_defaults() -> None:
    machine = load("")
    assert machine == schema.Machine(name="vm1", path=Path.cwd() / "machines" / "vm1.toml")
    assert machine.memory == schema.MemorySpec(size=512 * MIB, max=None, slots=0)
    assert machine.cpu == schema.CpuSpec(model=None, count=1, max=1)


def test_full_file_round_trips(in_tmp: Path) -> None:
    machine = load(
        """\
        name = "web-1"
        description = "a test box"

        [machine]
        type = "pc"
        accel = "kvm"

        [cpu]
        model = "IvyBridge"
        count = 2
        max = 8
        sockets = 2
        threads = 2

        [memory]
        size = "1G"
        max = 4294967296
        slots = 4

        [boot]
        kernel = "../build/test-guest/bzImage"
        initrd = "/srv/initrd.img"
        append = "console=ttyS0"

        [[disk]]
        file = "disks/data.raw"
        format = "raw"
        interface = "nvme"
        readonly = true
        id = "data"

        [[disk]]
        base = "base.qcow2"
        size = "20G"

        [[nic]]
        model = "e1000e"
        mac = "52:54:00:AB:cd:01"
        forwards = ["tcp:2222:22", "UDP:0.0.0.0:0:53"]
        id = "net0"

        [[nic]]

        [serial]
        enabled = false

        [supervisor]
        restart = "on-failure"
        max_restarts = 0
        restart_delay = 2

        [qemu]
        binary = "/opt/qemu/bin/qemu-system-x86_64"
        extra_args = ["-s", "-device", "virtio-rng-pci"]
        """
    )
    machines = in_tmp / "machines"
    assert machine == schema.Machine(
        name="web-1",
        path=machines / "vm1.toml",
        type="pc",
        accel="kvm",
        cpu=schema.CpuSpec(
            model="IvyBridge", count=2, max=8, sockets=2, dies=1, cores=2, threads=2
        ),
        memory=schema.MemorySpec(size=GIB, max=4 * GIB, slots=4),
        boot=schema.BootSpec(
            kernel=in_tmp / "build" / "test-guest" / "bzImage",
            initrd=Path("/srv/initrd.img"),
            append="console=ttyS0",
        ),
        disks=(
            schema.DiskSpec(
                file=machines / "disks" / "data.raw",
                format="raw",
                interface="nvme",
                readonly=True,
                id="data",
            ),
            schema.DiskSpec(base=machines / "base.qcow2", size=20 * GIB),
        ),
        nics=(
            schema.NicSpec(
                model="e1000e",
                mac="52:54:00:ab:cd:01",
                forwards=(
                    schema.PortForward("tcp", "127.0.0.1", 2222, 22),
                    schema.PortForward("udp", "0.0.0.0", 0, 53),
                ),
                id="net0",
            ),
            schema.NicSpec(),
        ),
        serial=schema.SerialSpec(enabled=False),
        supervisor=schema.SupervisorSpec(restart="on-failure", max_restarts=0, restart_delay=2.0),
        qemu=schema.QemuSpec(
            binary="/opt/qemu/bin/qemu-system-x86_64",
            extra_args=("-s", "-device", "virtio-rng-pci"),
        ),
    )
    assert isinstance(machine.supervisor.restart_delay, float)


def test_paths_resolve_against_the_file_folder_not_cwd(
    in_tmp: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    (in_tmp / "elsewhere" / "deep").mkdir(parents=True)
    write('[boot]\nkernel = "k/bzImage"\n[[disk]]\nfile = "../img/a.img"\n')
    monkeypatch.chdir(in_tmp / "elsewhere" / "deep")
    machine = load_machine(in_tmp / "machines" / "vm1.toml")
    assert machine.boot.kernel == in_tmp / "machines" / "k" / "bzImage"
    assert machine.disks[0].file == in_tmp / "img" / "a.img"


def test_path_from_a_relative_file_name_is_absolute(in_tmp: Path) -> None:
    assert load("").path == in_tmp / "machines" / "vm1.toml"
    assert load("").path.is_absolute()


def test_tilde_expands_to_home(in_tmp: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HOME", str(in_tmp / "home"))
    machine = load('[[disk]]\nbase = "~/images/base.qcow2"\n')
    assert machine.disks[0].base == in_tmp / "home" / "images" / "base.qcow2"


def test_name_defaults_to_stem() -> None:
    assert load_machine(write("", Path("machines/db-2.toml"))).name == "db-2"


def test_name_argument_overrides_file_and_stem() -> None:
    assert load_machine(write('name = "web"\n'), name="web-copy-3").name == "web-copy-3"


def test_description_is_accepted_and_ignored() -> None:
    assert load('description = ""\n') == load("")


def test_microvm_without_hotplug_is_fine() -> None:
    machine = load('[machine]\ntype = "microvm"\n[cpu]\ncount = 2\nmax = 2\n')
    assert (machine.type, machine.cpu.count, machine.cpu.max) == ("microvm", 2, 2)


def test_memory_hotplug() -> None:
    memory = load('[memory]\nsize = "1G"\nmax = "1G"\nslots = 1\n').memory
    assert memory == schema.MemorySpec(size=GIB, max=GIB, slots=1)


@pytest.mark.parametrize(
    ("cpu", "expected"),
    [
        ("count = 4", (None, None, None, None)),
        ("count = 4\nsockets = 4", (4, 1, 1, 1)),
        ("count = 4\ncores = 4", (1, 1, 4, 1)),
        ("count = 8\nsockets = 2", (2, 1, 4, 1)),
        ("count = 8\ncores = 2", (4, 1, 2, 1)),
        ("count = 2\nmax = 16\nsockets = 2\nthreads = 2", (2, 1, 4, 2)),
        ("count = 2\nmax = 16\ndies = 2\ncores = 4", (2, 2, 4, 1)),
        ("count = 8\nsockets = 2\ndies = 2\ncores = 2\nthreads = 1", (2, 2, 2, 1)),
    ],
)
def test_topology_filling(cpu: str, expected: tuple[int | None, ...]) -> None:
    spec = load(f"[cpu]\n{cpu}\n").cpu
    assert (spec.sockets, spec.dies, spec.cores, spec.threads) == expected


def test_topology_without_sockets_and_cores_sets_both_to_one() -> None:
    assert only_message("[cpu]\ncount = 8\nthreads = 2\n") == (
        "machines/vm1.toml: cpu: sockets*dies*cores*threads must equal cpu.max (8), got 1*1*1*2 = 2"
    )


# --- port forwards --------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("tcp:2222:22", schema.PortForward("tcp", "127.0.0.1", 2222, 22)),
        ("udp:0:53", schema.PortForward("udp", "127.0.0.1", 0, 53)),
        ("TCP:0.0.0.0:8080:80", schema.PortForward("tcp", "0.0.0.0", 8080, 80)),
        ("tcp:192.168.1.5:65535:65535", schema.PortForward("tcp", "192.168.1.5", 65535, 65535)),
    ],
)
def test_parse_forward(text: str, expected: schema.PortForward) -> None:
    assert parse_forward(text) == expected


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("", 'invalid port forward "": must look like PROTO:[HOSTADDR:]HOSTPORT:GUESTPORT'),
        (
            "tcp:22",
            'invalid port forward "tcp:22": must look like PROTO:[HOSTADDR:]HOSTPORT:GUESTPORT',
        ),
        (
            "tcp:1:2:3:4",
            'invalid port forward "tcp:1:2:3:4": must look like'
            " PROTO:[HOSTADDR:]HOSTPORT:GUESTPORT",
        ),
        ("icmp:1:2", 'invalid port forward "icmp:1:2": protocol must be "tcp" or "udp"'),
        (
            "tcp::2222:22",
            'invalid port forward "tcp::2222:22": host address must be an IPv4 address like'
            " 127.0.0.1",
        ),
        (
            "tcp:::1:2222:22",
            'invalid port forward "tcp:::1:2222:22": must look like'
            " PROTO:[HOSTADDR:]HOSTPORT:GUESTPORT",
        ),
        (
            "tcp:-1:22",
            'invalid port forward "tcp:-1:22": host port must be a number between 0 and 65535',
        ),
        (
            "tcp:ssh:22",
            'invalid port forward "tcp:ssh:22": host port must be a number between 0 and 65535',
        ),
        (
            "tcp:2222:65536",
            'invalid port forward "tcp:2222:65536": guest port must be a number between 1 and'
            " 65535",
        ),
        (
            "tcp:2222: 22",
            'invalid port forward "tcp:2222: 22": guest port must be a number between 1 and 65535',
        ),
    ],
)
def test_parse_forward_rejects(text: str, message: str) -> None:
    with pytest.raises(ValueError) as caught:
        parse_forward(text)
    assert str(caught.value) == message
    assert isinstance(caught.value, ForwardError)


def test_forwards_to_port_zero_never_clash() -> None:
    nic = load('[[nic]]\nforwards = ["tcp:0:22", "tcp:0:80"]\n').nics[0]
    assert [f.host_port for f in nic.forwards] == [0, 0]


def test_same_port_on_different_addresses_is_fine() -> None:
    nic = load('[[nic]]\nforwards = ["tcp:127.0.0.1:80:80", "tcp:10.0.0.1:80:80"]\n').nics[0]
    assert len(nic.forwards) == 2


# --- check_host ---------------------------------------------------------------------

CPU_MODELS = ("host", "max", "qemu64", "Haswell", "IvyBridge", "IvyBridge-IBRS")
MACHINE_TYPES = ("pc", "q35", "pc-q35-8.2", "pc-i440fx-8.2", "microvm", "none")


def test_check_host_all_good(in_tmp: Path) -> None:
    (in_tmp / "machines" / "bzImage").write_bytes(b"")
    (in_tmp / "machines" / "a.img").write_bytes(b"")
    machine = load(
        '[cpu]\nmodel = "Haswell"\n[boot]\nkernel = "bzImage"\n[[disk]]\nfile = "a.img"\n'
    )
    assert check_host(machine, CPU_MODELS, MACHINE_TYPES) == []


def test_check_host_missing_files(in_tmp: Path) -> None:
    machine = load(
        """\
        [boot]
        kernel = "../build/test-guest/bzImage"
        initrd = "initrd.img"
        [[disk]]
        file = "a.img"
        [[disk]]
        base = "/nonexistent/base.qcow2"
        """
    )
    file = str(in_tmp / "machines" / "vm1.toml")
    assert [str(p) for p in check_host(machine, CPU_MODELS, MACHINE_TYPES)] == [
        f'{file}: boot.kernel: file not found, got "{in_tmp}/build/test-guest/bzImage"'
        " (hint: run scripts/build-test-guest)",
        f'{file}: boot.initrd: file not found, got "{in_tmp}/machines/initrd.img"'
        " (hint: check the path)",
        f'{file}: disk[0].file: file not found, got "{in_tmp}/machines/a.img"'
        " (hint: check the path)",
        f'{file}: disk[1].base: file not found, got "/nonexistent/base.qcow2"'
        " (hint: check the path)",
    ]


def test_check_host_folder_instead_of_file(in_tmp: Path) -> None:
    (in_tmp / "machines" / "kernel").mkdir()
    machine = load('[boot]\nkernel = "kernel"\n')
    assert check_host(machine, CPU_MODELS, MACHINE_TYPES) == [
        Problem(
            str(in_tmp / "machines" / "vm1.toml"),
            "boot.kernel",
            "is a folder, not a file",
            f'"{in_tmp}/machines/kernel"',
            "check the path",
        )
    ]


def test_check_host_unknown_cpu_model_with_suggestions() -> None:
    machine = load('[cpu]\nmodel = "IvyBrige"\n')
    assert [str(p) for p in check_host(machine, CPU_MODELS, MACHINE_TYPES)] == [
        f'{machine.path}: cpu.model: unknown to qemu-system-x86_64, got "IvyBrige"'
        " (hint: did you mean 'IvyBridge', 'IvyBridge-IBRS'?"
        " 'qemu-system-x86_64 -cpu help' lists them)"
    ]


def test_check_host_unknown_cpu_model_without_suggestions() -> None:
    machine = load('[cpu]\nmodel = "Zen9"\n[qemu]\nbinary = "qemu-kvm"\n')
    assert [str(p) for p in check_host(machine, CPU_MODELS, MACHINE_TYPES)] == [
        f'{machine.path}: cpu.model: unknown to qemu-kvm, got "Zen9"'
        " (hint: 'qemu-kvm -cpu help' lists them)"
    ]


def test_check_host_skips_model_when_unset() -> None:
    assert check_host(load(""), (), MACHINE_TYPES) == []


def test_check_host_unknown_machine_type() -> None:
    machine = load('[machine]\ntype = "microvm"\n')
    assert [str(p) for p in check_host(machine, CPU_MODELS, ("pc", "q35"))] == [
        f'{machine.path}: machine.type: unknown to qemu-system-x86_64, got "microvm"'
        " (hint: 'qemu-system-x86_64 -machine help' lists them)"
    ]


# --- finding machine files ------------------------------------------------------------


def test_search_dirs_order(tmp_path: Path) -> None:
    cwd = tmp_path / "project"
    env = {
        "HOME": "/home/u",
        "QVM_MACHINES": "/a:rel::~/b",
        "XDG_CONFIG_HOME": "/xdg",
    }
    assert machine_search_dirs(Path("given"), env, cwd) == [
        cwd / "given",
        Path("/a"),
        cwd / "rel",
        Path("/home/u/b"),
        cwd / "machines",
        Path("/xdg/qvm/machines"),
    ]


def test_search_dirs_defaults(tmp_path: Path) -> None:
    assert machine_search_dirs(None, {"HOME": "/home/u"}, tmp_path) == [
        tmp_path / "machines",
        Path("/home/u/.config/qvm/machines"),
    ]


def test_search_dirs_ignore_relative_xdg_and_duplicates(tmp_path: Path) -> None:
    env = {"HOME": "/home/u", "XDG_CONFIG_HOME": "cfg", "QVM_MACHINES": str(tmp_path / "machines")}
    assert machine_search_dirs(tmp_path / "machines", env, tmp_path) == [
        tmp_path / "machines",
        Path("/home/u/.config/qvm/machines"),
    ]


def test_find_machine_by_name_first_dir_wins(in_tmp: Path) -> None:
    first, second = in_tmp / "first", in_tmp / "second"
    first.mkdir()
    second.mkdir()
    (second / "vm1.toml").write_text("")
    assert find_machine("vm1", [first, second]) == second / "vm1.toml"
    (first / "vm1.toml").write_text("")
    assert find_machine("vm1", [first, second]) == first / "vm1.toml"


def test_find_machine_by_path(in_tmp: Path) -> None:
    write("")
    assert find_machine("machines/vm1.toml", []) == Path("machines/vm1.toml")
    (in_tmp / "other").mkdir()
    (in_tmp / "other" / "box").write_text("")
    assert find_machine("other/box", [in_tmp / "machines"]) == Path("other/box")


def test_find_machine_path_missing() -> None:
    with pytest.raises(QvmError) as caught:
        find_machine("vm9.toml", [Path("machines")])
    assert str(caught.value) == "no machine file at 'vm9.toml' (hint: check the path)"


def test_find_machine_name_missing(in_tmp: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    home = in_tmp / "home"
    monkeypatch.setenv("HOME", str(home))
    dirs = machine_search_dirs(None, {"HOME": str(home)}, in_tmp)
    with pytest.raises(QvmError) as caught:
        find_machine("vm1", dirs)
    assert str(caught.value) == (
        "vm1: no such machine (looked in: machines, ~/.config/qvm/machines)"
        " (hint: create machines/vm1.toml or pass --machines DIR)"
    )


def test_find_machine_name_missing_outside_cwd_and_home(
    in_tmp: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("HOME", str(in_tmp / "home"))
    monkeypatch.chdir(in_tmp / "machines")
    with pytest.raises(QvmError) as caught:
        find_machine("vm1", [Path("/nonexistent/qvm")])
    assert str(caught.value) == (
        "vm1: no such machine (looked in: /nonexistent/qvm)"
        " (hint: create /nonexistent/qvm/vm1.toml or pass --machines DIR)"
    )


def test_list_machine_files(in_tmp: Path) -> None:
    first, second = in_tmp / "first", in_tmp / "second"
    for folder, names in {
        first: ["b.toml", "a.toml", "notes.txt", ".#a.toml"],
        second: ["a.toml", "c.toml"],
    }.items():
        folder.mkdir()
        for name in names:
            (folder / name).write_text("")
    (first / "dir.toml").mkdir()  # listed: reading it says what is wrong
    found = list_machine_files([first, in_tmp / "missing", second])
    assert found == [first / "a.toml", first / "b.toml", second / "c.toml", first / "dir.toml"]


# --- the key reference --------------------------------------------------------------


def test_keys_cover_every_table_and_documented_key() -> None:
    assert list(schema.KEYS) == [
        "",
        "machine",
        "cpu",
        "memory",
        "boot",
        "disk",
        "nic",
        "share",
        "hotplug",
        "serial",
        "agent",
        "snapshots",
        "supervisor",
        "qemu",
        "cloud_init",
    ]
    assert all(doc for table in schema.KEYS.values() for doc in table.values())
