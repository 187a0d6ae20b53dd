"""qvm's speed against raw QEMU, measured in one run (medians of several).

(a) `qvm up --no-wait` and `qvm up` (to QMP ready) vs the same argv started by hand and
    polled until QMP greets; (b) wall time of `qvm status`, `qvm list`, `qvm --help`,
    against a bare `python -c pass`; (c) the supervisor's RSS; (d) `qvm exec VM -- true`
    on the test guest, and against `qvm ssh VM -- true` on one VM of the Debian test image
    (build/test-image; the comparison is left out, and said so, without it); (e) snapshots:
    a cold `qvm up` + `wait` against `qvm up --restore TAG` + `wait`, and a clone's first
    start, on the test guest (--for agent) and on the Debian image (--for ssh), in turn.
Run it with scripts/bench (which sets up first); `bench.py snapshots` runs (e) alone.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
VENV_BIN = Path(sys.executable).parent
QVM = str(VENV_BIN / "qvm")
RUNS = int(os.environ.get("QVM_BENCH_RUNS", "9"))
MACHINE = REPO / "machines" / "demo.toml"


def median_ms(samples: list[float]) -> float:
    return statistics.median(samples) * 1000


def wait_qmp_answer(path: Path, deadline: float) -> None:
    """Connect, read QMP's greeting and get an answer to qmp_capabilities: QMP ready,
    by the same rule as qvm's supervisor (QEMU greets before its devices exist)."""
    while time.monotonic() < deadline:
        try:
            with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
                sock.connect(str(path))
                sock.settimeout(5)
                reader = sock.makefile("rb")
                if b"QMP" in reader.readline():
                    sock.sendall(b'{"execute": "qmp_capabilities"}\n')
                    if b"return" in reader.readline():
                        return
        except OSError:
            time.sleep(0.001)
    raise TimeoutError(f"QMP did not answer on {path}")


def raw_argv(run_dir: Path, machine: Path = MACHINE) -> list[str]:
    sys.path.insert(0, str(REPO))
    from qvm.definition.load import load_machine
    from qvm.layout.rundir import RunDir
    from qvm.ops.up import plan_launch

    plan = plan_launch(load_machine(machine), RunDir(run_dir))
    return plan.argv


def raw_start(
    argv: list[str], run_dir: Path, ready: Callable[[Path, float], None] | None = None
) -> float:
    """Seconds from spawning QEMU by hand to ``ready(run_dir, deadline)`` returning (QMP
    answering by default); QEMU is killed then."""
    for leftover in run_dir.glob("*.sock"):
        leftover.unlink()
    started = time.monotonic()
    qemu = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        if ready is None:
            wait_qmp_answer(run_dir / "qmp.sock", started + 30)
        else:
            ready(run_dir, started + 120)
        return time.monotonic() - started
    finally:
        qemu.send_signal(signal.SIGKILL)
        qemu.wait()


def qvm(env: dict[str, str], *args: str) -> float:
    started = time.monotonic()
    subprocess.run([QVM, *args], env=env, check=True, stdout=subprocess.DEVNULL)
    return time.monotonic() - started


def qvm_start(env: dict[str, str], *args: str) -> float:
    took = qvm(env, "up", "demo", *args)
    qvm(env, "kill", "demo")
    return took


def bench_starts(root: Path, env: dict[str, str]) -> tuple[list[float], ...]:
    """Raw QEMU, `qvm up --no-wait` and `qvm up`, in turn in each round: this host's speed
    drifts by tens of percent over a minute, and each ratio must compare like with like."""
    run_dir = root / "raw"
    run_dir.mkdir(mode=0o700)
    argv = raw_argv(run_dir)
    raw: list[float] = []
    no_wait: list[float] = []
    ready: list[float] = []
    for _ in range(RUNS):
        raw.append(raw_start(argv, run_dir))
        no_wait.append(qvm_start(env, "--no-wait"))
        ready.append(qvm_start(env))
    return raw, no_wait, ready


def supervisor_rss(env: dict[str, str], state: Path) -> int:
    import json

    import psutil

    qvm(env, "up", "demo")
    try:
        time.sleep(1.0)  # let it settle into its event loop
        status = json.loads(
            subprocess.run(
                [QVM, "status", "demo", "--json"], env=env, check=True, capture_output=True
            ).stdout
        )
        return psutil.Process(status["supervisor_pid"]).memory_info().rss
    finally:
        qvm(env, "kill", "demo")


