"""Fixtures shared by the test suite.

Integration tests drive the real `qvm` CLI in subprocesses, against real QEMU and the
real test guest, each with a private state dir and machines dir. The ``qvm`` fixture
owns every VM a test starts: at the end it kills them all, checks that no QEMU or
supervisor from that state dir survived, and keeps the logs of a failed test.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

REPO = Path(__file__).resolve().parent.parent
GUEST_DIR = Path(os.environ.get("QVM_TEST_GUEST", REPO / "build" / "test-guest"))
QVM_BIN = Path(sys.executable).parent / "qvm"


def wait_until(
    condition: Callable[[], Any], timeout: float, what: str, interval: float = 0.05
) -> Any:
    """Poll ``condition`` until it returns something truthy; fail naming ``what``."""
    deadline = time.monotonic() + timeout
    while True:
        result = condition()
        if result:
            return result
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout:g} s waiting for {what}")
        time.sleep(interval)


def one_line_error(done: subprocess.CompletedProcess[str], expected: str | None = None) -> str:
    """A failed command printed exactly one line on stderr, and no traceback."""
    assert done.returncode != 0, done.stdout
    assert "Traceback" not in done.stderr
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1, done.stderr
    if expected is not None:
        assert lines[0] == expected
    return lines[0]


STATE_LINE = re.compile(
    r"^QVM-STATE cpus=(?P<cpus>\S+) ncpus=(?P<ncpus>\d+) mem_kb=(?P<mem_kb>\d+) "
    r"blk=(?P<blk>\S+) net=(?P<net>\S+)",
    re.M,
)


@dataclass
class Serial:
    """The guest's own view, read from its serial console log."""

    path: Path

    def text(self) -> str:
        try:
            return self.path.read_text(errors="replace")
        except FileNotFoundError:
            return ""

    def wait_for(self, pattern: str, timeout: float = 60) -> re.Match[str]:
        regex = re.compile(pattern, re.M)
        return wait_until(lambda: regex.search(self.text()), timeout, f"/{pattern}/ in {self.path}")

    def states(self) -> list[dict[str, str]]:
        return [m.groupdict() for m in STATE_LINE.finditer(self.text())]

    def latest_state(self) -> dict[str, str] | None:
        states = self.states()
        return states[-1] if states else None

    def wait_state(self, timeout: float = 60, **expected: str | int) -> dict[str, str]:
        def matches() -> dict[str, str] | None:
            state = self.latest_state()
            if state and all(str(state[k]) == str(v) for k, v in expected.items()):
                return state
            return None

        try:
            return wait_until(matches, timeout, f"guest state {expected}")
        except AssertionError as error:
            raise AssertionError(f"{error}; latest: {self.latest_state()}") from None

    def wait_ready(self, timeout: float = 90) -> dict[str, str]:
        self.wait_for(r"^QVM-GUEST-READY", timeout)
        return wait_until(self.latest_state, 10, "the first QVM-STATE line")


@dataclass
class Qvm:
    """Runs the real `qvm` CLI with a private state dir and machines dir."""

    root: Path
    started: set[str] = field(default_factory=set)

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
        return env

    def __call__(
        self, *args: str, check: bool = True, timeout: float = 120, input: str | None = None
    ) -> subprocess.CompletedProcess[str]:
        if args and args[0] in ("up", "restart"):
            self.started.update(a for a in args[1:] if not a.startswith("-"))
        done = subprocess.run(
            [str(QVM_BIN), *args],
            capture_output=True,
            text=True,
            timeout=timeout,
            env=self.env(),
            cwd=self.root,
            input=input,
        )
        if check and done.returncode != 0:
            raise AssertionError(
                f"qvm {' '.join(args)} exited {done.returncode}\n"
                f"stdout:\n{done.stdout}\nstderr:\n{done.stderr}"
            )
        return done

    def json(self, *args: str) -> Any:
        return json.loads(self(*args, "--json").stdout)

    def status(self, name: str) -> dict[str, Any]:
        return self.json("status", name)

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
kernel = "{{guest}}/vmlinuz"
initrd = "{{guest}}/initrd.img"
append = "console=ttyS0 quiet irqaffinity=0"
{extra}
""",
        )

    def processes(self) -> list[tuple[int, str]]:
        """Every live process (QEMU, supervisor) that belongs to this state dir."""
        marker = str(self.state_dir)
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

    def cleanup(self) -> list[tuple[int, str]]:
        """Kill everything this test started; return what was still alive afterwards."""
        if self.state_dir.exists():
            for run in self.state_dir.iterdir():
                if run.is_dir():
                    self("kill", run.name, check=False, timeout=60)
        for pid, _ in self.processes():
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        try:
            wait_until(lambda: not self.processes(), 10, "the test's processes to end")
        except AssertionError:
            return self.processes()
        return []


def _short_tmpdir() -> Path:
    # unix socket paths are limited to 107 bytes: pytest's tmp_path is often too long
    return Path(tempfile.mkdtemp(prefix="qvm-t", dir="/tmp"))


@pytest.fixture
def qvm(request: pytest.FixtureRequest) -> Iterator[Qvm]:
    if not (GUEST_DIR / "vmlinuz").exists():
        pytest.fail(f"no test guest in {GUEST_DIR} (run scripts/build-test-guest)")
    root = _short_tmpdir()
    harness = Qvm(root)
    yield harness
    survivors = harness.cleanup()
    failed = getattr(request.node, "rep_call", None) is not None and request.node.rep_call.failed
    if failed:
        keep = REPO / "build" / "test-logs" / request.node.name
        shutil.rmtree(keep, ignore_errors=True)
        shutil.copytree(root, keep, ignore=shutil.ignore_patterns("*.sock", "*.qcow2"))
    shutil.rmtree(root, ignore_errors=True)
    assert not survivors, f"processes survived the test's cleanup: {survivors}"


@pytest.hookimpl(tryfirst=True, hookwrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo[None]) -> Iterator[None]:
    outcome = yield
    report = outcome.get_result()
    setattr(item, f"rep_{report.when}", report)
