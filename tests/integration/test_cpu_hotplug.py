"""vCPU hotplug with the real QEMU and the real test guest: what the guest itself reports.

Under TCG, QEMU 7.2 crashes on a vCPU device_add after any vCPU unplug, so every
scenario adds before it removes (and one test checks that qvm refuses, or with --force
reports the crash truthfully).
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
from framework.harness import REPO, Qvm, one_line_error
from framework.wait import wait_until

from qvm.definition.topology import Topology, slot_props

GUEST_DEADLOCK = re.compile(r"soft lockup - CPU#\d+ stuck|rcu_preempt detected stalls")

pytestmark = pytest.mark.integration


def by_state(slots: list[dict]) -> dict[str, list[dict]]:
    result: dict[str, list[dict]] = {"present": [], "free": [], "unplug-pending": []}
    for slot in slots:
        result[slot["state"]].append(slot)
    return result


def test_seed_scenario_on_the_test_guest(qvm: Qvm) -> None:
    toml = qvm.guest_machine("vm1", count=1, max=4)
    original = toml.read_text()
    qvm("up", "vm1")
    serial = qvm.serial("vm1")
    assert serial.wait_ready()["ncpus"] == "1"

    slots = by_state(qvm.json("cpu", "list", "vm1"))
    assert len(slots["present"]) == 1 and len(slots["free"]) == 3
    boot = slots["present"][0]
    assert (boot["id"], boot["removable"], boot["cpu_index"]) == (None, False, 0)
    assert [s["props"]["core-id"] for s in slots["free"]] == [1, 2, 3]
    human = qvm("cpu", "list", "vm1").stdout
    assert human.splitlines()[-1] == "1 of 4 vCPUs present"

    # --wait-guest: the guest's ACPI _OST, then the guest running on the new vCPU
    added = qvm("cpu", "add", "vm1", "--wait-guest")
    first = added.stdout.splitlines()[0]
    reported = re.fullmatch(
        r"vm1: added cpu1 \(socket-id=0,core-id=1,thread-id=0\); the guest acknowledged it "
        r"\(ACPI _OST\) after (\d+) ms, online after (\d+) ms",
        first,
    )
    assert reported, first
    assert int(reported[1]) <= int(reported[2])
    # the guest's own word: it has the CPU online
    serial.wait_state(ncpus=2, cpus="0-1")

    more = qvm("cpu", "add", "vm1", "--count", "2", "--persist")
    assert "added cpu2" in more.stdout and "added cpu3" in more.stdout
    serial.wait_state(ncpus=4, cpus="0-3")
    # --persist: only cpu.count changed in the machine file
    assert toml.read_text() == original.replace("count = 1\n", "count = 4\n")
    # qvm's own write describes the running VM: not "changed since started"
    after = qvm("status", "vm1")
    assert after.stderr == "" and "changed since" not in after.stdout, after
    assert qvm.status("vm1")["definition_changed"] is False

    full = qvm("cpu", "add", "vm1", check=False)
    one_line_error(
        full,
        "qvm: vm1: no free vCPU slot: 4 of 4 present (maxcpus=4) "
        "(hint: raise cpu.max in machines/vm1.toml, then qvm restart vm1)",
    )

    # raw QMP pass-through on the same VM
    status = json.loads(qvm("qmp", "vm1", "query-status").stdout)
    assert status["status"] == "running" and status["running"] is True
    cpus_fast = json.loads(qvm("qmp", "vm1", "query-cpus-fast").stdout)
    assert len(cpus_fast) == 4
    error = qvm("qmp", "vm1", "device_del", "id=nope", check=False)
    one_line_error(error, "qvm: vm1: device_del: Device 'nope' not found")
    shell = qvm("qmp", "vm1", "--shell", input="query-status\n", timeout=20)
    assert '"status": "running"' in shell.stdout

    removed = qvm("cpu", "del", "vm1", "--timeout", "30")
    assert re.match(
        r"vm1: removed cpu3 \(socket-id=0,core-id=3,thread-id=0\) in \d+ ms", removed.stdout
    )
    serial.wait_state(ncpus=3, cpus="0-2")

    # after an unplug, TCG QEMU 7.2 would crash on the next add: refused, VM untouched
    refused = qvm("cpu", "add", "vm1", check=False)
    if qvm.status("vm1")["accel"] == "tcg":
        one_line_error(
            refused,
            "qvm: vm1: cpu add refused: a vCPU was unplugged earlier in this QEMU run, and "
            "under TCG QEMU 7.2 crashes (double free) on the next vCPU device_add "
            "(hint: qvm restart vm1 first, or pass --force to try anyway)",
        )
        assert qvm.status("vm1")["state"] == "running"

    steps = qvm("cpu", "set", "vm1", "1", "--persist", "--timeout", "30").stdout.splitlines()
    assert steps[0] == "vm1: 3 -> 1 vCPUs"
    assert steps[1].startswith("vm1: removed cpu2") and steps[2].startswith("vm1: removed cpu1")
    assert steps[3] == "vm1: 1 of 4 vCPUs present"
    serial.wait_state(ncpus=1, cpus="0")
    slots = by_state(qvm.json("cpu", "list", "vm1"))
    assert len(slots["present"]) == 1 and len(slots["free"]) == 3
    assert toml.read_text() == original


def guest_with_boot_vcpus(
    qvm: Qvm, name: str, count: int, max: int, machine_type: str = "q35", topology: str = ""
) -> Path:
    """The test guest booting with ``count`` vCPUs: cpu0 from -smp, the others -device.

    irqaffinity=0 keeps the serial console's interrupt on cpu0: with it on a vCPU that
    is then unplugged, the guest's console output stalled (measured: 3 of 4 boots under
    TCG) until the next input, although the guest had the right CPUs online.
    """
    return qvm.machine(
        name,
        f"""