def wait_guest_ready(serial_log: Path, timeout: float = 90) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if serial_log.exists() and "QVM-GUEST-READY" in serial_log.read_text(errors="replace"):
            time.sleep(0.5)
            return
        time.sleep(0.1)
    raise TimeoutError(f"the guest never printed QVM-GUEST-READY in {serial_log}")


def bench_command(env: dict[str, str], *args: str, runs: int = 10) -> list[float]:
    return [qvm(env, *args) for _ in range(runs)]


def bench_python(python: str, code: str = "pass", runs: int = 10) -> list[float]:
    samples = []
    for _ in range(runs):
        started = time.monotonic()
        subprocess.run([python, "-c", code], check=True)
        samples.append(time.monotonic() - started)
    return samples


IMAGE = REPO / "build" / "test-image"
EXEC_VM = "benchexec"


def timed_runs(env: dict[str, str], argv: list[str]) -> float:
    started = time.monotonic()
    subprocess.run(argv, env=env, check=True, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL)
    return time.monotonic() - started


def bench_exec_against_ssh(root: Path, runs: int = 10) -> tuple[float, float] | None:
    """Medians of `qvm exec VM -- true` and `qvm ssh VM -- true`, taken in turn on one
    booted VM of the Debian test image (agent and sshd both up); None without the image."""
    if not (IMAGE / "image.json").exists():
        return None
    env = dict(
        os.environ,
        QVM_STATE_DIR=str(root / "image-state"),
        QVM_MACHINES=str(root / "image-machines"),
        HOME=str(root / "home"),  # no ~/.ssh keys: qvm makes the VM's key pair
    )
    qvm(env, "--machines", str(root / "image-machines"), "new", EXEC_VM,
        "--image", str(IMAGE / "disk.qcow2"), "--kernel", str(IMAGE / "vmlinuz"),
        "--initrd", str(IMAGE / "initrd.img"), "--append", "root=/dev/vda rw console=ttyS0",
        "--disk-size", "3G")  # fmt: skip
    qvm(env, "up", EXEC_VM)
    try:
        qvm(env, "wait", EXEC_VM, "--for", "ssh", "--timeout", "900")
        qvm(env, "wait", EXEC_VM, "--for", "agent", "--timeout", "300")
        # cloud-init's last stages run just after ssh answers: let the guest go idle
        subprocess.run([QVM, "exec", EXEC_VM, "--timeout", "300", "--", "cloud-init", "status",
                        "--wait"], env=env, capture_output=True, check=False)  # fmt: skip
        exec_runs: list[float] = []
        ssh_runs: list[float] = []
        for _ in range(runs):
            exec_runs.append(timed_runs(env, [QVM, "exec", EXEC_VM, "--", "true"]))
            ssh_runs.append(timed_runs(env, [QVM, "ssh", EXEC_VM, "--", "true"]))
        return median_ms(exec_runs), median_ms(ssh_runs)
    finally:
        subprocess.run([QVM, "kill", EXEC_VM], env=env, capture_output=True)


SNAP_RUNS = int(os.environ.get("QVM_BENCH_SNAPSHOT_RUNS", "3"))


def timed(env: dict[str, str], *commands: list[str]) -> float:
    started = time.monotonic()
    for argv in commands:
        subprocess.run([QVM, *argv], env=env, check=True, stdout=subprocess.DEVNULL)
    return time.monotonic() - started


SNAP_GUEST = """
[cpu]
count = 1
max = 4
[memory]
size = "256M"
[boot]
kernel = "{guest}/vmlinuz"
initrd = "{guest}/initrd.img"
append = "console=ttyS0 quiet irqaffinity=0"
"""
SNAP_IMAGE = """
[memory]
size = "1G"
[[disk]]
base = "{image}/disk.qcow2"
size = "3G"
[boot]
kernel = "{image}/vmlinuz"
initrd = "{image}/initrd.img"
append = "root=/dev/vda rw console=ttyS0"
[[nic]]
forwards = ["tcp:0:22"]
[cloud_init]
user = "qvm"
"""


