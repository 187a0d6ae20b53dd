"""The harness of the integration tests: the real `qvm` CLI, run in subprocesses with a
private state dir and machines dir, and the test guest's machine files.

A test gets one ``Qvm`` from the ``qvm`` fixture (tests/conftest.py), which kills every
VM the test started and checks that no QEMU or supervisor survived.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from framework.guest import Serial
from framework.wait import wait_until

REPO = Path(__file__).resolve().parents[2]
GUEST_DIR = Path(os.environ.get("QVM_TEST_GUEST", REPO / "build" / "test-guest"))
QVM_BIN = Path(sys.executable).parent / "qvm"


def short_tmpdir() -> Path:
    # unix socket paths are limited to 107 bytes: pytest's tmp_path is often too long
    return Path(tempfile.mkdtemp(prefix="qvm-t", dir="/tmp"))


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