[machine]
type = "{machine_type}"

[cpu]
count = {count}
max = {max}
{topology}

[memory]
size = "256M"

[boot]
kernel = "{{guest}}/vmlinuz"
initrd = "{{guest}}/initrd.img"
append = "console=ttyS0 quiet irqaffinity=0 no_timer_check"
""",
    )


@pytest.mark.parametrize(
    ("machine_type", "topology", "topo"),
    [
        ("q35", "", Topology(1, 1, 4, 1)),
        ("pc", "", Topology(1, 1, 4, 1)),
        ("q35", "sockets = 2\ncores = 2\nthreads = 1", Topology(2, 1, 2, 1)),
    ],
    ids=["q35", "pc", "q35-2-sockets"],
)
def test_boot_vcpus_sit_in_qemus_slots_and_unplug(
    qvm: Qvm, machine_type: str, topology: str, topo: Topology
) -> None:
    guest_with_boot_vcpus(qvm, "vm1", 3, 4, machine_type, topology)
    qvm("up", "vm1")
    # qvm's own topology arithmetic (qvm.definition.topology, used for -smp and -device) against
    # what this QEMU says the slots are
    hotpluggable = json.loads(qvm("qmp", "vm1", "query-hotpluggable-cpus").stdout)
    by_path = {h.get("qom-path"): h["props"] for h in hotpluggable}
    assert by_path["/machine/peripheral/cpu1"] == slot_props(1, topo)
    assert by_path["/machine/peripheral/cpu2"] == slot_props(2, topo)
    free = [h["props"] for h in hotpluggable if "qom-path" not in h]
    assert free == [slot_props(3, topo)]

    slots = qvm.json("cpu", "list", "vm1")
    assert [(s["index"], s["id"], s["state"], s["removable"]) for s in slots] == [
        (0, None, "present", False),
        (1, "cpu1", "present", True),
        (2, "cpu2", "present", True),
        (3, None, "free", False),
    ]
    assert [s["props"] for s in slots] == [slot_props(i, topo) for i in range(4)]

    serial = qvm.serial("vm1")
    serial.wait_ready()
    serial.wait_state(ncpus=3, cpus="0-2")
    # a generous timeout: on a loaded 2-core host a TCG guest can take seconds to offline
    # a vCPU (seen once in CI as a 5 s "pending", and once as a 26 s soft lockup of the
    # guest's CPU 2). Past it qvm says "pending" (exit 3), the request stands, and the
    # supervisor completes it when the guest lets go: that is what must then happen.
    done = qvm("cpu", "del", "vm1", "cpu1", "cpu2", "--timeout", "30", check=False)
    assert done.returncode in (0, 3), done.stderr
    try:
        serial.wait_state(timeout=90, ncpus=1, cpus="0")
    except AssertionError:
        # 3 MTTCG vCPUs on this 2-core host: in about 1 full run of 5 the guest kernel
        # deadlocks while it offlines them (soft lockups, RCU stalls, for good). That is
        # the guest's own report of its breakdown, not a verdict on qvm.
        if GUEST_DEADLOCK.search(serial.text()):
            pytest.xfail("the TCG guest kernel deadlocked offlining vCPUs (see its serial log)")
        raise

    def all_free() -> list[str] | None:
        states = [s["state"] for s in qvm.json("cpu", "list", "vm1")]
        return states if states == ["present", "free", "free", "free"] else None

    wait_until(all_free, 30, "both unplugs to complete, in QEMU's slot list too")


def test_count_equal_to_max_says_to_raise_max(qvm: Qvm) -> None:
    qvm.guest_machine("vm1", count=2, max=2)
    qvm("up", "vm1")
    one_line_error(
        qvm("cpu", "add", "vm1", check=False),
        "qvm: vm1: no free vCPU slot: 2 of 2 present (maxcpus=2); it was started with "
        "cpu.count = cpu.max = 2, which leaves no slot to hotplug into "
        "(hint: raise cpu.max in machines/vm1.toml, then qvm restart vm1)",
    )


def test_seed_machine_without_an_os(qvm: Qvm) -> None:
    # the seed's own machine (pc, IvyBridge-IBRS, 1 of max 2, no OS), with 256M instead
    # of 2G to spare this host's memory: nothing here touches the guest's memory
    seed = (REPO / "machines" / "seed-hotplug.toml").read_text()
    assert 'size = "2G"' in seed
    qvm.machine("seed", seed.replace('size = "2G"', 'size = "256M"'))
    qvm("up", "seed")

    added = qvm("cpu", "add", "seed")
    assert added.stdout.splitlines()[0] == "seed: added cpu1 (socket-id=0,core-id=1,thread-id=0)"
    cpus_fast = json.loads(qvm("qmp", "seed", "query-cpus-fast").stdout)
    assert len(cpus_fast) == 2
    assert {c["qom-path"] for c in cpus_fast} == {
        "/machine/unattached/device[0]",
        "/machine/peripheral/cpu1",
    }

    # no OS switched the chipset to ACPI CPU hotplug: QEMU refuses at once
    message = one_line_error(qvm("cpu", "del", "seed", "--timeout", "2", check=False))
    assert message.startswith(
        "qvm: seed: cpu1: QEMU refused the unplug at once (acpi: device unplug request for "
        "not supported device type: IvyBridge-IBRS-x86_64-cpu): no guest OS has enabled "
        "ACPI CPU hotplug"
    )
    assert "the VM is unchanged" in message
    assert qvm.status("seed")["state"] == "running"
    slots = qvm.json("cpu", "list", "seed")
    assert [s["state"] for s in slots] == ["present", "present"]
    assert not (qvm.run_dir("seed") / "pending.json").exists()
    # nothing was unplugged, so adding stays allowed (no TCG guard)
    assert not (qvm.run_dir("seed") / "cpu-unplugged.json").exists()


def test_wait_guest_on_a_machine_without_an_os_says_the_vcpu_was_not_started(qvm: Qvm) -> None:
    seed = (REPO / "machines" / "seed-hotplug.toml").read_text()
    qvm.machine("seed", seed.replace('size = "2G"', 'size = "256M"'))
    qvm("up", "seed")

    added = qvm("cpu", "add", "seed", "--wait-guest", "--timeout", "2", check=False)
    one_line_error(
        added,
        "qvm: seed: cpu1 was added but not started by the guest within 2 s; the guest did "
        "not acknowledge it either (no guest OS, or its ACPI CPU hotplug is not active)",
    )
    assert added.returncode == 1
    assert added.stdout.splitlines() == [
        "seed: added cpu1 (socket-id=0,core-id=1,thread-id=0)",
        "seed: 2 of 2 vCPUs present",
    ]
    # the new vCPU is still at its reset state: paging off, nothing started it
    registers = json.loads(
        qvm("qmp", "seed", "human-monitor-command", "command-line=info registers 1").stdout
    )
    assert "CR0=60000010 " in registers
    assert qvm.status("seed")["state"] == "running"
    assert [s["state"] for s in qvm.json("cpu", "list", "seed")] == ["present", "present"]


def test_unplug_pending_while_paused_then_completes_by_itself(qvm: Qvm) -> None:
    qvm.guest_machine("vm1", count=1, max=2)
    qvm("up", "vm1")
    serial = qvm.serial("vm1")
    serial.wait_ready()
    # set --wait-guest waits for the added vCPU as cpu add does
    steps = qvm("cpu", "set", "vm1", "2", "--wait-guest", "--timeout", "10").stdout.splitlines()
    assert steps[0] == "vm1: 1 -> 2 vCPUs"
    assert re.fullmatch(r"vm1: added cpu1 \(.*\); .*, online after \d+ ms", steps[1]), steps
    serial.wait_state(ncpus=2)

    # a paused guest cannot answer the eject request
    qvm("qmp", "vm1", "stop")
    pending = qvm("cpu", "del", "vm1", "--timeout", "1", "--persist", check=False)
    assert pending.returncode == 3
    assert "Traceback" not in pending.stderr
    persist_note, message = pending.stderr.strip().splitlines()
    assert persist_note == "qvm: vm1: --persist: not written, the live change did not complete"
    assert message.startswith(
        "qvm: vm1: unplug of cpu1 pending: the guest has not released it within 1 s. "
        "The request stands: the vCPU stays in the VM, 'qvm cpu list vm1' shows it as "
        "unplug-pending"
    )
    assert pending.stdout.splitlines()[-1] == "vm1: 2 of 2 vCPUs present, 1 unplug pending"
    slots = qvm.json("cpu", "list", "vm1")
    assert [s["state"] for s in slots] == ["present", "unplug-pending"]
    assert qvm("cpu", "list", "vm1").stdout.splitlines()[-1] == (
        "2 of 2 vCPUs present, 1 unplug pending"
    )

    # the guest runs again, releases the vCPU; the supervisor hears DEVICE_DELETED
    qvm("qmp", "vm1", "cont")
    wait_until(
        lambda: [s["state"] for s in qvm.json("cpu", "list", "vm1")] == ["present", "free"],
        10,
        "the pending unplug to complete",
    )
    assert json.loads((qvm.run_dir("vm1") / "pending.json").read_text()) == {}
    serial.wait_state(ncpus=1)


def test_add_after_unplug_is_refused_and_forcing_it_crashes_truthfully(qvm: Qvm) -> None:
    guest_with_boot_vcpus(qvm, "vm1", 2, 2)
    qvm("up", "vm1")
    if qvm.status("vm1")["accel"] != "tcg":
        pytest.skip("the crash is TCG's")
    serial = qvm.serial("vm1")
    serial.wait_ready()
    serial.wait_state(ncpus=2)
    qvm("cpu", "del", "vm1", "--timeout", "30")
    serial.wait_state(ncpus=1)

    refused = one_line_error(qvm("cpu", "add", "vm1", check=False))
    assert refused.startswith("qvm: vm1: cpu add refused: a vCPU was unplugged earlier")
    assert qvm.status("vm1")["state"] == "running"

    forced = qvm("cpu", "add", "vm1", "--force", check=False)
    message = one_line_error(forced)
    assert re.fullmatch(
        r"qvm: vm1: QEMU went away during device_add: QEMU crashed "
        r"\(killed by SIG(ABRT|SEGV)\) \(hint: .*\)",
        message,
    ), message
    status = qvm.status("vm1")
    assert status["state"] == "crashed"
    assert status["last_exit"]["signal"] in ("SIGABRT", "SIGSEGV")
    assert status["reason"] == f"killed by {status['last_exit']['signal']}"
    assert not qvm.processes()


def test_cpu_commands_on_a_vm_that_is_not_running(qvm: Qvm) -> None:
    qvm.guest_machine("vm1")
    for args in (("cpu", "list", "vm1"), ("cpu", "add", "vm1"), ("qmp", "vm1", "query-status")):
        one_line_error(
            qvm(*args, check=False), "qvm: vm1: not running (hint: start it with 'qvm up vm1')"
        )