def bench_snapshot_starts(
    root: Path,
    machine: str,
    ready: str,
    timeout: str = "300",
    runs: int = SNAP_RUNS,
    settle: list[str] | None = None,
) -> tuple[float, float, float, float]:
    """Medians (ms) of a cold `qvm up` + `wait --for READY`, `qvm up --restore` + the same
    wait, and a clone's first `qvm up` + the same wait, in turn in each round; and the
    one-off freeze of the snapshot for clones. ``machine``: the TOML text of the VM;
    ``settle``: a qvm command that waits, after the first cold start, until the guest has
    finished setting itself up, so that the snapshot is of a VM ready for use."""
    env = dict(os.environ, QVM_STATE_DIR=str(root / "snap-state"),
               QVM_MACHINES=str(root / "snap-machines"),
               HOME=str(root / "home"))  # fmt: skip
    machines = root / "snap-machines"
    machines.mkdir(parents=True, exist_ok=True)
    (machines / "snap.toml").write_text(machine)
    wait = ["wait", "snap", "--for", ready, "--timeout", timeout]
    cold: list[float] = []
    restore: list[float] = []
    clone: list[float] = []
    try:
        cold.append(timed(env, ["up", "snap"], wait))
        if settle is not None:
            timed(env, settle)
        timed(env, ["snapshot", "save", "snap", "ready"])
        freeze = timed(env, ["new", "clone0", "--from", "snap@ready"])
        for index in range(runs):
            if index:
                timed(env, ["kill", "snap"])
                cold.append(timed(env, ["up", "snap"], wait))
            timed(env, ["kill", "snap"])
            restore.append(timed(env, ["up", "snap", "--restore", "ready"], wait))
            name = f"clone{index}"
            if index:
                timed(env, ["new", name, "--from", "snap@ready"])
            clone.append(timed(env, ["up", name], ["wait", name, "--for", ready, "--timeout",
                                                  timeout]))  # fmt: skip
            timed(env, ["kill", name])
    finally:
        for vm in ("snap", *(f"clone{i}" for i in range(runs))):
            subprocess.run([QVM, "kill", vm], env=env, capture_output=True)
    return median_ms(cold), median_ms(restore), median_ms(clone), freeze * 1000


def main() -> int:
    root = Path(tempfile.mkdtemp(prefix="qvm-bench-", dir="/tmp"))
    env = dict(os.environ, QVM_STATE_DIR=str(root / "state"), QVM_MACHINES=str(REPO / "machines"))
    try:
        qvm(env, "cmdline", "demo")  # warm the QEMU capability cache, as any second use would
        raw, up_nowait, up_ready = (median_ms(s) for s in bench_starts(root, env))
        rss = supervisor_rss(env, root / "state")
        qvm(env, "up", "demo")
        try:
            # measure against a booted, idle guest: a TCG boot keeps a core busy for seconds
            wait_guest_ready(root / "state" / "demo" / "serial.log")
            status = median_ms(bench_command(env, "status", "demo"))
            qvm(env, "wait", "demo", "--for", "agent", "--timeout", "120")
            exec_guest = median_ms(bench_command(env, "exec", "demo", "--", "true"))
            listing = median_ms(bench_command(env, "list"))
        finally:
            qvm(env, "kill", "demo")
        helptext = median_ms(bench_command(env, "--help"))
        venv_python = median_ms(bench_python(sys.executable))
        # what a command line that goes to the Typer CLI (help, a mistake) pays first;
        # plain ones skip it (qvm/cli/fast.py)
        typer_floor = median_ms(
            bench_python(sys.executable, "import gc; gc.disable(); import typer")
        )
        system_python = shutil.which("python3") or sys.executable
        path_python = median_ms(bench_python(system_python))
        exec_ssh = bench_exec_against_ssh(root)
        snapshots = bench_snapshots(root)
    finally:
        subprocess.run([QVM, "kill", "demo"], env=env, capture_output=True)
        shutil.rmtree(root, ignore_errors=True)

    print(f"qvm benchmark (medians; {RUNS} rounds of starts, 10 runs per command)")
    print(f"{'what':<44} {'ms':>8}  vs raw / target")
    print(f"{'raw QEMU: spawn to QMP answering':<44} {raw:8.1f}")
    print(
        f"{'qvm up --no-wait (returns once spawned)':<44} {up_nowait:8.1f}  "
        f"x{up_nowait / raw:.2f}, {up_nowait - raw:+.0f} ms"
    )
    print(
        f"{'qvm up (returns at QMP ready)':<44} {up_ready:8.1f}  "
        f"x{up_ready / raw:.2f}, {up_ready - raw:+.0f} ms (target: +100 ms)"
    )
    print(f"{'qvm status (running VM)':<44} {status:8.1f}  (target: < 100 ms)")
    print(f"{'qvm list':<44} {listing:8.1f}  (target: < 100 ms)")
    print(f"{'qvm --help':<44} {helptext:8.1f}")
    print(f"{'python -c pass (venv: ' + Path(sys.executable).name + ')':<44} {venv_python:8.1f}")
    print(f"{'python -c pass (' + system_python + ')':<44} {path_python:8.1f}")
    print(f"{'import typer, GC off (what --help pays)':<44} {typer_floor:8.1f}")
    print(f"{'supervisor RSS':<44} {rss / 2**20:8.1f}  MiB (target: < 20 MiB)")
    print(f"{'qvm exec VM -- true (test guest)':<44} {exec_guest:8.1f}")
    if exec_ssh is None:
        print(f"{'qvm exec VM -- true vs qvm ssh VM -- true':<44} {'-':>8}  missing: no {IMAGE}")
    else:
        image_exec, image_ssh = exec_ssh
        versus = f"x{image_exec / image_ssh:.2f} of ssh, {image_exec - image_ssh:+.0f} ms"
        print(f"{'qvm exec VM -- true (Debian test image)':<44} {image_exec:8.1f}  {versus}")
        print(f"{'qvm ssh VM -- true (the same VM, same run)':<44} {image_ssh:8.1f}")
    print_snapshots(snapshots)
    return 0


