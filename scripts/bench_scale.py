"""How qvm grows with the number of VMs: 1, 4, 16 and 32 test guests of 128 MiB (TCG).

For each count, in one state dir: start all (`qvm up --no-wait`, one after the other),
all ready (every VM's QEMU answering QMP, then every guest's `QVM-GUEST-READY` line on its
serial console), `list`, `status` and `cpu list` of one VM (medians; as read from the
supervisors' records, and with `--live` as the round trips they replace), stop all
(`qvm down --all` to every QEMU exited) and memory per VM: the supervisors' PSS (from
/proc/PID/smaps_rollup, which shares the pages of the interpreter and of each module
among them) and QEMU's RSS. The floors, measured in the same run: `python -I -S -c pass`
with the venv's python and with Debian's /usr/bin/python3.

    scripts/bench --scale                 1, 4, 16 and 32 VMs
    bench_scale.py 1 16 --tree /work/main another checkout's qvm, e.g. main, for "before"

Needs the test guest (scripts/build-test-guest). The VMs live under a temporary dir and are
killed at the end, whatever happens. A count whose guests do not all boot within
QVM_BENCH_READY_TIMEOUT (600 s) is said under the table, not fatal.
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
from collections.abc import Callable
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
VENV_PYTHON = str(Path(sys.executable))
RUNS = int(os.environ.get("QVM_BENCH_RUNS", "9"))
READY_TIMEOUT = float(os.environ.get("QVM_BENCH_READY_TIMEOUT", "600"))
# no_timer_check: a TCG vCPU starved by 30 others booting on 2 cores misses the kernel's
# early check that the IO-APIC timer ticks, and the guest panics ("IO-APIC + timer doesn't
# work!"; 4 of 32 on 2026-12-05). The check is for broken hardware, which QEMU's is not
APPEND = "console=ttyS0 quiet irqaffinity=0 no_timer_check"
GUEST = """
[cpu]
count = 1
max = 4

[memory]
size = "128M"

[boot]
kernel = "{guest}/vmlinuz"
initrd = "{guest}/initrd.img"
append = "{append}"

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
        self.problems: list[str] = []  # what kept a count's figures from being whole

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
        return timed_command(self.qvm, *args)

    def define(self, count: int) -> None:
        guest = REPO / "build" / "test-guest"
        for index in range(len(self.names), count):
            name = f"s{index:02d}"
            machine = GUEST.format(guest=guest, append=APPEND)
            (self.root / "machines" / f"{name}.toml").write_text(machine)
            self.names.append(name)

    def status(self, name: str) -> dict[str, object]:
        result: dict[str, object] = json.loads(self.qvm("status", name, "--json").stdout)
        return result

    def serial_log(self, name: str) -> Path:
        return self.root / "state" / name / "serial.log"

    def wait_all(self, check: str) -> float:
        if check == "qmp":
            return wait_until(self.names, lambda n: self.status(n).get("state") == "running", check)
        return wait_serial(self.names, self.serial_log)

    def boot(self, count: int) -> dict[str, float]:
        """Start ``count`` VMs (`up --no-wait` one after the other) and wait for every QMP,
        then every guest's ready line: ms from the first `up` to each. A guest that does
        not print its line in READY_TIMEOUT leaves "all ready" NaN and says so on stderr:
        the VMs run all the same (QMP answered), and the figures after it are still taken."""
        self.define(count)
        started = time.monotonic()
        for name in self.names:
            self.qvm("up", name, "--no-wait")
        row = {"vms": float(count), "start all": (time.monotonic() - started) * 1000}
        self.wait_all("qmp")
        row["all QMP"] = (time.monotonic() - started) * 1000
        try:
            self.wait_all("serial")
            row["all ready"] = (time.monotonic() - started) * 1000
        except (TimeoutError, GuestPanicked) as failed:
            self.problems.append(f"{count} VMs: {failed}")
            row["all ready"] = float("nan")
        time.sleep(3)  # past the guests' boot: idle VMs, as a user would query them
        return row

    def qemu_pids(self) -> list[int]:
        pids = [self.status(name).get("pid") for name in self.names]
        return [pid for pid in pids if isinstance(pid, int)]

    def stop_all(self) -> float:
        """Seconds from `qvm down --all` (the ACPI power button; the guests power off) to
        every QEMU exited."""
        pids = self.qemu_pids()
        started = time.monotonic()
        self.qvm("down", "--all")
        wait_exited(pids)
        return time.monotonic() - started

    def kill_all(self) -> None:
        for name in self.names:
            self.qvm("kill", name, check=False)


