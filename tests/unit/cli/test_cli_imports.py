"""Plain command lines run without importing Typer, Click, asyncio or qemu.qmp: those are
most of a command's start-up time (see docs/speed.md). Checked for every command
the CLI declares, by what the interpreter reports it imported, not by timing.

Each command runs for real, against a VM that does not exist in an empty state dir, so it
fails fast without starting anything: what matters here is what it imported on the way.
"""

from __future__ import annotations

import importlib
import os
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from framework.harness import imported_modules

from qvm.cli.parsing.declare import GROUPS, TOP_LEVEL, parameters
from qvm.cli.parsing.fast import plain_call

HEAVY = ("typer", "click", "asyncio", "qemu.qmp")
VM = "no-such-vm"
# a value for each required parameter, by name; a new one fails test_every_command_is_covered
VALUES = {
    "name": VM,
    "names": VM,
    "target": "2",
    "size": "128M",
    "dev_id": "dimm0",
    "spec": "tcp:0:22",
    "source": f"{VM}:/etc/hostname",
    "tag": "booted",
    "host": "/tmp",
    "guest": "/mnt/data",
    "network": "lab",
    "job": "1",
}


def command_words() -> list[tuple[str, ...]]:
    """Every command the CLI declares, as the words that run it: ``("up",)``,
    ``("cpu", "add")``; from the same tables both parsers read."""
    words: list[tuple[str, ...]] = [(word,) for word in TOP_LEVEL]
    for group in GROUPS:
        commands = importlib.import_module(f"qvm.cli.commands.{group}").commands
        words += [(group, word) for word in commands.functions]
    return words


def function_of(words: tuple[str, ...]) -> Callable[..., None]:
    module = TOP_LEVEL.get(words[0], words[0])
    return importlib.import_module(f"qvm.cli.commands.{module}").commands.functions[words[-1]]


def plain_argv(words: tuple[str, ...]) -> list[str]:
    """The shortest plain command line of a command: its words and its required values."""
    argv = list(words)
    for name, _, param in parameters(function_of(words)):
        if not param.required:
            continue
        value = VALUES[name]
        argv += [value] if param.kind == "argument" else [param.decls[0], value]
    return argv


def heavy(modules: set[str]) -> set[str]:
    return {m for m in modules if any(m == h or m.startswith(h + ".") for h in HEAVY)}


def test_every_command_is_covered() -> None:
    words = command_words()
    assert len(words) == len(set(words)) > len(TOP_LEVEL)
    for command in words:
        required = {n for n, _, p in parameters(function_of(command)) if p.required}
        assert required <= VALUES.keys(), f"qvm {' '.join(command)}: add a value to VALUES"


# the shortest line of every command, and a few with options
PLAIN = [plain_argv(words) for words in command_words()] + [
    ["list", "--json"],
    ["up", VM, "--no-wait"],
    ["cpu", "add", VM, "--count", "2"],
    ["mem", "list", VM, "--json"],
]


@pytest.mark.parametrize("argv", PLAIN, ids=" ".join)
def test_plain_commands_import_no_framework(argv: list[str], tmp_path: Path) -> None:
    assert plain_call(argv) is not None, "the fast path declines it: Typer would parse it"
    modules = imported_modules(argv, tmp_path)
    assert "qvm.cli.parsing.fast" in modules
    assert "qvm.cli.parsing.typer_app" not in modules
    assert heavy(modules) == set()


@pytest.mark.parametrize("argv", [["--help"], ["logs"], ["cpu", "add", VM, "-n2"]])
def test_help_and_mistakes_go_through_typer(argv: list[str], tmp_path: Path) -> None:
    assert plain_call(argv) is None
    assert "typer" in imported_modules(argv, tmp_path)


def test_up_without_forwards_imports_no_socket(tmp_path: Path) -> None:
    """socket costs `qvm up` 2-3 ms and a VM without forwards binds nothing: qvm.host.ports
    imports it where a port is bound. The machine's kernel is missing, so `up` stops at
    the host checks, after it has imported its whole path."""
    (tmp_path / "machines").mkdir()
    (tmp_path / "machines" / "vm1.toml").write_text('[boot]\nkernel = "/no/such/kernel"\n')
    modules = imported_modules(["up", "vm1"], tmp_path)
    assert "qvm.ops.up" in modules
    assert "qvm.host.ports" in modules
    assert "socket" not in modules


# typing costs each command ~9 M instructions (~2 ms, docs/speed.md): the modules on these
# commands' way name its things under ``qvm.base.TYPE_CHECKING`` only
@pytest.mark.parametrize(
    "argv",
    [["status", "vm1"], ["status", "vm1", "--json"], ["list"], ["list", "--json"], ["up", "vm1"]],
    ids=" ".join,
)
def test_status_list_and_up_import_no_typing(argv: list[str], tmp_path: Path) -> None:
    """The machine file's parse is cached first (tomllib imports typing; a second read of
    the same text does without it). Its kernel is missing, so `up` stops at the host
    checks, after it has imported its whole path."""
    (tmp_path / "machines").mkdir()
    (tmp_path / "machines" / "vm1.toml").write_text('[boot]\nkernel = "/no/such/kernel"\n')
    cache = {"QVM_CACHE_DIR": str(tmp_path / "cache")}
    imported_modules(["list"], tmp_path, cache)
    modules = imported_modules(argv, tmp_path, cache)
    assert {"qvm.definition.load", "qvm.definition.reader"} <= modules
    assert "qvm.ops.up" in modules or argv[0] != "up"
    assert "typing" not in modules


