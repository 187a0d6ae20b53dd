"""Bad input gives one line, never a traceback (issue 11): VM names that are not names,
timeouts that are not numbers of seconds, an unusable state dir, a forward on an address
this host does not have, a device id of one kind taken by another, and machine files
with a path under an unknown user's home, deep nesting, huge numbers, a NUL, or a huge
value. Pure checks are tested directly; the rest through the real CLI, which boots no VM
here: every one of these is refused before anything starts.
"""

from __future__ import annotations

import hashlib
import math
import os
import subprocess
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
from framework.harness import Qvm, one_line_error, scratch_qvm

from qvm.errors import (
    EXIT_USAGE,
    DefinitionError,
    HostError,
    HotplugError,
    QvmError,
    UsageError,
    VmNameError,
)
from qvm.layout.rundir import RunDir

# an address from TEST-NET-1 (RFC 5737): no host has it
FOREIGN_ADDR = "192.0.2.1"
MAX_LINE = 400


@pytest.fixture
def cli() -> Iterator[Qvm]:
    with scratch_qvm("vm1") as qvm:
        yield qvm


def _short_line(done: subprocess.CompletedProcess[str]) -> str:
    line = one_line_error(done)
    assert line.startswith("qvm: "), line
    assert len(line) <= MAX_LINE, line[:300]
    return line


# --- VM names ---------------------------------------------------------------------------

# the arguments after the VM name that a command needs, where it needs any
ARGUMENTS = {
    "new": ["--kernel", "/nonexistent/vmlinuz"],
    "qmp": ["query-status"],
    "cpu set": ["2"],
    "mem add": ["256M"],
    "mem del": ["dimm0"],
    "mem resize": ["vmem0", "256M"],
    "disk attach": ["--new", "1G"],
    "disk detach": ["disk0"],
    "nic del": ["net0"],
    "port add": ["tcp:0:22"],
    "port del": ["2222"],
}


def with_arguments(*words: str) -> list[tuple[str, list[str]]]:
    return [(word, ARGUMENTS.get(word, [])) for word in words]


# every command that takes a VM name, with the other arguments it needs
NAMED_COMMANDS = [
    *with_arguments(
        "up", "down", "kill", "restart", "status", "logs", "console", "cmdline", "new",
        "reset", "rm", "ssh", "qmp", "cpu list", "cpu add", "cpu del", "cpu set", "mem list",
        "mem add", "mem del", "mem resize", "disk list", "disk attach", "disk detach",
        "nic list", "nic add", "nic del", "port list", "port add", "port del",
    ),
    ("rm", ["--purge"]),
    ("wait", ["--timeout", "1"]),
]  # fmt: skip
BAD_NAMES = ["..", ".", "", "a" * 300, "UPPER", "x\ny"]


def _tree_digest(root: Path) -> dict[str, str]:
    digest = {}
    for path in sorted(root.rglob("*")):
        if path.is_file() and not path.is_symlink():
            digest[str(path.relative_to(root))] = hashlib.sha256(path.read_bytes()).hexdigest()
        else:
            digest[str(path.relative_to(root))] = "dir"
    return digest


def test_every_command_refuses_a_name_that_is_not_a_vm_name(cli: Qvm) -> None:
    # a decoy around the state dir: `rm ..` once emptied the folder above it
    (cli.root / "decoy").mkdir()
    (cli.root / "decoy" / "precious.txt").write_text("the user's own file\n")
    cli.state_dir.mkdir(mode=0o700)
    (cli.state_dir / "keep.txt").write_text("not a run dir\n")
    before = _tree_digest(cli.root)
    calls = [[*word.split(), name, *extra] for word, extra in NAMED_COMMANDS for name in BAD_NAMES]
    with ThreadPoolExecutor(4) as pool:
        results = list(pool.map(lambda argv: cli(*argv, check=False, timeout=30), calls))
    for argv, done in zip(calls, results, strict=True):
        line = _short_line(done)
        # up, restart and cmdline look a name up as a file's stem first (NAME.toml may set
        # another name inside): one that is no file's is then not found
        refused = ("not a VM name", "NAME: must be", "no machine named", "no VM named")
        assert any(text in line for text in refused), (argv, line)
        assert "aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa" not in line, argv
    assert _tree_digest(cli.root) == before


