"""The harness of the integration tests: the real `qvm` CLI, run in subprocesses with a
private state dir and machines dir, and the test guest's machine files.

A test gets one ``Qvm`` from the ``qvm`` fixture (tests/conftest.py), which kills every
VM the test started and checks that no QEMU or supervisor survived.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from framework.guest import Serial
from framework.wait import wait_until

REPO = Path(__file__).resolve().parents[2]
GUEST_DIR = Path(os.environ.get("QVM_TEST_GUEST", REPO / "build" / "test-guest"))
QVM_BIN = Path(sys.executable).parent / "qvm"


def processes_with(marker: str) -> list[tuple[int, str]]:
    """(pid, command line) of every live process whose command line holds ``marker``."""
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            cmd = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode()
            stat = (entry / "stat").read_text()
        except OSError:
            continue
        if marker in cmd and stat.rsplit(")", 1)[1].split()[0] != "Z":
            found.append((int(entry.name), cmd))
    return found


def short_tmpdir() -> Path:
    # unix socket paths are limited to 107 bytes: pytest's tmp_path is often too long
    return Path(tempfile.mkdtemp(prefix="qvm-t", dir="/tmp"))


def need_test_guest() -> None:
    """Fail, saying how to build it, when the test guest is missing."""
    if not (GUEST_DIR / "vmlinuz").exists():
        pytest.fail(f"no test guest in {GUEST_DIR} (run scripts/build-test-guest)")


@contextlib.contextmanager
def owned_qvm() -> Iterator[Qvm]:
    """A ``Qvm`` in a fresh short folder whose VMs live as long as the block (a module's
    fixture): then each is killed, the folder removed, and no process of it may survive."""
    harness = Qvm(short_tmpdir())
    try:
        yield harness
    finally:
        survivors = harness.cleanup()
        shutil.rmtree(harness.root, ignore_errors=True)
    assert not survivors, f"processes survived the cleanup: {survivors}"


@contextlib.contextmanager
def scratch_qvm(machine: str) -> Iterator[Qvm]:
    """A ``Qvm`` in a fresh short folder that holds one machine file, ``machine`` (one
    vCPU), for tests of the CLI that start no VM; the folder is removed afterwards."""
    root = short_tmpdir()
    qvm = Qvm(root)
    qvm.machine(machine, "[cpu]\ncount = 1\n")
    yield qvm
    shutil.rmtree(root, ignore_errors=True)


def build_test_image() -> Path:
    """The Debian test image's folder: scripts/build-test-image builds it, or takes it
    from its cache."""
    return _built("build-test-image", timeout=1200)


def build_test_guest(*options: str) -> Path:
    """A flavour of the test guest (``--9p``: Debian's generic kernel with 9p), built by
    scripts/build-test-guest or taken from its cache."""
    return _built("build-test-guest", *options, timeout=900)


def _built(script: str, *options: str, timeout: float) -> Path:
    """The folder a build script of scripts/ prints once it has built (or found) it."""
    built = subprocess.run(
        [str(REPO / "scripts" / script), *options],
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )
    if built.returncode != 0:
        pytest.fail(f"scripts/{script} {' '.join(options)} failed:\n{built.stderr[-3000:]}")
    return Path(built.stdout.strip())


def imported_modules(
    argv: list[str], tmp_path: Path, env: dict[str, str] | None = None
) -> set[str]:
    """The modules `qvm ARGV` imports, as the interpreter reports them (``-X importtime``),
    run in ``tmp_path`` with its ``machines`` and ``state`` folders."""
    done = subprocess.run(
        [sys.executable, "-X", "importtime", "-m", "qvm.cli", *argv],
        env={
            **os.environ,
            "QVM_MACHINES": str(tmp_path / "machines"),
            "QVM_STATE_DIR": str(tmp_path / "state"),
            "XDG_CONFIG_HOME": str(tmp_path / "config"),
            **(env or {}),
        },
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=60,
    )
    lines = [line for line in done.stderr.splitlines() if line.startswith("import time:")]
    return {line.rsplit("|", 1)[1].strip() for line in lines}


def one_line_error(done: subprocess.CompletedProcess[str], expected: str | None = None) -> str:
    """A failed command printed exactly one line on stderr, and no traceback."""
    assert done.returncode != 0, done.stdout
    assert "Traceback" not in done.stderr
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1, done.stderr
    if expected is not None:
        assert lines[0] == expected
    return lines[0]


@dataclass
class Qvm:
    """Runs the real `qvm` CLI with a private state dir and machines dir."""

    root: Path
    started: set[str] = field(default_factory=set)
    user: int | None = None  # as root: run qvm as this uid and gid (setpriv), HOME in root

    @property
    def state_dir(self) -> Path:
        return self.root / "state"

    @property
    def machines_dir(self) -> Path:
        return self.root / "machines"

    def env(self) -> dict[str, str]:
        env = dict(os.environ)
        env["QVM_STATE_DIR"] = str(self.state_dir)
        env["QVM_MACHINES"] = str(self.machines_dir)
        env["XDG_CONFIG_HOME"] = str(self.root / "config")
        if self.user is not None:
            env["HOME"] = str(self.root / "home")
            env["XDG_CACHE_HOME"] = str(self.root / "cache")
        return env

    def as_user(self) -> list[str]:
        """The command prefix that runs a command as ``user`` (nothing without one)."""
        if self.user is None:
            return []
        ids = [f"--reuid={self.user}", f"--regid={self.user}", "--clear-groups"]
        return ["setpriv", *ids]

    def __call__(
        self, *args: str, check: bool = True, timeout: float = 120, input: str | None = None
    ) -> subprocess.CompletedProcess[str]:
        done = self.run_bytes(
            *args, input=None if input is None else input.encode(), timeout=timeout
        )
        text = subprocess.CompletedProcess(
            done.args, done.returncode, done.stdout.decode(), done.stderr.decode()
        )
        if check and text.returncode != 0:
            raise AssertionError(
                f"qvm {' '.join(args)} exited {text.returncode}\n"
                f"stdout:\n{text.stdout}\nstderr:\n{text.stderr}"
            )
        return text

    def run_bytes(
        self, *args: str, input: bytes | None = None, timeout: float = 120
    ) -> subprocess.CompletedProcess[bytes]:
        """The real CLI in this state dir, with stdin, stdout and stderr as bytes."""
        if args and args[0] in ("up", "restart"):
            self.started.update(a for a in args[1:] if not a.startswith("-"))
        return subprocess.run(
            [*self.as_user(), str(QVM_BIN), *args],
            capture_output=True,
            timeout=timeout,
            env=self.env(),
            cwd=self.root,
            input=input,
            check=False,
        )

    def json(self, *args: str) -> Any:
        return json.loads(self(*args, "--json").stdout)

    def status(self, name: str) -> dict[str, Any]:
        return self.json("status", name)

    def wait_state(self, name: str, state: str, timeout: float) -> dict[str, Any]:
        """``qvm status NAME --json`` once its state is ``state``."""
        return wait_until(
            lambda: (s := self.status(name))["state"] == state and s, timeout, f"{name} {state}"
        )

    def run_dir(self, name: str) -> Path:
        return self.state_dir / name

    def serial(self, name: str) -> Serial:
        return Serial(self.run_dir(name) / "serial.log")

    def machine(self, name: str, body: str) -> Path:
        """Write machines/NAME.toml; ``{guest}`` in the body is the test guest folder."""
        self.machines_dir.mkdir(parents=True, exist_ok=True)
        path = self.machines_dir / f"{name}.toml"
        path.write_text(body.replace("{guest}", str(GUEST_DIR)))
        return path

    def guest_machine(
        self,
        name: str,
        count: int = 1,
        max: int = 4,
        memory: str = "256M",
        machine_type: str = "q35",
        extra: str = "",
        guest_dir: Path = GUEST_DIR,
    ) -> Path:
        return self.machine(
            name,
            f"""
[machine]
type = "{machine_type}"
accel = "auto"

[cpu]
count = {count}
max = {max}

[memory]
size = "{memory}"

[boot]
kernel = "{guest_dir}/vmlinuz"
initrd = "{guest_dir}/initrd.img"
append = "console=ttyS0 quiet irqaffinity=0 no_timer_check"
{extra}
""",
        )

    def processes(self) -> list[tuple[int, str]]:
        """Every live process (QEMU, supervisor) that belongs to this state dir."""
        return processes_with(str(self.state_dir))

    def kill_all(self) -> None:
        """``qvm kill`` every VM of the state dir, then SIGKILL any process of it left."""
        if self.state_dir.exists():
            for run in self.state_dir.iterdir():
                if run.is_dir():
                    self("kill", run.name, check=False, timeout=60)
        for pid, _ in self.processes():
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)

    @contextlib.contextmanager
    def background(self, *args: str) -> Iterator[subprocess.Popen[str]]:
        """`qvm ARGS` started and left running (stdout and stderr piped, as text), for a
        test that acts while it runs; killed at the end if the test left it running."""
        process = subprocess.Popen(
            [str(QVM_BIN), *args],
            env=self.env(),
            cwd=self.root,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        try:
            yield process
        finally:
            if process.poll() is None:
                process.kill()
                process.wait()

    @contextlib.contextmanager
    def state_on_tmpfs(self, size: str, label: str) -> Iterator[Path]:
        """The state dir on a tmpfs of ``size`` ("2m"; the test is skipped unless it runs
        as root, who can mount one); at the end every VM is killed, then it is unmounted."""
        if os.geteuid() != 0:
            pytest.skip("mounting a tmpfs needs root")
        self.state_dir.mkdir(mode=0o700)
        subprocess.run(
            ["mount", "-t", "tmpfs", "-o", f"size={size},mode=0700", label, str(self.state_dir)],
            check=True,
        )
        try:
            yield self.state_dir
        finally:
            self.kill_all()
            with contextlib.suppress(AssertionError):
                wait_until(lambda: not self.processes(), 10, "the test's processes to end")
            subprocess.run(["umount", "-l", str(self.state_dir)], check=False)

    def cleanup(self) -> list[tuple[int, str]]:
        """Kill everything this test started; return what was still alive afterwards."""
        self.kill_all()
        try:
            wait_until(lambda: not self.processes(), 10, "the test's processes to end")
        except AssertionError:
            return self.processes()
        return []
