"""One JSON contract (issue 12), on a real VM: the test guest is booted once, and every
command that prints JSON about a running VM is run and its output checked against its
schema in schemas/ (the files users read). The facts are the guest's own where it says
them: the host ports `up` reports are the ones that answer, the memory the guest reports
is in bytes. Also here, on the same VM: a piped `qvm console` returns at the end of its
input once the guest has run it.
"""

from __future__ import annotations

import json
import socket
import subprocess
from collections.abc import Iterator
from typing import Any

import pytest
from framework.harness import GUEST_DIR, QVM_BIN, Qvm, owned_qvm
from framework.jsonschema_lite import validate

pytestmark = pytest.mark.integration

NAME = "js1"


@pytest.fixture(scope="module")
def vm() -> Iterator[Qvm]:
    """One running test guest for the whole module; stopped and checked gone at the end."""
    if not (GUEST_DIR / "vmlinuz").exists():
        pytest.fail(f"no test guest in {GUEST_DIR} (run scripts/build-test-guest)")
    with owned_qvm() as qvm:
        qvm.machine(
            NAME,
            """
[cpu]
count = 1
max = 2

[memory]
size = "256M"
max = "1G"
slots = 2

[boot]
kernel = "{guest}/vmlinuz"
initrd = "{guest}/initrd.img"
append = "console=ttyS0 quiet irqaffinity=0 no_timer_check"

[[nic]]
forwards = ["tcp:0:7777"]
""",
        )
        yield qvm


def checked(qvm: Qvm, schema: str, *args: str) -> Any:
    """``qvm ARGS --json``: exit 0, and stdout one JSON document that matches ``schema``."""
    done = qvm(*args, "--json", timeout=180)
    data = json.loads(done.stdout)
    validate(data, schema)
    return data


def test_up_reports_the_host_ports_it_picked(vm: Qvm) -> None:
    up = checked(vm, "up.json", "up", NAME)
    assert up[0]["name"] == NAME and up[0]["qmp_ready"] is True
    (forward,) = up[0]["forwards"]
    assert forward["guest_port"] == 7777 and forward["host_port"] > 0
    # QEMU's slirp listens on the port `up` reported
    with socket.create_connection((forward["host_addr"], forward["host_port"]), timeout=10):
        pass
    vm.serial(NAME).wait_ready()
    again = checked(vm, "up.json", "up", NAME)
    assert again[0]["already_running"] is True and again[0]["forwards"] == [forward]


def test_status_list_and_the_read_only_commands(vm: Qvm) -> None:
    status = checked(vm, "status.json", "status", NAME)
    assert status["state"] == "running"
    assert {k: status["vcpus"][k] for k in ("present", "max", "boot")} == {
        "present": 1,
        "max": 2,
        "boot": 1,
    }
    listed = checked(vm, "list.json", "list")
    assert [r["name"] for r in listed] == [NAME]
    checked(vm, "cmdline.json", "cmdline", NAME)
    checked(vm, "wait.json", "wait", NAME, "--for", "qmp")
    checked(vm, "qmp.json", "qmp", NAME, "query-status")
    checked(vm, "port-list.json", "port", "list", NAME)
    checked(vm, "disk-list.json", "disk", "list", NAME)
    checked(vm, "nic-list.json", "nic", "list", NAME)
    checked(vm, "cpu-list.json", "cpu", "list", NAME)
    vm.serial(NAME).wait_for(r"QVM-STATE .*mem_kb=\d+", 60)
    memory = checked(vm, "mem-list.json", "mem", "list", NAME)
    guest_kb = int(vm.serial(NAME).guest().latest_state["mem_kb"])  # type: ignore[index]
    assert memory["guest_mem_bytes"] == guest_kb * 1024
    vm("wait", NAME, "--for", "agent", "--timeout", "120", timeout=180)
    checked(vm, "agent.json", "agent", NAME)


def test_share_add_is_refused_on_a_vm_without_shared_memory(vm: Qvm) -> None:
    listed = checked(vm, "share-list.json", "share", "list", NAME)
    assert listed == {"name": NAME, "shares": [], "shared_memory": False}
    done = vm("share", "add", NAME, str(vm.root), "/mnt/x", "--json", check=False)
    assert done.returncode == 1
    error = json.loads(done.stdout)
    validate(error, "error.json")
    assert "booted without shared memory" in error["error"]
    assert "memory.shared = true" in error["error"]


def test_hotplug_commands(vm: Qvm) -> None:
    # devices first: under TCG, a device_add after a vCPU unplug is refused (QEMU 7.2)
    added = checked(vm, "mem-add.json", "mem", "add", NAME, "128M")
    checked(vm, "mem-del.json", "mem", "del", NAME, added["device"]["id"], "--timeout", "30")
    disk = checked(vm, "disk-attach.json", "disk", "attach", NAME, "--new", "16M")
    assert disk["disk"]["size"] == 16 * 1024**2
    checked(vm, "disk-detach.json", "disk", "detach", NAME, disk["disk"]["id"], "--timeout", "30")
    nic = checked(vm, "nic-add.json", "nic", "add", NAME, "--forward", "tcp:0:8080")
    checked(vm, "nic-del.json", "nic", "del", NAME, nic["nic"]["id"], "--timeout", "30")
    port = checked(vm, "port-add.json", "port", "add", NAME, "tcp:0:2222")
    checked(vm, "port-del.json", "port", "del", NAME, str(port["host_port"]))
    checked(vm, "cpu-add.json", "cpu", "add", NAME)
    checked(vm, "cpu-del.json", "cpu", "del", NAME, "--timeout", "30")
    checked(vm, "cpu-set.json", "cpu", "set", NAME, "1")


def test_a_piped_console_returns_once_the_guest_ran_its_input(vm: Qvm) -> None:
    done = subprocess.run(
        [str(QVM_BIN), "console", NAME],
        input=b"echo qvm-piped-$((6*7))\n",
        capture_output=True,
        env=vm.env(),
        timeout=60,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    # the guest ran it: its answer is in its own serial output, and qvm printed it too
    vm.serial(NAME).wait_for(r"^qvm-piped-42\r?$", 10)
    assert b"qvm-piped-42" in done.stdout


def test_errors_restart_down_and_status_agree(vm: Qvm) -> None:
    error = vm("cpu", "del", NAME, "nosuch", "--json", check=False)
    assert error.returncode != 0
    validate(json.loads(error.stdout), "error.json")
    restarted = checked(vm, "restart.json", "restart", NAME, "--force")
    assert restarted["stopped"]["ended_by"] == "quit"
    vm.serial(NAME).wait_ready()
    down = checked(vm, "down.json", "down", NAME, "--timeout", "60")
    status = checked(vm, "status.json", "status", NAME)
    assert down[0]["ended_by"] == status["last_exit"]["ended_by"] == "acpi"
    assert status["vcpus"]["boot"] == 1
    checked(vm, "up.json", "up", NAME)
    killed = checked(vm, "kill.json", "kill", NAME)
    assert (
        killed[0]["ended_by"]
        == checked(vm, "status.json", "status", NAME)["last_exit"]["ended_by"]
        == "kill"
    )
    checked(vm, "reset.json", "reset", NAME)
    checked(vm, "rm.json", "rm", NAME)