def test_a_path_with_a_slash_is_a_machine_file_not_a_name(cli: Qvm) -> None:
    line = _short_line(cli("status", "a/b", check=False))
    assert line == "qvm: no machine file at 'a/b' (hint: check the path)"
    # and a .toml path is the user's file, which stays allowed
    assert cli("cmdline", str(cli.machines_dir / "vm1.toml"), check=False).returncode == 0


def test_run_dir_goes_through_the_name_check(tmp_path: Path) -> None:
    from qvm.cli import resolve

    resolve.configure(None, tmp_path)
    try:
        for name in BAD_NAMES:
            with pytest.raises(VmNameError):
                resolve.run_dir(name)
            with pytest.raises(VmNameError):
                resolve.run_dir_of(name)
        assert resolve.run_dir("vm1") == RunDir(tmp_path / "vm1")
    finally:
        resolve.configure(None, None)


def test_find_machine_refuses_what_cannot_be_a_file_stem(tmp_path: Path) -> None:
    from qvm.definition.discovery import find_machine

    for name in ("", ".", "..", "a\0b", "a" * 300):
        with pytest.raises(VmNameError) as error:
            find_machine(name, [tmp_path])
        assert len(str(error.value)) < 200
    with pytest.raises(QvmError, match="no machine file at"):
        find_machine("~nosuchuser/x.toml", [tmp_path])


# --- timeouts ---------------------------------------------------------------------------

TIMED_COMMANDS = with_arguments(
    "down", "restart", "wait", "qmp", "cpu add", "cpu del", "cpu set", "mem add", "mem del",
    "mem resize", "disk detach", "nic del",
)  # fmt: skip


def test_every_timeout_must_be_a_number_of_seconds(cli: Qvm) -> None:
    calls = [
        [*word.split(), "vm1", *extra, "--timeout", value]
        for word, extra in TIMED_COMMANDS
        for value in ("nan", "inf", "-inf", "-1", "1e300")
    ]
    with ThreadPoolExecutor(4) as pool:
        # `qvm wait --timeout nan` once never returned: the subprocess timeout catches it
        results = list(pool.map(lambda argv: cli(*argv, check=False, timeout=30), calls))
    for argv, done in zip(calls, results, strict=True):
        line = _short_line(done)
        assert line.startswith("qvm: --timeout: must be a number of seconds"), (argv, line)
        assert done.returncode == 2, argv


def test_timeout_seconds() -> None:
    from qvm.cli.resolve import timeout_seconds

    assert timeout_seconds(0.0) == 0.0
    assert timeout_seconds(2.5) == 2.5
    for bad in (math.nan, math.inf, -math.inf, -0.5, 1e300):
        with pytest.raises(UsageError, match="--timeout: must be a number of seconds") as raised:
            timeout_seconds(bad)
        assert raised.value.exit_code == EXIT_USAGE


def test_wait_ready_refuses_nan_instead_of_waiting_forever(tmp_path: Path) -> None:
    from qvm.ops.access import wait_ready

    with pytest.raises(QvmError, match="timeout"):
        wait_ready(RunDir(tmp_path / "vm1"), "qmp", None, math.nan)


# --- the state dir ----------------------------------------------------------------------


def _unusable_state_dirs(root: Path) -> list[Path]:
    a_file = root / "a-file"
    a_file.write_text("")
    real = root / "real"
    real.mkdir(mode=0o700)
    link = root / "link"
    link.symlink_to(real)
    open_to_all = root / "open"
    open_to_all.mkdir()
    open_to_all.chmod(0o777)
    return [Path("/dev/null"), a_file, link, open_to_all]


@pytest.mark.parametrize(
    "argv",
    [
        ["status", "vm1"],
        ["list"],
        ["up", "vm1"],
        ["rm", "vm1"],
        ["reset", "vm1"],
        ["logs", "vm1"],
        ["down", "vm1"],
        ["cpu", "list", "vm1"],
        ["port", "list", "vm1"],
    ],
)
def test_an_unusable_state_dir_is_one_line(cli: Qvm, argv: list[str]) -> None:
    scratch = cli.root / "unusable"  # removed with the fixture's root
    scratch.mkdir()
    for state in _unusable_state_dirs(scratch):
        env = cli.env() | {"QVM_STATE_DIR": str(state)}
        done = subprocess.run(
            [str(cli_bin()), *argv], capture_output=True, text=True, env=env, timeout=30
        )
        line = _short_line(done)
        assert f"state dir {state}" in line, line


