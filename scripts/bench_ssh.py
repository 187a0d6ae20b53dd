"""Boot to SSH on the Debian test image: `qvm up` + `qvm wait --for ssh` against the same
QEMU argv started by hand and polled with `ssh`, in one run (medians, alternating).

Each run starts from a fresh overlay, so cloud-init does its first-boot work both ways
(user, key, host keys). qvm's side: `qvm reset`, then time `qvm up NAME` + `qvm wait NAME
--for ssh`. The raw side: the argv qvm ran (launch.json), the same seed and port, a new
overlay made with `qemu-img create`, then `ssh ... true` every 0.5 s, as qvm polls.
Needs build/test-image (scripts/setup builds it). Runs: $QVM_BENCH_SSH_RUNS (default 3).
"""

from __future__ import annotations

import json
import os
import shlex
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
QVM = str(Path(sys.executable).parent / "qvm")
IMAGE = REPO / "build" / "test-image"
RUNS = int(os.environ.get("QVM_BENCH_SSH_RUNS", "3"))
NAME = "benchssh"
TIMEOUT = 600.0


def qvm(env: dict[str, str], *args: str) -> str:
    done = subprocess.run(
        [QVM, *args], env=env, capture_output=True, text=True, timeout=TIMEOUT, check=False
    )
    if done.returncode != 0:
        raise SystemExit(f"qvm {' '.join(args)} failed ({done.returncode}): {done.stderr}")
    return done.stdout


def time_qvm(env: dict[str, str]) -> tuple[float, list[str]]:
    """Seconds from `qvm up` to `qvm wait --for ssh` returning, and qvm's ssh argv."""
    qvm(env, "reset", NAME)
    started = time.monotonic()
    qvm(env, "up", NAME)
    qvm(env, "wait", NAME, "--for", "ssh", "--timeout", str(TIMEOUT))
    took = time.monotonic() - started
    ssh = shlex.split(qvm(env, "ssh", NAME, "--print", "--", "true"))
    qvm(env, "kill", NAME)
    return took, ssh


def time_raw(run: Path, argv: list[str], ssh: list[str], base: Path, size: str) -> float:
    overlay = run / "disk0.qcow2"
    overlay.unlink(missing_ok=True)
    (run / "known_hosts").unlink(missing_ok=True)
    for sock in run.glob("*.sock"):
        sock.unlink()
    started = time.monotonic()
    subprocess.run(
        ["qemu-img", "create", "-q", "-f", "qcow2", "-F", "qcow2", "-b", str(base), str(overlay)]
        + [size],
        check=True,
    )
    qemu = subprocess.Popen(
        argv, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
    )
    try:
        while time.monotonic() - started < TIMEOUT:
            done = subprocess.run(ssh, stdin=subprocess.DEVNULL, capture_output=True, check=False)
            if done.returncode == 0:
                return time.monotonic() - started
            if qemu.poll() is not None:
                raise SystemExit(f"raw QEMU exited with {qemu.returncode}")
            time.sleep(0.5)
        raise SystemExit("raw QEMU: no ssh login in time")
    finally:
        qemu.send_signal(signal.SIGKILL)
        qemu.wait()


def main() -> None:
    if not (IMAGE / "image.json").exists():
        raise SystemExit("no build/test-image (run scripts/setup or scripts/build-test-image)")
    root = Path(tempfile.mkdtemp(prefix="qvm-bs", dir="/tmp"))
    env = dict(
        os.environ,
        QVM_STATE_DIR=str(root / "state"),
        QVM_MACHINES=str(root / "machines"),
        HOME=str(root / "home"),  # no ~/.ssh keys: qvm makes the VM's key pair
    )
    try:
        qvm(
            env,
            "--machines",
            str(root / "machines"),
            "new",
            NAME,
            "--image",
            str(IMAGE / "disk.qcow2"),
            "--kernel",
            str(IMAGE / "vmlinuz"),
            "--initrd",
            str(IMAGE / "initrd.img"),
            "--append",
            "root=/dev/vda rw console=ttyS0",
            "--disk-size",
            "3G",
        )
        qvm_runs: list[float] = []
        raw_runs: list[float] = []
        run = root / "state" / NAME
        for _ in range(RUNS):
            took, ssh = time_qvm(env)
            qvm_runs.append(took)
            # the argv, seed, key and port of qvm's run, replayed by hand
            launch = json.loads((run / "launch.json").read_text())
            ssh[1:1] = ["-o", "BatchMode=yes", "-o", "ConnectTimeout=5"]
            raw_runs.append(
                time_raw(run, launch["argv"], ssh, IMAGE / "disk.qcow2", str(3 * 1024**3))
            )
            print(f"  run: qvm {qvm_runs[-1]:.1f} s, raw {raw_runs[-1]:.1f} s", flush=True)
        q, r = statistics.median(qvm_runs), statistics.median(raw_runs)
        print(f"boot to ssh login, Debian 12 + cloud-init under TCG, medians of {RUNS}:")
        print(f"  qvm up + qvm wait --for ssh   {q:6.1f} s")
        print(f"  raw QEMU + ssh polling        {r:6.1f} s")
        print(f"  ratio qvm/raw                 {q / r:6.2f}  (difference {q - r:+.1f} s)")
    finally:
        subprocess.run([QVM, "kill", NAME], env=env, capture_output=True, check=False)
        shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