def timed_command(run: Callable[..., subprocess.CompletedProcess[str]], *args: str) -> float:
    """Wall time of ``run(*args, check=False)``; NaN when it failed (said on stderr), so
    that one failing command does not end the run."""
    started = time.monotonic()
    done = run(*args, check=False)
    if done.returncode != 0:
        print(f"{' '.join(map(str, done.args))}: exit {done.returncode}: {done.stderr}",
              file=sys.stderr)  # fmt: skip
        return float("nan")
    return time.monotonic() - started


def printed_ready(serial_log: Path) -> bool:
    try:
        return b"QVM-GUEST-READY" in serial_log.read_bytes()
    except OSError:
        return False


class GuestPanicked(Exception):
    """Some guests' kernels panicked at boot: they will never be ready."""


def panic_of(serial_log: Path) -> str | None:
    """The kernel's panic line on a guest's console, if it panicked."""
    try:
        text = serial_log.read_bytes().decode(errors="replace")
    except OSError:
        return None
    for line in text.splitlines():
        if "Kernel panic - not syncing:" in line:
            return line.split("not syncing:", 1)[1].strip(" -")
    return None


def wait_serial(names: list[str], serial_log: Callable[[str], Path]) -> float:
    """Seconds until every guest printed its ready line; GuestPanicked once every other
    one has and some panicked, TimeoutError after READY_TIMEOUT."""
    panics: dict[str, str] = {}

    def settled(name: str) -> bool:
        if printed_ready(serial_log(name)):
            return True
        panic = panic_of(serial_log(name))
        if panic is not None:
            panics[name] = panic
        return panic is not None

    took = wait_until(names, settled, "serial")
    if panics:
        reasons = sorted(set(panics.values()))
        raise GuestPanicked(
            f"{len(panics)} of {len(names)} guests' kernels panicked at boot "
            f"({', '.join(sorted(panics))}: {'; '.join(reasons)}), the others were ready "
            f"in {took:.1f} s"
        )
    return took


def wait_until(names: list[str], ready: Callable[[str], bool], what: str) -> float:
    """Seconds until ``ready(name)`` holds for every name; TimeoutError after READY_TIMEOUT
    naming how many of them are still waiting."""
    started = time.monotonic()
    waiting = list(names)
    while waiting:
        if time.monotonic() - started > READY_TIMEOUT:
            raise TimeoutError(
                f"{len(waiting)} of {len(names)} VMs not ready ({what}) after {READY_TIMEOUT:g} s"
            )
        waiting = [name for name in waiting if not ready(name)]
        if waiting:
            time.sleep(0.2)
    return time.monotonic() - started


