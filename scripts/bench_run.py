"""`qvm run` against a raw QEMU boot, measured in turn in each round (medians).

(a) raw QEMU: the test guest's own argv, spawned by hand, until its guest agent answers
    `guest-ping` on the agent's socket (the baseline: a VM ready to run a command);
(b) `qvm run VM -- true`: a throwaway VM booted cold, the command, the teardown;
(c) `qvm run VM --from VM@ready -- true`: the same resumed from a snapshot's clone.
The phases of (b) and (c) come from their --json records. Run it with scripts/bench, or
alone: `.venv/bin/python scripts/bench_run.py`.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from bench import raw_argv, raw_start  # scripts/bench.py, beside this file

REPO = Path(__file__).resolve().parent.parent
QVM = str(Path(sys.executable).parent / "qvm")
RUNS = int(os.environ.get("QVM_BENCH_RUN_ROUNDS", "5"))
GUEST = REPO / "build" / "test-guest"
MACHINE = f"""
[cpu]
count = 1
max = 1
[memory]
size = "256M"
[boot]
kernel = "{GUEST}/vmlinuz"
initrd = "{GUEST}/initrd.img"
append = "console=ttyS0 quiet irqaffinity=0"
"""
PHASES = ("boot", "restore", "agent_ready", "command", "teardown")


def wait_agent(run_dir: Path, deadline: float) -> None:
    """Until the guest agent answers `guest-ping` on QEMU's end of its channel."""
    while time.monotonic() < deadline:
        try:
            with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
                sock.settimeout(0.5)
                sock.connect(str(run_dir / "qga.sock"))
                sock.sendall(b'{"execute": "guest-ping"}\n')
                if b'"return"' in sock.recv(4096):
                    return
        except OSError:
            pass
        time.sleep(0.02)
    raise TimeoutError("the raw guest's agent never answered")


def timed_run(env: dict[str, str], *args: str) -> tuple[float, dict[str, Any]]:
    started = time.monotonic()
    done = subprocess.run(
        [QVM, "run", "bench", *args, "--json", "--", "true"],
        env=env,
        capture_output=True,
        text=True,
        check=False,
    )
    took = time.monotonic() - started
    record = json.loads(done.stdout)
    if done.returncode != 0:
        raise RuntimeError(f"qvm run failed: {record.get('error')}")
    return took, record


def median(samples: list[float]) -> float:
    return statistics.median(samples)


def main() -> int:
    root = Path(tempfile.mkdtemp(prefix="qvm-bench-run-", dir="/tmp"))
    env = dict(os.environ, QVM_STATE_DIR=str(root / "state"), QVM_MACHINES=str(root / "m"))
    (root / "m").mkdir()
    (root / "m" / "bench.toml").write_text(MACHINE)
    raw_dir = root / "raw"
    raw_dir.mkdir(mode=0o700)
    argv = raw_argv(raw_dir, root / "m" / "bench.toml")
    raw: list[float] = []
    cold: list[float] = []
    restored: list[float] = []
    phases: dict[str, dict[str, list[float]]] = {"cold": {}, "from": {}}
    try:
        subprocess.run([QVM, "up", "bench"], env=env, check=True, capture_output=True)
        subprocess.run([QVM, "wait", "bench", "--for", "agent", "--timeout", "120"],
                       env=env, check=True, capture_output=True)  # fmt: skip
        subprocess.run([QVM, "snapshot", "save", "bench", "ready"], env=env, check=True,
                       capture_output=True)  # fmt: skip
        subprocess.run([QVM, "kill", "bench"], env=env, check=True, capture_output=True)
        timed_run(env, "--from", "bench@ready")  # freezes the snapshot for clones, once
        for _ in range(RUNS):
            raw.append(raw_start(argv, raw_dir, wait_agent))
            for kind, samples, args in (("cold", cold, ()), ("from", restored,
                                        ("--from", "bench@ready"))):  # fmt: skip
                took, record = timed_run(env, *args)
                samples.append(took)
                for phase, seconds in record["phases"].items():
                    phases[kind].setdefault(phase, []).append(seconds)
    finally:
        subprocess.run([QVM, "kill", "bench"], env=env, capture_output=True, check=False)
        shutil.rmtree(root, ignore_errors=True)

    base = median(raw)
    print(f"qvm run benchmark (medians of {RUNS} rounds, in turn; the busybox test guest)")
    print(f"{'what':<48} {'s':>7}  vs raw boot")
    print(f"{'raw QEMU: spawn to guest agent answering':<48} {base:7.2f}")
    for label, samples, kind in (
        ("qvm run VM -- true (cold boot)", cold, "cold"),
        ("qvm run VM --from VM@ready -- true", restored, "from"),
    ):
        print(f"{label:<48} {median(samples):7.2f}  x{median(samples) / base:.2f}")
        shown = ", ".join(
            f"{phase} {median(phases[kind][phase]):.2f}"
            for phase in PHASES
            if phases[kind].get(phase)
        )
        print(f"{'  phases':<48} {shown}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