def cli_bin() -> Path:
    from framework.harness import QVM_BIN

    return QVM_BIN


# --- forwards on an address this host does not have -------------------------------------


def test_a_forward_on_a_foreign_address_is_refused_at_plan_time(cli: Qvm) -> None:
    path = cli.machine("fwd", f'[[nic]]\nforwards = ["tcp:{FOREIGN_ADDR}:2222:22"]\n')
    for command in ("cmdline", "up"):
        line = _short_line(cli(command, "fwd", check=False))
        assert line.startswith(f"qvm: {path}: nic[0].forwards[0]: host address {FOREIGN_ADDR}")
        assert "not an address of this host" in line
    assert not (cli.state_dir / "fwd" / "state.json").exists()


def test_address_problem() -> None:
    from qvm.definition.host_checks import address_problem

    assert address_problem("127.0.0.1", "tcp") is None
    assert address_problem("0.0.0.0", "udp") is None
    assert "not an address of this host" in (address_problem(FOREIGN_ADDR, "tcp") or "")


def test_ports_say_why_a_bind_fails() -> None:
    from qvm.host.ports import check_address, port_in_use

    with pytest.raises(HostError, match="not an address of this host"):
        port_in_use(FOREIGN_ADDR, 2222, "tcp")
    with pytest.raises(HostError, match=f"forward udp:{FOREIGN_ADDR}:0: .*not an address"):
        check_address(FOREIGN_ADDR, "udp")
    check_address("127.0.0.1", "tcp")


def test_port_add_and_nic_add_refuse_a_foreign_address_before_qemu(tmp_path: Path) -> None:
    """`port add` and `nic add --forward` decide the host side through resolve_forward,
    which checks the address first (port 0 too, which QEMU binds): a foreign address is a
    HostError naming the forward."""
    from qvm.control.forwards import resolve_forward
    from qvm.definition.forwards import parse_forward

    with pytest.raises(HostError) as error:
        resolve_forward(RunDir(tmp_path / "vm1"), parse_forward(f"tcp:{FOREIGN_ADDR}:0:22"), "n")
    assert f"tcp:{FOREIGN_ADDR}" in str(error.value)


# --- device ids across kinds ------------------------------------------------------------


@pytest.mark.parametrize(
    ("action", "dev_id", "owner"),
    [
        ("mem add", "cpu1", "vCPU"),
        ("disk attach", "net0", "NIC"),
        ("nic add", "dimm0", "memory"),
        ("nic add", "vmem3", "memory"),
        ("mem add", "disk2", "disk"),
        ("disk attach", "hp0", "PCIe root port"),
        ("nic add", "cpu0", "vCPU"),
    ],
)
def test_an_id_of_another_kinds_form_is_refused(action: str, dev_id: str, owner: str) -> None:
    from qvm.control.transaction import check_new_id

    with pytest.raises(HotplugError, match=f"has the form of a {owner} id"):
        check_new_id(RunDir(Path("/nonexistent/vm1")), dev_id, set(), action)


def test_own_kind_ids_and_free_names_are_accepted() -> None:
    from qvm.control.transaction import check_new_id

    run = RunDir(Path("/nonexistent/vm1"))
    for action, dev_id in [
        ("mem add", "dimm7"),
        ("mem add", "vmem1"),
        ("disk attach", "disk9"),
        ("nic add", "net5"),
        ("nic add", "uplink"),
        ("mem add", "cpuless"),
    ]:
        check_new_id(run, dev_id, set(), action)
    with pytest.raises(HotplugError, match="already used"):
        check_new_id(run, "data", {"data"}, "disk attach")
    with pytest.raises(HotplugError) as error:
        check_new_id(run, "x" * 10_000, set(), "disk attach")
    assert len(str(error.value)) < 200