def exited(pid: int) -> bool:
    """The process is gone, or a zombie (its parent has not reaped it yet)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return True
    return stat.rsplit(")", 1)[1].split()[0] == "Z"


def wait_exited(pids: list[int], timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    while not all(exited(pid) for pid in pids):
        if time.monotonic() > deadline:
            raise TimeoutError(f"still running after {timeout:g} s: {pids}")
        time.sleep(0.005)


def pss_kib(pid: int, field: str = "Pss") -> int | None:
    """A field of /proc/PID/smaps_rollup (Pss, Rss...), KiB; None once the process is gone."""
    try:
        text = Path(f"/proc/{pid}/smaps_rollup").read_text()
    except OSError:
        return None
    for line in text.splitlines():
        if line.startswith(field + ":"):
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


def floor_once(python: str) -> float:
    started = time.monotonic()
    subprocess.run([python, "-I", "-S", "-c", "pass"], check=True)
    return time.monotonic() - started


def floor(python: str) -> float:
    return in_turn({"floor": lambda: floor_once(python)})["floor"]


def in_turn(commands: dict[str, Callable[[], float]]) -> dict[str, float]:
    """Medians (ms) of RUNS rounds, each running every command once, in turn: this host's
    speed drifts within a minute, and the figures compared must share it."""
    runs: dict[str, list[float]] = {what: [] for what in commands}
    for _ in range(RUNS):
        for what, command in commands.items():
            runs[what].append(command())
    return {what: median_ms(samples) for what, samples in runs.items()}


def queries(fleet: Fleet, live: bool) -> dict[str, float]:
    """Medians of list (not with ``live``: it has no --live), status and cpu list of the
    first VM, taken in turn."""
    extra = ("--live",) if live else ()
    name = fleet.names[0]
    commands: dict[str, Callable[[], float]] = {}
    if not live:
        commands["list"] = lambda: fleet.timed("list")
    commands["status"] = lambda: fleet.timed("status", name, *extra)
    commands["cpu list"] = lambda: fleet.timed("cpu", "list", name, *extra)
    return in_turn(commands)


def has_live(fleet: Fleet) -> bool:
    return fleet.qvm("status", fleet.names[0], "--live", check=False).returncode == 0


def bench(counts: list[int], tree: Path) -> tuple[list[dict[str, float]], list[str]]:
    """The rows of the counts measured, and a line for each count that could not be."""
    rows = []
    notes: list[str] = []
    with tempfile.TemporaryDirectory(prefix="qvm-scale-") as tmp:
        fleet = Fleet(Path(tmp), tree)
        try:
            for count in counts:
                fleet.kill_all()
                try:
                    row = fleet.boot(count)
                except TimeoutError as slow:  # no QMP: nothing to measure at this count
                    notes.append(f"{count} VMs: not measured: {slow}.")
                    continue
                if row["all ready"] != row["all ready"]:
                    notes.extend(fleet.problems)
                    notes.append(
                        f'{count} VMs: so no "all ready" (TCG boots of {count} guests at '
                        f"once on {os.cpu_count()} cores; QVM_BENCH_READY_TIMEOUT, now "
                        f"{READY_TIMEOUT:g} s, raises the wait); the other figures are of the "
                        "VMs running, QMP answering."
                    )
                    fleet.problems.clear()
                row.update(queries(fleet, live=False))
                if has_live(fleet):
                    row.update({f"{k} --live": v for k, v in queries(fleet, live=True).items()})
                row["supervisor PSS"], row["QEMU RSS"] = memory_per_vm(fleet)
                row["stop all"] = fleet.stop_all() * 1000
                rows.append(row)
                print(json.dumps(row), file=sys.stderr, flush=True)
        finally:
            fleet.kill_all()
    return rows, notes


def table(rows: list[dict[str, float]], floors: dict[str, float], notes: list[str]) -> str:
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
            elif value != value:  # NaN: not measured, said in a note
                cells.append("-")
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
    return "\n".join([*lines, *notes])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("counts", nargs="*", type=int, default=[1, 4, 16, 32])
    parser.add_argument("--tree", type=Path, default=REPO, help="the qvm checkout to measure")
    args = parser.parse_args()
    floors = {VENV_PYTHON: floor(VENV_PYTHON), "/usr/bin/python3": floor("/usr/bin/python3")}
    rows, notes = bench(args.counts, args.tree.resolve())
    print(table(rows, floors, notes))


if __name__ == "__main__":
    main()
