"""The guest's own word through its agent, in the real test guest: vCPUs and memory blocks
the guest leaves offline are onlined by qvm (and the guest's sysfs says so), `cpu del`
offlines in the guest first, `status` tells the agent's state and the guest's facts,
`down` falls back on guest-shutdown when the guest ignores the power button.

The test guest's kernel command line switches (scripts/build-test-guest):
``qvm.noautoonline`` makes it a guest without udev rules (nothing onlines hotplugged CPUs
or memory), ``qvm.nopowerbutton`` one that ignores the ACPI power button.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import time

import pytest
from framework.harness import GUEST_DIR, QVM_BIN, Qvm, one_line_error
from framework.wait import wait_until

pytestmark = pytest.mark.integration

NO_AUTO_ONLINE = "qvm.noautoonline"
NO_POWER_BUTTON = "qvm.nopowerbutton"


def guest_with(qvm: Qvm, name: str, switches: str = "", extra: str = "", memory: str = "") -> None:
    path = qvm.guest_machine(name, count=1, max=3, extra=extra)
    text = path.read_text()
    appended = re.sub(r'(?m)^(append = ".*)"$', rf'\1 {switches}"', text, count=1)
    assert switches == "" or appended != text, "no append line for the switches"
    text = appended
    if memory:
        text = text.replace('size = "256M"', f'size = "256M"\n{memory}')
    path.write_text(text)


def guest_shell(qvm: Qvm, name: str, command: str) -> None:
    """Type ``command`` on the guest's serial console (its shell), then detach."""
    console = subprocess.Popen(
        [str(QVM_BIN), "console", name],
        env=qvm.env(),
        stdin=subprocess.PIPE,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    assert console.stdin is not None
    console.stdin.write(command.encode() + b"\n")
    console.stdin.flush()
    time.sleep(0.5)
    console.stdin.write(b"\x1d")  # Ctrl-]: detach
    console.stdin.close()
    console.wait(timeout=10)


def guest_says(qvm: Qvm, name: str, tag: str, shell_expr: str, timeout: float = 20) -> str:
    """What ``shell_expr`` prints in the guest, read back from its serial console. The
    console's echo of the typed command reads ``TAG""=``: only the output matches."""
    guest_shell(qvm, name, f'echo {tag}""=$({shell_expr}) {tag}""-END')
    match = qvm.serial(name).wait_for(rf"{tag}=(.*?) {tag}-END", timeout)
    return match.group(1).strip()


def up_with_agent(qvm: Qvm, name: str) -> None:
    qvm("up", name)
    qvm("wait", name, "--for", "agent", "--timeout", "120")
    qvm.serial(name).wait_ready()


def test_a_vcpu_and_memory_the_guest_leaves_offline_are_onlined_by_qvm(qvm: Qvm) -> None:
    guest_with(qvm, "vm1", NO_AUTO_ONLINE, memory='max = "1G"\nslots = 2')
    up_with_agent(qvm, "vm1")
    serial = qvm.serial("vm1")

    added = qvm.json("cpu", "add", "vm1", "--wait-guest", "--timeout", "30")
    (cpu,) = added["added"]
    assert added["source"] == "agent"
    assert (cpu["id"], cpu["online"], cpu["onlined_by_qvm"]) == ("cpu1", True, True)
    guest_cpu = cpu["guest_cpu"]
    assert guest_cpu == 1
    # the guest's own sysfs, read on its console
    sysfs = f"/sys/devices/system/cpu/cpu{guest_cpu}/online"
    assert guest_says(qvm, "vm1", "QVM-CPU1", f"cat {sysfs}") == "1"
    serial.wait_state(ncpus=2, cpus="0-1")

    def guest_column(*args: str) -> list[tuple[str | None, int | None, bool | None, str]]:
        slots = qvm.json("cpu", "list", "vm1", *args)
        return [
            (s["id"], s["guest_cpu"], s["guest_online"], s["guest_source"])
            for s in slots
            if s["present"]
        ]

    both_online = [(None, 0, True, "agent"), ("cpu1", 1, True, "agent")]
    assert guest_column("--live") == both_online
    # the supervisor's record catches up by itself: it asks the agent after a vCPU came
    wait_until(lambda: guest_column() == both_online, 10, "the record of the guest's word")
    listed = qvm("cpu", "list", "vm1").stdout
    assert "cpu1 online" in listed and "guest agent" in listed

    # --no-online: qvm leaves it as the guest left it, and says so
    done = qvm("cpu", "add", "vm1", "--wait-guest", "--no-online", "--timeout", "6", check=False)
    line = one_line_error(done)
    assert "cpu2" in line and "left it offline" in line and "--no-online" in line
    assert guest_says(qvm, "vm1", "QVM-CPU2", "cat /sys/devices/system/cpu/cpu2/online") == "0"
    states = {s["id"]: s["guest_online"] for s in qvm.json("cpu", "list", "vm1", "--live")}
    assert states["cpu2"] is False

    # memory: a size the guest cannot use whole is refused, naming the block size
    refused = qvm("mem", "add", "vm1", "100M", check=False)
    line = one_line_error(refused)
    assert "blocks of 128 MiB" in line and "qvm mem add vm1 128M" in line
    assert qvm.json("mem", "list", "vm1")["devices"] == []
    before = int(serial.latest_state()["mem_kb"])
    memory = qvm.json("mem", "add", "vm1", "128M")
    guest = memory["guest"]
    assert memory["source"] == "agent" and memory["complete"] is True
    assert guest["block_size"] == 128 * 1024**2
    assert len(guest["blocks"]) == 1 and guest["onlined_by_qvm"] == guest["blocks"]
    block = guest["blocks"][0]
    sysfs = f"/sys/devices/system/memory/memory{block}/state"
    assert guest_says(qvm, "vm1", "QVM-MEM", f"cat {sysfs}") == "online"
    serial.wait_state(mem_kb=before + 131072)

    # cpu del: the guest offlines the vCPU first (through the agent), then QEMU unplugs it
    removed = qvm.json("cpu", "del", "vm1", "cpu1", "--timeout", "30")
    (unplug,) = removed["unplugs"]
    assert removed["source"] == "agent"
    assert (unplug["outcome"], unplug["guest_cpu"]) == ("removed", 1)
    assert unplug["guest_offlined"] is True
    serial.wait_state(ncpus=1, cpus="0")
    # cpu2, which the guest has offline, goes without anything to offline
    removed = qvm.json("cpu", "del", "vm1", "cpu2", "--timeout", "30")
    assert removed["unplugs"][0]["outcome"] == "removed"
    assert removed["unplugs"][0]["guest_offlined"] is False


def test_status_tells_the_agent_and_the_guests_facts(qvm: Qvm) -> None:
    guest_with(qvm, "vm1", extra="\n[[nic]]\n")
    up_with_agent(qvm, "vm1")
    guest_shell(qvm, "vm1", "ip link set eth0 up; ip addr add 10.0.2.15/24 dev eth0")
    guest_ipv4 = guest_says(qvm, "vm1", "QVM-IP", "ip -o -4 addr show dev eth0 | awk '{print $4}'")
    assert guest_ipv4 == "10.0.2.15/24"

    status = qvm.json("status", "vm1", "--live")  # the address is a second old
    assert status["agent"] == {"state": "answering", "detail": None, "age": None}
    # the supervisor's record says the same, with its age (it asks every 30 s)
    wait_until(lambda: qvm.status("vm1")["agent"]["state"] == "answering", 10, "the record")
    facts = status["guest"]
    kernel = json.loads((GUEST_DIR / "guest.json").read_text())["kernel_version"]
    assert facts["os"]["kernel_release"] == kernel
    assert facts["os"]["pretty_name"] == "qvm test guest (busybox)"
    assert facts["hostname"] == guest_says(qvm, "vm1", "QVM-HOST", "hostname")
    by_name = {i["name"]: i for i in facts["interfaces"]}
    ipv4 = [
        f"{a['address']}/{a['prefix']}"
        for a in by_name["eth0"]["addresses"]
        if a["family"] == "ipv4"
    ]
    assert ipv4 == [guest_ipv4]
    assert re.search(r"^  agent +answering, as of \S+ ago$", qvm("status", "vm1").stdout, re.M)
    text = qvm("status", "vm1", "--live").stdout
    assert re.search(r"^  agent +answering$", text, re.M)
    assert re.search(rf"^  guest os +qvm test guest \(busybox\), kernel {kernel}$", text, re.M)
    assert re.search(r"^  address +eth0 10\.0\.2\.15/24", text, re.M)

    # an agent stopped inside the guest: status says so, and stays quick
    stop = "kill -STOP $(pidof qemu-ga) && echo stopped"
    assert guest_says(qvm, "vm1", "QVM-GA", stop) == "stopped"
    started = time.monotonic()
    status = qvm.json("status", "vm1", "--live")  # the record keeps its last answer a while
    elapsed = time.monotonic() - started
    guest_shell(qvm, "vm1", "kill -CONT $(pidof qemu-ga)")
    assert status["agent"]["state"] == "not answering"
    assert "not answering" in status["agent"]["detail"]
    assert status["guest"] is None
    assert elapsed < 3


def test_status_without_an_agent_says_not_configured(qvm: Qvm) -> None:
    guest_with(qvm, "vm1", extra="\n[agent]\nenabled = false\n")
    qvm("up", "vm1")
    # CPU% right after up, asked again and again: a rate over a real interval (issue 12)
    for _ in range(5):
        percent = qvm.status("vm1")["cpu_percent"]
        assert 0 <= percent <= 100 * (os.cpu_count() or 1)
    status = qvm.status("vm1")
    assert status["agent"]["state"] == "not configured"
    assert status["guest"] is None
    assert re.search(r"^  agent +not configured$", qvm("status", "vm1").stdout, re.M)


def test_down_uses_the_agent_when_the_guest_ignores_the_power_button(qvm: Qvm) -> None:
    guest_with(qvm, "vm1", NO_POWER_BUTTON)
    up_with_agent(qvm, "vm1")
    (down,) = qvm.json("down", "vm1", "--timeout", "3")
    assert down["ended_by"] == "agent"
    assert "guest-shutdown" in down["message"]
    qvm.serial("vm1").wait_for(r"QVM-GUEST-SHUTDOWN agent poweroff", 5)
    assert not qvm.serial("vm1").guest().powered_off  # not by the power button
    assert qvm.status("vm1")["last_exit"]["ended_by"] == "agent"


def test_down_without_an_agent_still_quits_a_guest_that_ignores_the_button(qvm: Qvm) -> None:
    guest_with(qvm, "vm1", NO_POWER_BUTTON, extra="\n[agent]\nenabled = false\n")
    qvm("up", "vm1")
    qvm.serial("vm1").wait_ready()
    (down,) = qvm.json("down", "vm1", "--timeout", "2")
    assert down["ended_by"] == "quit"
