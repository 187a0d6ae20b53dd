"""Stopping many VMs: `qvm down --all` of N booted test guests (128 MiB, default 16)
against raw QEMU stopped one after the other, as a loop of `virsh destroy` or a script
does it (QMP `quit`, wait for the process to end, next).

Each figure is the wall time from the first request to the moment every QEMU has exited.
Rounds, each on N freshly booted, idle guests (the boot of N TCG guests at once keeps
both cores busy for a while, so every round waits for every guest's QVM-GUEST-READY):
raw QEMU's serial `quit` loop, from this process and from a program started for each VM
(as `virsh` is one); raw QEMU's power button pressed on all at once; `qvm down` one VM
after the other; `qvm down --all` (ACPI power button, the guest powers off); `qvm down
--all --force` (QMP quit, like raw's); `qvm kill --all`; `qvm down --all --jobs 4`. Also
`qvm up @GROUP` (all at once, to QMP answering) against `qvm up` one VM after the other.

Run it with scripts/bench, or alone: `.venv/bin/python scripts/bench_group.py [N]`.
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

from bench_scale import APPEND
from bench_scale import GUEST as FLEET_MACHINE

REPO = Path(__file__).resolve().parent.parent
VENV_BIN = Path(sys.executable).parent
QVM = str(VENV_BIN / "qvm")
GUEST_DIR = REPO / "build" / "test-guest"
# the fleet's machine of bench_scale.py, in one group (this folder is on sys.path)
MACHINE = 'group = "bench"\n' + FLEET_MACHINE


def qvm(env: dict[str, str], *args: str) -> float:
    started = time.monotonic()
    subprocess.run([QVM, *args], env=env, check=True, stdout=subprocess.DEVNULL)
    return time.monotonic() - started


def wait_ready(serial_logs: list[Path], timeout: float = 180) -> None:
    """Every guest printed QVM-GUEST-READY, then a moment to go idle. A guest that never
    does (rarely, one of 16 under a host this busy) is said, and the round goes on."""
    deadline = time.monotonic() + timeout
    waiting = list(serial_logs)
    while waiting and time.monotonic() < deadline:
        waiting = [
            log for log in waiting if not (log.exists() and b"QVM-GUEST-READY" in log.read_bytes())
        ]
        time.sleep(0.2)
    for log in waiting:
        kept = Path(tempfile.mkdtemp(prefix="qvm-bench-not-ready-", dir="/tmp")) / log.name
        shutil.copy(log, kept)
        print(f"not ready after {timeout:g} s: {log} (kept as {kept})", file=sys.stderr)
    time.sleep(2.0)


def qmp(path: Path, command: str) -> None:
    """One command on a raw QEMU's QMP socket, greeting and capabilities first."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        sock.connect(str(path))
        sock.settimeout(10)
        reader = sock.makefile("rb")
        reader.readline()
        sock.sendall(b'{"execute": "qmp_capabilities"}\n')
        reader.readline()
        sock.sendall(f'{{"execute": "{command}"}}\n'.encode())
        while b"return" not in reader.readline():
            pass


# a QMP client as a program of its own, as `virsh destroy` is one: a process per VM
QUIT_PROGRAM = """
import socket, sys
sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
sock.connect(sys.argv[1])
reader = sock.makefile("rb")
reader.readline()
sock.sendall(b'{"execute": "qmp_capabilities"}\\n')
reader.readline()
sock.sendall(b'{"execute": "quit"}\\n')
reader.readline()
"""


