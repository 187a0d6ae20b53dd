"""vCPU hotplug: `qvm cpu add/del` against raw QMP, measured on one VM in one run.

One test-guest VM boots with 1 of 1+2N vCPUs (then a second one, without the guest agent).
Because TCG QEMU 7.2 crashes on a vCPU add after any unplug, all adds come first, then all
removals; raw and qvm alternate so that any drift (more vCPUs, a warmer guest) hits both alike.

- add, raw: an already connected qemu.qmp client sends device_add for the lowest free
  slot; measured to its reply, and to the guest's serial log showing the new ncpus.
- add, qvm: `qvm cpu add NAME` as a subprocess, from its start to its exit, and to the
  guest's serial log showing the new ncpus.
- del, raw: the client opens an event listener, sends device_del, and waits for
  DEVICE_DELETED (QEMU 7.2: path /machine/peripheral/<id>/lapic).
- del, qvm: `qvm cpu del NAME` as a subprocess, from its start to QEMU's DEVICE_DELETED
  (the event's own timestamp, as the raw client sees it on the user's socket), and to its
  exit having printed "removed" (after it has also checked QEMU's slot list and printed).

The guest polls its CPUs every 0.2 s, so "guest sees it" carries up to 0.2 s of that
polling for both. Run with .venv/bin/python (scripts/bench calls it).
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
QVM = str(Path(sys.executable).parent / "qvm")
RUNS = int(os.environ.get("QVM_BENCH_RUNS", "5"))
GUEST = Path(os.environ.get("QVM_TEST_GUEST", REPO / "build" / "test-guest"))
NAME = "benchcpu"
STATE = re.compile(r"^QVM-STATE cpus=\S+ ncpus=(\d+) ", re.M)


def machine_toml(max_cpus: int, agent: bool) -> str:
    return f"""
[agent]
enabled = {str(agent).lower()}

[machine]
type = "q35"

[cpu]
count = 1
max = {max_cpus}

[memory]
size = "256M"

[boot]
kernel = "{GUEST}/vmlinuz"
initrd = "{GUEST}/initrd.img"
append = "console=ttyS0 quiet"
"""


class Serial:
    def __init__(self, path: Path) -> None:
        self.path = path

    def size(self) -> int:
        try:
            return self.path.stat().st_size
        except OSError:
            return 0

    def wait_ncpus(self, ncpus: int, offset: int, timeout: float = 30) -> float:
        """Wait until a QVM-STATE line written after ``offset`` says ``ncpus``."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            with open(self.path, "rb") as handle:
                handle.seek(offset)
                text = handle.read().decode(errors="replace")
            if any(int(m.group(1)) == ncpus for m in STATE.finditer(text)):
                return time.monotonic()
            time.sleep(0.002)
        raise TimeoutError(f"the guest never reported ncpus={ncpus}")


class RawClient:
    """A user's own script: one qemu.qmp connection on the VM's user socket."""

    def __init__(self, socket_path: Path) -> None:
        from qemu.qmp import QMPClient

        self.loop = asyncio.new_event_loop()
        self.client = QMPClient("bench")
        self.loop.run_until_complete(self.client.connect(str(socket_path)))

    def execute(self, command: str, arguments: dict[str, Any] | None = None) -> Any:
        return self.loop.run_until_complete(self.client.execute(command, arguments))

    def lowest_free_slot(self) -> dict[str, Any]:
        free = [h for h in self.execute("query-hotpluggable-cpus") if "qom-path" not in h]
        return min(free, key=lambda h: tuple(sorted(h["props"].items())))

    def newest_device(self) -> str:
        present = [
            h["qom-path"].rsplit("/", 1)[1]
            for h in self.execute("query-hotpluggable-cpus")
            if h.get("qom-path", "").startswith("/machine/peripheral/")
        ]
        return sorted(present, key=lambda i: int(re.sub(r"\D", "", i)))[-1]

    def device_del_until_deleted(self, dev_id: str) -> tuple[float, float]:
        """(seconds to device_del's reply, seconds to DEVICE_DELETED)."""
        from qemu.qmp import EventListener

        listener = EventListener("DEVICE_DELETED")
        prefix = f"/machine/peripheral/{dev_id}"

        async def run() -> tuple[float, float]:
            with self.client.listen(listener):
                started = time.monotonic()
                await self.client.execute("device_del", {"id": dev_id})
                replied = time.monotonic() - started
                async for event in listener:
                    path = event.get("data", {}).get("path", "")
                    if path == prefix or path.startswith(prefix + "/"):
                        return replied, time.monotonic() - started
            raise RuntimeError("no DEVICE_DELETED")

        return self.loop.run_until_complete(asyncio.wait_for(run(), 30))

    def listen_deleted(self) -> Any:
        """An event listener for DEVICE_DELETED, registered now; read it with ``deleted_at``."""
        from qemu.qmp import EventListener

        listener = EventListener("DEVICE_DELETED")
        self.client.register_listener(listener)
        return listener

    def deleted_at(self, listener: Any) -> float:
        """QEMU's wall-clock timestamp of the first DEVICE_DELETED of a vCPU (only one is
        unplugged while the listener is open)."""

        async def run() -> float:
            async for event in listener:
                path = event.get("data", {}).get("path", "")
                if path.startswith("/machine/peripheral/"):
                    stamp = event["timestamp"]
                    return stamp["seconds"] + stamp["microseconds"] / 1e6
            raise RuntimeError("no DEVICE_DELETED")

        try:
            return self.loop.run_until_complete(asyncio.wait_for(run(), 30))
        finally:
            self.client.remove_listener(listener)

    def close(self) -> None:
        self.loop.run_until_complete(self.client.disconnect())
        self.loop.close()