SnapshotFigures = tuple[float, float, float, float]


def bench_snapshots(root: Path) -> tuple[SnapshotFigures, SnapshotFigures | None]:
    """The snapshot figures on the test guest, and on the Debian image when it is built."""
    guest = REPO / "build" / "test-guest"
    snapshots = bench_snapshot_starts(root / "guest", SNAP_GUEST.format(guest=guest), "agent")
    image_snapshots = None
    # one round on the Debian image (about 2 min); QVM_BENCH_IMAGE_SNAPSHOTS=0 skips it. The
    # snapshot is saved once cloud-init has finished (its config and final stages run for
    # about 8 s of guest CPU after ssh first answers): a snapshot taken at the first ssh
    # login would resume them, and each restore's first login would compete with them
    if (IMAGE / "image.json").exists() and os.environ.get("QVM_BENCH_IMAGE_SNAPSHOTS") != "0":
        settled = ["ssh", "snap", "--", "cloud-init", "status", "--wait"]
        image_snapshots = bench_snapshot_starts(
            root / "image", SNAP_IMAGE.format(image=IMAGE), "ssh", "900", 1, settled
        )
    return snapshots, image_snapshots


def print_snapshots(figures_of: tuple[SnapshotFigures, SnapshotFigures | None]) -> None:
    snapshots, image_snapshots = figures_of
    for label, figures in (("test guest", snapshots), ("Debian image", image_snapshots)):
        if figures is None:
            print(f"{'snapshots on the ' + label:<44} {'-':>8}  missing: no {IMAGE}, "
                  "or QVM_BENCH_IMAGE_SNAPSHOTS=0")  # fmt: skip
            continue
        cold, restore, clone, freeze = figures
        ready = "agent" if label == "test guest" else "ssh"
        print(f"{'cold up + wait --for ' + ready + ' (' + label + ')':<44} {cold:8.1f}")
        print(f"{'up --restore + wait --for ' + ready:<44} {restore:8.1f}  "
              f"x{restore / cold:.2f} of cold (goal: <= x0.10)")  # fmt: skip
        print(f"{'clone: first up + wait --for ' + ready:<44} {clone:8.1f}  "
              f"x{clone / cold:.2f} of cold")  # fmt: skip
        print(f"{'clone: new --from (freezes the snapshot once)':<44} {freeze:8.1f}")


def main_snapshots() -> int:
    """`bench.py snapshots`: the snapshot section (e) alone."""
    root = Path(tempfile.mkdtemp(prefix="qvm-bench-", dir="/tmp"))
    try:
        figures = bench_snapshots(root)
    finally:
        shutil.rmtree(root, ignore_errors=True)
    print_snapshots(figures)
    return 0


if __name__ == "__main__":
    sys.exit(main_snapshots() if sys.argv[1:] == ["snapshots"] else main())