def test_a_running_vms_status_imports_no_typing() -> None:
    """What `qvm status` imports besides for a running VM: its records (the supervisor's
    view, the forwards), and with --live the supervisor's answer and the agent's facts."""
    code = (
        "import sys, qvm.cli.commands.vm, qvm.ops.status, qvm.supervisor.wire, "
        "qvm.store.forwards, qvm.store.view, qvm.control.guest_agent_facts\n"
        "print('typing' in sys.modules)\n"
    )
    done = subprocess.run(
        [sys.executable, "-c", code], cwd="/", capture_output=True, text=True, timeout=60
    )
    assert done.stdout == "False\n", done.stderr


# What the queries of a running VM leave out (docs/speed.md, "Query path start-up"): each
# of these is milliseconds of `status`, `list` and `cpu list` (pathlib with urllib.parse
# and ipaddress ~3 ms; json, re and enum ~5 ms; typing ~2 ms), and none is needed to read
# a VM's records. `python -m` itself (runpy) imports contextlib and importlib, so those
# are checked by the import of the modules alone, below.
QUERY_FREE = ("pathlib", "urllib", "ipaddress", "json", "re", "enum", "typing", "socket")
QUERIES = [
    ["status", "vm1"],
    ["list"],
    ["cpu", "list", "vm1"],
]


def _left_out(modules: set[str]) -> set[str]:
    return {m for m in modules if m.split(".")[0] in QUERY_FREE}


@pytest.fixture
def running_vm(tmp_path: Path) -> Iterator[Path]:
    """A run dir whose records say VM vm1 runs, kept alive by a process that holds its
    lock as a supervisor does (and stands in for QEMU in /proc): no QEMU is started."""
    from qvm.layout.rundir import RunDir
    from qvm.store.state import StateRecord, write_state
    from qvm.store.view import ViewRecord, write_view

    (tmp_path / "machines").mkdir()
    state_dir = tmp_path / "state"
    state_dir.mkdir(mode=0o700)
    run = RunDir(state_dir / "vm1")
    run.path.mkdir(mode=0o700)
    holder = subprocess.Popen(
        [
            sys.executable,
            "-c",
            "import fcntl, os, sys, time\n"
            "fd = os.open(sys.argv[1], os.O_RDONLY | os.O_DIRECTORY)\n"
            "fcntl.flock(fd, fcntl.LOCK_EX)\nprint('held', flush=True)\ntime.sleep(60)\n",
            str(run.path),
        ],
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert holder.stdout is not None and holder.stdout.readline() == "held\n"
        pid, now = holder.pid, time.time()
        write_state(
            run.state_file,
            StateRecord(
                "vm1",
                "/nowhere/vm1.toml",
                "tcg",
                "test",
                pid,
                None,
                "running",
                0,
                None,
                None,
                pid,
                7,
                now,
            ),
        )
        slot = {"socket-id": 0, "core-id": 0, "thread-id": 0}
        write_view(
            run.view_file,
            ViewRecord(
                "vm1",
                pid,
                7,
                now,
                "running",
                now,
                None,
                128 * 1024**2,
                (
                    {
                        "type": "qemu64-x86_64-cpu",
                        "vcpus-count": 1,
                        "props": slot,
                        "qom-path": "/machine/unattached/device[0]",
                    },
                ),
                (
                    {
                        "cpu-index": 0,
                        "qom-path": "/machine/unattached/device[0]",
                        "thread-id": pid,
                        "props": slot,
                        "target": "x86_64",
                    },
                ),
            ),
        )
        yield tmp_path
    finally:
        holder.kill()
        holder.wait()


@pytest.mark.parametrize("argv", QUERIES, ids=" ".join)
def test_a_running_vms_queries_leave_out_what_they_do_not_need(
    argv: list[str], running_vm: Path
) -> None:
    modules = imported_modules(argv, running_vm)
    assert "qvm.store.view" in modules  # the running VM's record was read
    assert _left_out(modules) == set()


def test_the_query_modules_import_no_contextlib_or_importlib() -> None:
    code = (
        "import sys, qvm.cli.app, qvm.cli.parsing.fast, qvm.cli.commands.vm, qvm.ops.status, "
        "qvm.store.view, qvm.store.forwards, qvm.base.digest, qvm.base.sizes\n"
        "print(sorted(m for m in sys.modules if m.split('.')[0] in "
        "('contextlib', 'importlib', 'pathlib', 'urllib', 'ipaddress', 'json', 're')))\n"
    )
    done = subprocess.run(
        [sys.executable, "-c", code],
        cwd="/",
        capture_output=True,
        text=True,
        timeout=60,
        env={**os.environ, "PYTHONPATH": str(Path(__file__).parents[3])},
    )
    assert done.stdout == "[]\n", done.stderr
