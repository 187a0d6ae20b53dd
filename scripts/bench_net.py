"""VM-to-VM throughput on a private network: qvm's (a NIC on a QEMU hub whose uplink is
a vde plug, qvm.cmdline.argv.uplink_args) against raw QEMU's (the NIC on `-netdev vde`
directly), measured in the same run on the same two test guests' command lines.

qvm's side: two test guests on network `bench` (`qvm up`), set up by qvm. The raw side:
the argv qvm ran for each (launch.json) with the NIC's netdev replaced by a plain
`-netdev vde` on a `vde_switch` started by hand, the addresses set through the agent's
socket. Each run pipes $QVM_BENCH_NET_MIB MiB (default 64) of zeros from one guest to
the other with busybox `nc`, timed in the sending guest (busybox `time`).
Runs alternate (raw, qvm); $QVM_BENCH_NET_RUNS (default 3). Medians.
"""

from __future__ import annotations

import base64
import json
import os
import re
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from bench_share import qvm  # the same run of the CLI, failing with its message

from qvm.supervisor.agent_wire import AgentClient

REPO = Path(__file__).resolve().parent.parent
QVM = str(Path(sys.executable).parent / "qvm")
GUEST = Path(os.environ.get("QVM_TEST_GUEST", REPO / "build" / "test-guest"))
RUNS = int(os.environ.get("QVM_BENCH_NET_RUNS", "3"))
MIB = int(os.environ.get("QVM_BENCH_NET_MIB", "64"))
PORT = 5001
REAL = re.compile(r"real\s+(\d+)m\s*([0-9.]+)s")


def machine_toml() -> str:
    return f"""
[memory]
size = "256M"

[[nic]]
network = "bench"

[boot]
kernel = "{GUEST}/vmlinuz"
initrd = "{GUEST}/initrd.img"
append = "console=ttyS0 quiet"
"""


class Agent:
    """A guest agent on a socket (qvm's agent.sock, or raw QEMU's chardev)."""

    def __init__(self, path: str) -> None:
        self.sock = socket.socket(socket.AF_UNIX)
        self.sock.connect(path)
        self.client = AgentClient(self.sock, path)
        self.client.sync()

    def start(self, script: str) -> int:
        reply = self.client.execute(
            "guest-exec", {"path": "/bin/sh", "arg": ["-c", script], "capture-output": True}
        )
        return int(reply["pid"])

    def wait(self, pid: int, timeout: float = 300) -> str:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            status = self.client.execute("guest-exec-status", {"pid": pid})
            if status.get("exited"):
                out = base64.b64decode(status.get("out-data") or "")
                err = base64.b64decode(status.get("err-data") or "")
                return (out + err).decode(errors="replace")
            time.sleep(0.05)
        raise SystemExit("the guest's transfer did not end")

    def run(self, script: str) -> str:
        return self.wait(self.start(script))


def transfer(sender: Agent, receiver: Agent, address: str) -> float:
    """MiB/s of one transfer, timed in the sending guest (busybox time). The receiver's
    nc hands the connection to a sink script (-e): with a pipe instead, nc would quit
    at once, its stdin (the agent's /dev/null) at its end."""
    count = MIB * 16  # blocks of 64 KiB
    receiver.run(f"printf '#!/bin/sh\\nhead -c {MIB * 1024**2} >/dev/null\\n' >/tmp/sink")
    listening = receiver.start(f"chmod +x /tmp/sink && nc -l -p {PORT} -e /tmp/sink")
    time.sleep(1.5)  # the listener is up (a refused connect would end it at once)
    said = sender.run(
        f"time sh -c 'dd if=/dev/zero bs=65536 count={count} 2>/dev/null | nc {address} {PORT}'"
    )
    heard = receiver.wait(listening)
    match = REAL.search(said)
    if match is None:
        raise SystemExit(f"no timing: the sender said {said!r}, the receiver {heard!r}")
    return MIB / (int(match.group(1)) * 60 + float(match.group(2)))