def raw_round(root: Path, count: int, how: str) -> float:
    """N raw QEMUs with qvm's argv, booted; then ``how``: "quit" and wait, one after the
    other, from this process; "program": the same from a QMP client started for each;
    "acpi": the power button pressed on every one, then every guest's power-off awaited
    (the least any graceful stop of them all takes)."""
    sys.path.insert(0, str(REPO))
    from qvm.definition.load import load_machine
    from qvm.layout.rundir import RunDir
    from qvm.ops.up import plan_launch

    qemus = []
    for index in range(count):
        run = RunDir(root / "raw" / f"r{index}")
        shutil.rmtree(run.path, ignore_errors=True)
        run.create()
        plan = plan_launch(load_machine(root / "machines" / f"g{index}.toml"), run)
        argv = [a for a in plan.argv]
        qemus.append(
            (
                run,
                subprocess.Popen(
                    argv, cwd=run.path, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
                ),
            )
        )
    try:
        wait_ready([run.serial_log for run, _ in qemus])
        started = time.monotonic()
        for run, qemu in qemus:
            if how == "program":
                subprocess.run([sys.executable, "-c", QUIT_PROGRAM, run.qmp_socket], check=True)
            else:
                qmp(run.qmp_socket, "system_powerdown" if how == "acpi" else "quit")
            if how != "acpi":
                qemu.wait()
        for _, qemu in qemus:
            qemu.wait()
        return time.monotonic() - started
    finally:
        for _, qemu in qemus:
            qemu.kill()
            qemu.wait()


def qvm_round(
    env: dict[str, str], state: Path, count: int, stop: Callable[[], float], serial_up: bool
) -> tuple[float, float]:
    """`qvm up` of the N guests (at once, or one after the other), booted; then ``stop``,
    timed until every QEMU has exited. Returns (up, stop) in seconds."""
    if serial_up:
        up = sum(qvm(env, "up", f"g{index}") for index in range(count))
    else:
        up = qvm(env, "up", "@bench")
    wait_ready([state / f"g{index}" / "serial.log" for index in range(count)])
    pids = qemu_pids(state, count)
    took = stop()
    alive = [pid for pid in pids if os.path.exists(f"/proc/{pid}")]
    if alive:
        raise RuntimeError(f"QEMUs still running after the stop: {alive}")
    return up, took


def qemu_pids(state: Path, count: int) -> list[int]:
    import json

    return [
        json.loads((state / f"g{index}" / "state.json").read_text())["qemu_pid"]
        for index in range(count)
    ]


def main() -> int:
    count = int(sys.argv[1]) if len(sys.argv) > 1 else 16
    root = Path(tempfile.mkdtemp(prefix="qvm-bench-group-", dir="/tmp"))
    state = root / "state"
    env = dict(os.environ, QVM_STATE_DIR=str(state), QVM_MACHINES=str(root / "machines"))
    (root / "machines").mkdir()
    for index in range(count):
        (root / "machines" / f"g{index}.toml").write_text(
            MACHINE.format(guest=GUEST_DIR, append=APPEND)
        )
    figures: list[tuple[str, float]] = []
    try:
        figures.append(("raw QEMU, serial loop of QMP quit", raw_round(root, count, "quit")))
        figures.append(
            ("raw QEMU, serial loop of a QMP quit program", raw_round(root, count, "program"))
        )
        figures.append(
            ("raw QEMU, ACPI power button on all at once", raw_round(root, count, "acpi"))
        )

        def serial_down() -> float:
            return sum(qvm(env, "down", f"g{index}") for index in range(count))

        up_serial, took = qvm_round(env, state, count, serial_down, serial_up=True)
        figures.append(("qvm up, one VM after the other", up_serial))
        figures.append(("qvm down, one VM after the other", took))
        up_all, took = qvm_round(env, state, count, lambda: qvm(env, "down", "--all"), False)
        figures.append(("qvm up @bench (all at once)", up_all))
        figures.append(("qvm down --all (ACPI)", took))
        for label, args in (
            ("qvm down --all --force (QMP quit)", ["down", "--all", "--force"]),
            ("qvm kill --all", ["kill", "--all"]),
            ("qvm down --all --jobs 4", ["down", "--all", "--jobs", "4"]),
        ):
            figures.append(
                (label, qvm_round(env, state, count, lambda a=args: qvm(env, *a), False)[1])
            )
    finally:
        subprocess.run([QVM, "kill", "--all"], env=env, capture_output=True)
        shutil.rmtree(root, ignore_errors=True)
    loop = figures[1][1]
    print(f"{count} booted test guests (128 MiB): up to QMP answering, stop to every QEMU exited")
    for label, seconds in figures:
        stops = "down" in label or "kill" in label
        versus = f"  x{seconds / loop:.2f} of the quit program's loop" if stops else ""
        print(f"{label:<48} {seconds:7.2f} s{versus}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