def test_the_definition_keeps_ids_unique_across_kinds(tmp_path: Path) -> None:
    from qvm.definition.load import load_machine

    cases = {
        '[[disk]]\nfile = "a.raw"\nid = "cpu1"\n': "disk[0].id: has the form of a vCPU id",
        '[[nic]]\nid = "dimm0"\n': "nic[0].id: has the form of a memory id",
        '[[disk]]\nfile = "a.raw"\nid = "net0"\n[[nic]]\n': (
            'disk[0].id: already used by nic[0] (its default id), got "net0"'
        ),
        '[[nic]]\nid = "disk0"\n[[disk]]\nfile = "a.raw"\n': (
            'nic[0].id: already used by disk[0] (its default id), got "disk0"'
        ),
    }
    for text, message in cases.items():
        path = tmp_path / "vm1.toml"
        path.write_text(text)
        with pytest.raises(DefinitionError) as error:
            load_machine(path)
        assert message in str(error.value), str(error.value)
    path.write_text('[[disk]]\nfile = "a.raw"\nid = "disk5"\n[[nic]]\nid = "net3"\n')
    load_machine(path)


# --- machine files ----------------------------------------------------------------------

MACHINE_FILES = {
    "tilde": ('[[disk]]\nfile = "~nosuchuser/x"\n', "disk[0].file: starts with ~ and a user"),
    "deep": ("x = " + "[" * 3000 + "]" * 3000 + "\n", "nested too deeply"),
    "digits400": ("[cpu]\ncount = " + "9" * 400 + "\n", "cpu.count: must be <= 1024"),
    "digits5000": ("[cpu]\ncount = " + "9" * 5000 + "\n", "a number too long to read"),
    "delay400": ("[supervisor]\nrestart_delay = " + "9" * 400 + "\n", "is too large"),
    "nul": ('[boot]\nkernel = "a\\u0000b"\n', "boot.kernel: must not contain a NUL"),
    "huge": ('[machine]\ntype = "' + "x" * 10_000_000 + '"\n', "(10000000 characters)"),
    "hugekey": ('"' + "k" * 1_000_000 + '" = 1\n', "(1000000 characters)"),
}


@pytest.mark.parametrize("case", sorted(MACHINE_FILES))
def test_a_bad_machine_file_is_one_short_line(cli: Qvm, case: str) -> None:
    text, expected = MACHINE_FILES[case]
    path = cli.machine(case, text)
    for command in ("cmdline", "up"):
        line = _short_line(cli(command, case, check=False))
        assert line.startswith(f"qvm: {path}: "), line[:300]
        assert expected in line, line
    rows = {row["name"]: row for row in cli.json("list")}
    assert rows[case]["state"] == "invalid"
    assert len(rows[case]["error"]) <= MAX_LINE


def test_the_many_problems_of_a_file_are_cut_to_a_screenful(tmp_path: Path) -> None:
    from qvm.definition.load import MAX_PROBLEMS, load_machine

    path = tmp_path / "vm1.toml"
    path.write_text("[qemu]\nextra_args = [" + ", ".join(["1"] * 5000) + "]\n")
    with pytest.raises(DefinitionError) as error:
        load_machine(path)
    lines = str(error.value).splitlines()
    assert len(lines) == MAX_PROBLEMS
    assert lines[-1] == f"{path}: and {5000 - MAX_PROBLEMS + 1} more problems"


def test_shown_values_are_bounded() -> None:
    from qvm.definition.reader import MAX_GOT, shown

    assert shown("q35") == '"q35"'
    assert shown(True) == "true"
    assert shown(math.nan) == "nan"
    for value in ("x" * 10_000_000, 10**400, ["y" * 1000] * 3, {"k": "v" * 500}):
        text = shown(value)
        assert len(text) <= MAX_GOT, text
        assert "characters)" in text
    assert shown("a\0b").isprintable()


def test_a_path_under_an_unknown_users_home_is_a_problem(tmp_path: Path) -> None:
    from qvm.definition.reader import expand_path

    assert expand_path("~nosuchuser-qvm/x", tmp_path) is None
    assert expand_path("x", tmp_path) == tmp_path / "x"
    assert expand_path("~/x", tmp_path) == Path(os.path.expanduser("~/x"))
