"""How qvm grows with the number of VMs: 1, 4, 16 and 32 test guests of 128 MiB (TCG).

For each count, in one state dir: start all (`qvm up --no-wait`, one after the other),
all ready (every VM's QEMU answering QMP, then every guest's `QVM-GUEST-READY` line on its
serial console), `list`, `status` and `cpu list` of one VM (medians; as read from the
supervisors' records, and with `--live` as the round trips they replace), stop all
(`qvm down`, one after the other) and memory per VM: the supervisors' PSS (from
/proc/PID/smaps_rollup, which shares the pages of the interpreter and of each module
among them) and QEMU's RSS. The floors, measured in the same run: `python -I -S -c pass`
with the venv's python and with Debian's /usr/bin/python3.

    scripts/bench --scale                 1, 4, 16 and 32 VMs
    bench_scale.py 1 16 --tree /work/main another checkout's qvm, e.g. main, for "before"

Needs the test guest (scripts/build-test-guest). The VMs live under a temporary dir and are
killed at the end, whatever happens.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
VENV_PYTHON = str(Path(sys.executable))
RUNS = int(os.environ.get("QVM_BENCH_RUNS", "9"))
READY_TIMEOUT = float(os.environ.get("QVM_BENCH_READY_TIMEOUT", "600"))
GUEST = """
[cpu]
count = 1
max = 4

[memory]
size = "128M"

[boot]
kernel = "{guest}/vmlinuz"
initrd = "{guest}/initrd.img"
append = "console=ttyS0 quiet irqaffinity=0"

[agent]
enabled = true
"""


class Fleet:
    def __init__(self, root: Path, tree: Path) -> None:
        self.root = root
        (root / "machines").mkdir(parents=True)
        (root / "cwd").mkdir()
        self.env = dict(
            os.environ,
            QVM_STATE_DIR=str(root / "state"),
            QVM_MACHINES=str(root / "machines"),
            PYTHONPATH=str(tree),
        )
        self.names: list[str] = []

    def qvm(self, *args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [VENV_PYTHON, "-m", "qvm.cli", *args],
            env=self.env,
            check=check,
            capture_output=True,
            text=True,
            stdin=subprocess.DEVNULL,
            # `python -m` puts the working dir first on sys.path, before PYTHONPATH: an
            # empty one, so that --tree's qvm is the one measured, supervisors included
            cwd=self.root / "cwd",
        )

    def timed(self, *args: str) -> float:
        """Wall time of one command; NaN when it failed (said on stderr), so that one
        tree's failing command does not end the run."""
        started = time.monotonic()
        done = self.qvm(*args, check=False)
        if done.returncode != 0:
            print(f"qvm {' '.join(args)}: exit {done.returncode}: {done.stderr}", file=sys.stderr)
            return float("nan")
        return time.monotonic() - started

    def define(self, count: int) -> None:
        guest = REPO / "build" / "test-guest"
        for index in range(len(self.names), count):
            name = f"s{index:02d}"
            (self.root / "machines" / f"{name}.toml").write_text(GUEST.format(guest=guest))
            self.names.append(name)

    def status(self, name: str) -> dict[str, object]:
        result: dict[str, object] = json.loads(self.qvm("status", name, "--json").stdout)
        return result

    def serial_ready(self, name: str) -> bool:
        log = self.root / "state" / name / "serial.log"
        try:
            return b"QVM-GUEST-READY" in log.read_bytes()
        except OSError:
            return False

    def wait_all(self, check: str) -> float:
        started = time.monotonic()
        waiting = list(self.names)
        while waiting:
            if time.monotonic() - started > READY_TIMEOUT:
                raise TimeoutError(f"{len(waiting)} VMs not ready ({check}) in {READY_TIMEOUT} s")
            if check == "qmp":
                waiting = [n for n in waiting if self.status(n).get("state") != "running"]
            else:
                waiting = [n for n in waiting if not self.serial_ready(n)]
            if waiting:
                time.sleep(0.2)
        return time.monotonic() - started

    def kill_all(self) -> None:
        for name in self.names:
            self.qvm("kill", name, check=False)


def pss_kib(pid: int) -> int | None:
    try:
        text = Path(f"/proc/{pid}/smaps_rollup").read_text()
    except OSError:
        return None
    for line in text.splitlines():
        if line.startswith("Pss:"):
            return int(line.split()[1])
    return None


def memory_per_vm(fleet: Fleet) -> tuple[float, float]:
    """Mean supervisor PSS and QEMU RSS, MiB."""
    supervisors, qemus = [], []
    for name in fleet.names:
        status = fleet.status(name)
        pss = pss_kib(int(status["supervisor_pid"]))  # type: ignore[call-overload]
        if pss is not None:
            supervisors.append(pss / 1024)
        rss = status.get("rss_bytes")
        if isinstance(rss, int):
            qemus.append(rss / 1024**2)
    return statistics.mean(supervisors), statistics.mean(qemus) if qemus else float("nan")


