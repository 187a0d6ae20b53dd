"""8 one-shot runs from one snapshot: serial on the host against a Slurm job array on
the one-node cluster of scripts/slurm-cluster (brought up if it is not, and taken down
again then).

Serial: `qvm run g1 --from g1@ready -- CMD`, eight times one after the other. Array:
`qvm slurm submit g1 --from g1@ready --array 8 -- CMD`, timed from the submission to
the moment `qvm slurm status` shows every task ended (polled every 0.2 s); Slurm runs as
many tasks at once as the node has CPUs for (one each). CMD is `true`, then `sleep 2`.
Prints a Markdown table for docs/speed.md, and one run's peak RSS. Run it with
scripts/bench (QVM_BENCH_SLURM=0 leaves it out).
"""

from __future__ import annotations

import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from bench_cpu import machine_toml  # the test guest's machine file, as the vCPU bench has it

REPO = Path(__file__).resolve().parent.parent
QVM = str(Path(sys.executable).parent / "qvm")
CLUSTER = str(REPO / "scripts" / "slurm-cluster")
RUNS = 8
# a command that returns at once, and one that takes two seconds in the guest
COMMANDS = (["true"], ["sleep", "2"])


def main() -> None:
    root = Path(tempfile.mkdtemp(prefix="qvm-b", dir="/tmp"))
    root.chmod(0o755)
    (root / "machines").mkdir()
    (root / "machines" / "g1.toml").write_text(machine_toml(max_cpus=1, agent=True))
    env = {k: v for k, v in os.environ.items() if k != "QVM_STATE_DIR"}
    env.update(QVM_MACHINES=str(root / "machines"), XDG_STATE_HOME=str(root / "xdg"))
    was_up = subprocess.run([CLUSTER, "status"], check=False).returncode == 0
    try:
        subprocess.run([CLUSTER, "up"], check=True)
        qvm(env, root, "up", "g1")
        qvm(env, root, "wait", "g1", "--for", "agent", "--timeout", "120")
        qvm(env, root, "snapshot", "save", "g1", "ready")
        qvm(env, root, "down", "g1")
        qvm(env, root, "run", "g1", "--from", "g1@ready", "--", "true")  # freezes the snapshot
        rows = []
        for command in COMMANDS:
            rows.append((command, serial_runs(env, root, command), slurm_array(env, root, command)))
        qemu_mib, task_mib = peak_rss(env, root)
    finally:
        subprocess.run([QVM, "kill", "g1"], env=env, cwd=root, capture_output=True, check=False)
        if not was_up:
            subprocess.run([CLUSTER, "down"], check=False)
        shutil.rmtree(root, ignore_errors=True)
    print(f"| {RUNS} one-shot `qvm run --from` | serial on the host | Slurm array on this node |")
    print("|---|---|---|")
    for command, (serial, each), (array, tasks) in rows:
        print(
            f"| `{' '.join(command)}` | {serial:.1f} s ({each:.2f} s a run) "
            f"| {array:.1f} s ({tasks:.2f} s a task) |"
        )
    print(
        f"\nPeak RSS of one `qvm run --from` (256 MiB guest, `sleep 3`): QEMU {qemu_mib:.0f} MiB;"
        f" QEMU, supervisor and `qvm run` together {task_mib:.0f} MiB"
    )


def qvm(env: dict[str, str], root: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [QVM, *args], env=env, cwd=root, check=True, capture_output=True, text=True
    )


def serial_runs(env: dict[str, str], root: Path, command: list[str]) -> tuple[float, float]:
    """The wall time of all, and the median of each run's own seconds (its record's
    start to end, as a task's are counted)."""
    started = time.monotonic()
    each = []
    for _ in range(RUNS):
        done = qvm(env, root, "run", "g1", "--from", "g1@ready", "--json", "--", *command)
        record = json.loads(done.stdout)
        each.append(record["ended_at"] - record["started_at"])
    return time.monotonic() - started, statistics.median(each)


def peak_rss(env: dict[str, str], root: Path) -> tuple[float, float]:
    """The highest RSS of QEMU alone, and of QEMU, the supervisor and `qvm run` together,
    sampled every 20 ms through one run (what a task's --mem must hold)."""
    run = subprocess.Popen(
        [QVM, "run", "g1", "--from", "g1@ready", "--", "sleep", "3"],
        env=env,
        cwd=root,
        stdout=subprocess.DEVNULL,
    )
    qemu_peak = total_peak = 0
    while run.poll() is None:
        qemu = total = 0
        for entry in Path("/proc").iterdir():
            try:
                cmd = (entry / "cmdline").read_bytes()
                if entry.name != str(run.pid) and str(root).encode() not in cmd:
                    continue
                status = (entry / "status").read_text()
            except OSError:
                continue
            rss = next(
                (int(line.split()[1]) for line in status.splitlines() if line.startswith("VmRSS:")),
                0,
            )
            total += rss
            if cmd.startswith(b"qemu-system"):
                qemu += rss
        qemu_peak, total_peak = max(qemu_peak, qemu), max(total_peak, total)
        time.sleep(0.02)
    return qemu_peak / 1024, total_peak / 1024


def slurm_array(env: dict[str, str], root: Path, command: list[str]) -> tuple[float, float]:
    """The wall time from the submission to every task ended, and the median of the
    tasks' own seconds."""
    started = time.monotonic()
    array = ("--array", str(RUNS))
    done = qvm(env, root, "slurm", "submit", "g1", "--from", "g1@ready", *array, "--", *command)
    job = done.stdout.split()[-1]
    while True:
        report = json.loads(qvm(env, root, "slurm", "status", job, "--json").stdout)
        if all(t["state"] in ("exited", "failed", "timeout", "cancelled") for t in report["tasks"]):
            break
        if time.monotonic() - started > 600:
            raise SystemExit(f"bench_slurm: job {job} not done after 600 s")
        time.sleep(0.2)
    wall = time.monotonic() - started
    bad = [t for t in report["tasks"] if t["state"] != "exited" or t["exit_code"] != 0]
    if bad:
        raise SystemExit(f"bench_slurm: tasks failed: {bad}")
    return wall, statistics.median(t["seconds"] for t in report["tasks"])


if __name__ == "__main__":
    main()