def raw_argv(argv: list[str], run: str, raw: str, switch: str) -> list[str]:
    """qvm's argv with the run dir moved and the NIC on `-netdev vde` directly."""
    out: list[str] = []
    for arg in argv:
        if arg.startswith("hubport,id=net0,"):
            out.append(f"vde,id=net0,sock={switch}")
        elif arg.startswith(("vde,id=qvm.", "hubport,id=qvm.")):
            out.pop()  # the uplink's -netdev
        else:
            out.append(arg.replace(run, raw))
    return out


def wait_agent(path: str, timeout: float = 120) -> Agent:
    deadline = time.monotonic() + timeout
    while True:
        try:
            return Agent(path)
        except Exception:  # noqa: BLE001 - QEMU or the agent is not up yet
            if time.monotonic() > deadline:
                raise
            time.sleep(0.5)


def main() -> int:
    root = Path(tempfile.mkdtemp(prefix="qvm-bn", dir="/tmp"))
    env = dict(os.environ, QVM_STATE_DIR=str(root / "s"), QVM_MACHINES=str(root / "m"))
    (root / "m").mkdir()
    for name in ("n1", "n2"):
        (root / "m" / f"{name}.toml").write_text(machine_toml())
    raw_procs: list[subprocess.Popen[bytes]] = []
    switch_pid = None
    try:
        qvm(env, "up", "n1", "n2")
        for name in ("n1", "n2"):
            qvm(env, "wait", name, "--for", "agent", "--timeout", "120")
        deadline = time.monotonic() + 60
        while not all(
            n["guest_configured"]
            for name in ("n1", "n2")
            for n in json.loads(qvm(env, "status", name, "--json"))["networks"]
        ):
            if time.monotonic() > deadline:
                raise SystemExit("qvm did not set the guests up")
            time.sleep(0.2)
        address = json.loads(qvm(env, "status", "n2", "--json"))["networks"][0]["address"]
        q_agents = [Agent(str(root / "s" / name / "agent.sock")) for name in ("n1", "n2")]
        argvs = {
            name: json.loads((root / "s" / name / "launch.json").read_text())["argv"]
            for name in ("n1", "n2")
        }
        # raw: its own switch and two QEMUs with the same argv, NIC straight on vde
        raw = root / "r"
        raw.mkdir()
        subprocess.run(
            ["vde_switch", "-d", "-s", str(raw / "sw"), "-M", str(raw / "mg"), "-p",
             str(raw / "pid")],
            check=True,
        )  # fmt: skip
        time.sleep(0.3)
        switch_pid = int((raw / "pid").read_text())
        r_agents = []
        for index, name in enumerate(("n1", "n2")):
            (raw / name).mkdir()
            argv = raw_argv(argvs[name], str(root / "s" / name), str(raw / name), str(raw / "sw"))
            log = open(raw / name / "qemu.log", "wb")  # noqa: SIM115 - lives as long as QEMU
            raw_procs.append(subprocess.Popen(argv, stdout=log, stderr=log))
            agent = wait_agent(str(raw / name / "qga.sock"))
            ip = f"10.99.0.{index + 1}/24"
            agent.run(f"ip addr add {ip} dev eth0 && ip link set eth0 up")
            r_agents.append(agent)
        qvm_rates, raw_rates = [], []
        for _ in range(RUNS):
            raw_rates.append(transfer(r_agents[0], r_agents[1], "10.99.0.2"))
            qvm_rates.append(transfer(q_agents[0], q_agents[1], address.split("/")[0]))
        q, r = statistics.median(qvm_rates), statistics.median(raw_rates)
        print(f"VM-to-VM throughput, {MIB} MiB by busybox nc, medians of {RUNS} (TCG):")
        print(f"  raw QEMU (-netdev vde)          {r:8.1f} MiB/s")
        print(f"  qvm (hub + vde uplink)          {q:8.1f} MiB/s   x{q / r:.2f} of raw")
        return 0
    finally:
        for proc in raw_procs:
            proc.kill()
            proc.wait()
        if switch_pid:
            os.kill(switch_pid, 15)
        subprocess.run([QVM, "kill", "n1", "n2"], env=env, capture_output=True, check=False)
        shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
