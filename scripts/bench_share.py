"""A 100 MiB file into the guest: read through a virtiofs share against `qvm cp`, in one run.

One test-guest VM (512 MiB, so that the copy fits the guest's tmpfs) boots with a
[[share]] of a host folder that holds a 100 MiB file of random bytes. Each round, in turn:

- share: `qvm exec` of `cat FILE > /dev/null` on the share, the guest's page cache dropped
  first (so the bytes cross virtiofs each time); the guest's own clock
  (``/proc/uptime``, 10 ms) around the cat, and the whole command's wall time;
- cp: `qvm cp FILE VM:/tmp/big` (through the guest agent, in chunks), wall time, the copy
  removed after.

The data path of a share is QEMU's and virtiofsd's, which qvm only starts: raw QEMU with
the same argv and daemon reads at the guest-side speed measured here. Run with
.venv/bin/python (scripts/bench calls it).
"""

from __future__ import annotations

import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
QVM = str(Path(sys.executable).parent / "qvm")
RUNS = int(os.environ.get("QVM_BENCH_RUNS", "3"))
GUEST = Path(os.environ.get("QVM_TEST_GUEST", REPO / "build" / "test-guest"))
NAME = "benchshare"
SIZE = 100 * 1024**2
READ = (
    "sync; echo 3 > /proc/sys/vm/drop_caches; read a _ </proc/uptime; "
    "cat /mnt/data/big >/dev/null; read b _ </proc/uptime; echo $a $b"
)


def machine_toml(folder: Path) -> str:
    return f"""
[memory]
size = "512M"

[boot]
kernel = "{GUEST}/vmlinuz"
initrd = "{GUEST}/initrd.img"
append = "console=ttyS0 quiet"

[[share]]
host = "{folder}"
guest = "/mnt/data"
"""


def qvm(env: dict[str, str], *args: str) -> str:
    done = subprocess.run([QVM, *args], env=env, capture_output=True, text=True, check=False)
    if done.returncode != 0:
        raise SystemExit(f"qvm {' '.join(args)}: {done.stderr.strip()}")
    return done.stdout


def timed(env: dict[str, str], *args: str) -> tuple[float, str]:
    started = time.monotonic()
    out = qvm(env, *args)
    return time.monotonic() - started, out


def main() -> None:
    root = Path(tempfile.mkdtemp(prefix="qvm-bench-", dir="/tmp"))
    env = dict(os.environ, QVM_STATE_DIR=str(root / "state"), QVM_MACHINES=str(root / "m"))
    (root / "m").mkdir()
    (root / "data").mkdir()
    big = root / "data" / "big"
    big.write_bytes(os.urandom(SIZE))
    (root / "m" / f"{NAME}.toml").write_text(machine_toml(root / "data"))
    guest_read, share_wall, cp_wall = [], [], []
    try:
        qvm(env, "up", NAME)
        qvm(env, "wait", NAME, "--for", "agent", "--timeout", "300")
        deadline = time.monotonic() + 60
        while '"mounted"' not in qvm(env, "share", "list", NAME, "--json"):
            if time.monotonic() > deadline:
                raise SystemExit("the guest did not mount the share")
            time.sleep(0.2)
        for _ in range(RUNS):
            wall, out = timed(env, "exec", NAME, "--", "sh", "-c", READ)
            start, end = (float(x) for x in out.split())
            guest_read.append(end - start)
            share_wall.append(wall)
            wall, _ = timed(env, "cp", str(big), f"{NAME}:/tmp/big")
            cp_wall.append(wall)
            qvm(env, "exec", NAME, "--", "rm", "/tmp/big")
    finally:
        subprocess.run([QVM, "kill", NAME], env=env, capture_output=True, check=False)
        shutil.rmtree(root, ignore_errors=True)
    share = statistics.median(share_wall)
    cp = statistics.median(cp_wall)
    print(f"100 MiB into the guest, medians of {RUNS} (TCG):")
    print(f"  read through the share, guest clock      {statistics.median(guest_read):7.2f} s")
    print(f"  read through the share, qvm exec wall    {share:7.2f} s")
    print(f"  qvm cp host -> guest                      {cp:7.2f} s  (share x{share / cp:.2f})")


if __name__ == "__main__":
    main()