def median_ms(samples: list[float]) -> float:
    done = [sample for sample in samples if sample == sample]  # NaN: failed
    return statistics.median(done) * 1000 if done else float("nan")


def floor(python: str) -> float:
    samples = []
    for _ in range(RUNS):
        started = time.monotonic()
        subprocess.run([python, "-I", "-S", "-c", "pass"], check=True)
        samples.append(time.monotonic() - started)
    return median_ms(samples)


def queries(fleet: Fleet, live: bool) -> dict[str, float]:
    """Medians of list (not with ``live``: it has no --live), status and cpu list of the
    first VM, taken in turn."""
    extra = ("--live",) if live else ()
    name = fleet.names[0]
    runs: dict[str, list[float]] = {"status": [], "cpu list": []}
    if not live:
        runs["list"] = []
    for _ in range(RUNS):
        if not live:
            runs["list"].append(fleet.timed("list"))
        runs["status"].append(fleet.timed("status", name, *extra))
        runs["cpu list"].append(fleet.timed("cpu", "list", name, *extra))
    return {what: median_ms(samples) for what, samples in runs.items()}


def has_live(fleet: Fleet) -> bool:
    return fleet.qvm("status", fleet.names[0], "--live", check=False).returncode == 0


def bench(counts: list[int], tree: Path) -> list[dict[str, float]]:
    rows = []
    with tempfile.TemporaryDirectory(prefix="qvm-scale-") as tmp:
        fleet = Fleet(Path(tmp), tree)
        try:
            for count in counts:
                fleet.kill_all()
                fleet.define(count)
                started = time.monotonic()
                for name in fleet.names:
                    fleet.qvm("up", name, "--no-wait")
                row = {"vms": float(count), "start all": (time.monotonic() - started) * 1000}
                fleet.wait_all("qmp")
                row["all QMP"] = (time.monotonic() - started) * 1000
                fleet.wait_all("serial")
                row["all ready"] = (time.monotonic() - started) * 1000
                time.sleep(3)  # past the guests' boot: idle VMs, as a user would query them
                row.update(queries(fleet, live=False))
                if has_live(fleet):
                    row.update({f"{k} --live": v for k, v in queries(fleet, live=True).items()})
                row["supervisor PSS"], row["QEMU RSS"] = memory_per_vm(fleet)
                started = time.monotonic()
                for name in fleet.names:
                    fleet.qvm("down", name)
                row["stop all"] = (time.monotonic() - started) * 1000
                rows.append(row)
                print(json.dumps(row), file=sys.stderr, flush=True)
        finally:
            fleet.kill_all()
    return rows


def table(rows: list[dict[str, float]], floors: dict[str, float]) -> str:
    columns = [
        ("VMs", "vms", "{:.0f}"),
        ("start all", "start all", "{:.0f} ms"),
        ("all QMP", "all QMP", "{:.0f} ms"),
        ("all ready (serial)", "all ready", "{:.1f} s"),
        ("list", "list", "{:.1f} ms"),
        ("status", "status", "{:.1f} ms"),
        ("cpu list", "cpu list", "{:.1f} ms"),
        ("status --live", "status --live", "{:.1f} ms"),
        ("cpu list --live", "cpu list --live", "{:.1f} ms"),
        ("stop all", "stop all", "{:.0f} ms"),
        ("supervisor PSS / VM", "supervisor PSS", "{:.1f} MiB"),
        ("QEMU RSS / VM", "QEMU RSS", "{:.0f} MiB"),
    ]
    present = [c for c in columns if any(c[1] in row for row in rows)]
    lines = [
        "| " + " | ".join(c[0] for c in present) + " |",
        "|" + "---|" * len(present),
    ]
    for row in rows:
        cells = []
        for _, key, fmt in present:
            value = row.get(key)
            if value is None:
                cells.append("")
            elif key == "all ready":
                cells.append(fmt.format(value / 1000))
            else:
                cells.append(fmt.format(value))
        lines.append("| " + " | ".join(cells) + " |")
    lines.append("")
    lines.append(
        "Floors in the same run: "
        + ", ".join(f"`{python} -I -S -c pass` {ms:.1f} ms" for python, ms in floors.items())
        + "."
    )
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("counts", nargs="*", type=int, default=[1, 4, 16, 32])
    parser.add_argument("--tree", type=Path, default=REPO, help="the qvm checkout to measure")
    args = parser.parse_args()
    floors = {VENV_PYTHON: floor(VENV_PYTHON), "/usr/bin/python3": floor("/usr/bin/python3")}
    rows = bench(args.counts, args.tree.resolve())
    print(table(rows, floors))


if __name__ == "__main__":
    main()