def qvm(env: dict[str, str], *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([QVM, *args], env=env, check=True, capture_output=True, text=True)


def measure(agent: bool) -> dict[str, float]:
    """Medians in ms of one VM's adds and removals, raw and qvm in turn."""
    root = Path(tempfile.mkdtemp(prefix="qvm-bcpu-", dir="/tmp"))
    machines = root / "machines"
    machines.mkdir()
    (machines / f"{NAME}.toml").write_text(machine_toml(1 + 2 * RUNS, agent))
    env = dict(os.environ, QVM_STATE_DIR=str(root / "state"), QVM_MACHINES=str(machines))
    run_dir = root / "state" / NAME
    serial = Serial(run_dir / "serial.log")
    samples: dict[str, list[float]] = {
        k: []
        for k in (
            "raw_add_reply",
            "raw_add_guest",
            "qvm_add_exit",
            "qvm_add_guest",
            "raw_del_reply",
            "raw_del_deleted",
            "qvm_del_exit",
            "qvm_del_deleted",
        )
    }
    raw = None
    try:
        qvm(env, "up", NAME)
        serial.wait_ncpus(1, 0, timeout=90)
        raw = RawClient(run_dir / "qmp.sock")
        ncpus = 1
        for _ in range(RUNS):
            slot = raw.lowest_free_slot()
            offset = serial.size()
            started = time.monotonic()
            raw.execute(
                "device_add",
                {"driver": slot["type"], "id": f"raw{ncpus}", **slot["props"]},
            )
            samples["raw_add_reply"].append(time.monotonic() - started)
            ncpus += 1
            samples["raw_add_guest"].append(serial.wait_ncpus(ncpus, offset) - started)

            offset = serial.size()
            started = time.monotonic()
            out = qvm(env, "cpu", "add", NAME)
            samples["qvm_add_exit"].append(time.monotonic() - started)
            assert "added" in out.stdout, out.stdout
            ncpus += 1
            samples["qvm_add_guest"].append(serial.wait_ncpus(ncpus, offset) - started)

        for _ in range(RUNS):
            offset = serial.size()
            replied, deleted = raw.device_del_until_deleted(raw.newest_device())
            samples["raw_del_reply"].append(replied)
            samples["raw_del_deleted"].append(deleted)
            ncpus -= 1
            serial.wait_ncpus(ncpus, offset)

            offset = serial.size()
            listener = raw.listen_deleted()
            started_wall = time.time()
            started = time.monotonic()
            out = qvm(env, "cpu", "del", NAME)
            samples["qvm_del_exit"].append(time.monotonic() - started)
            samples["qvm_del_deleted"].append(raw.deleted_at(listener) - started_wall)
            assert "removed" in out.stdout, out.stdout
            ncpus -= 1
            serial.wait_ncpus(ncpus, offset)
    finally:
        if raw is not None:
            with contextlib.suppress(Exception):  # the VM is killed next anyway
                raw.close()
        subprocess.run([QVM, "kill", NAME], env=env, capture_output=True)
        shutil.rmtree(root, ignore_errors=True)

    return {k: statistics.median(v) * 1000 for k, v in samples.items()}


def main() -> int:
    def row(label: str, raw_ms: float, qvm_ms: float) -> None:
        ratio = qvm_ms / raw_ms
        print(f"{label:<46} {raw_ms:8.1f} {qvm_ms:8.1f} {ratio:8.2f} {qvm_ms - raw_ms:+8.1f}")

    for agent, title in (
        (True, "with the guest agent (the default): cpu del offlines in the guest first"),
        (False, "[agent] enabled = false: QEMU and the guest's own ACPI handling only"),
    ):
        ms = measure(agent)
        print(f"vCPU hotplug, {title}")
        print(f"  (test guest, medians of {RUNS}; one VM, raw and qvm alternating)")
        print(f"{'step':<46} {'raw ms':>8} {'qvm ms':>8} {'qvm/raw':>8} {'diff ms':>8}")
        row("add: command to guest serial shows the vCPU", ms["raw_add_guest"], ms["qvm_add_guest"])
        row("del: command to DEVICE_DELETED", ms["raw_del_deleted"], ms["qvm_del_deleted"])
        row(
            "del: command to DEVICE_DELETED / qvm's exit", ms["raw_del_deleted"], ms["qvm_del_exit"]
        )  # noqa: E501
        print(f"{'raw device_add reply':<46} {ms['raw_add_reply']:8.1f}")
        print(f"{'raw device_del reply':<46} {ms['raw_del_reply']:8.1f}")
        print(f"{'qvm cpu add exit (process start to exit)':<46} {'':8} {ms['qvm_add_exit']:8.1f}")
    print(
        "target: qvm adds no more than 100 ms over the raw path, for add and for del. With the\n"
        "agent, cpu del first has the guest offline the vCPU (guest-set-vcpus: a refusal is\n"
        "reported before QEMU is asked), then unplugs: two guest steps in turn where raw's\n"
        "device_del has the guest do both in one; the agent-less rows compare like with like."
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
