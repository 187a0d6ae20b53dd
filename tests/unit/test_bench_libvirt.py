"""The pure parts of scripts/bench_libvirt.py and scripts/bench_scale.py: the libvirt domain
that stands for qvm's test guest, the table of qvm against libvirt and its verdicts, the
growth table's missing figures, and the process-ended test the stop timings rest on. The
benchmarks themselves boot fleets of VMs and are never run by the suite."""

from __future__ import annotations

import os
import subprocess
import sys
import time
import xml.etree.ElementTree as ElementTree
from pathlib import Path

import pytest

SCRIPTS = Path(__file__).resolve().parents[2] / "scripts"
sys.path.insert(0, str(SCRIPTS))

import bench_libvirt  # noqa: E402
import bench_scale  # noqa: E402


def test_the_domain_is_the_test_guest_of_the_qvm_fleet() -> None:
    guest = Path("/guests/test guest")
    serial = Path("/tmp/run & co/lv00.log")
    domain = ElementTree.fromstring(bench_libvirt.domain_xml("lv00", guest, serial))
    assert domain.get("type") == "qemu"  # TCG, as qvm's accel = "auto" is on this host
    assert domain.findtext("name") == "lv00"
    memory = domain.find("memory")
    assert memory is not None and (memory.get("unit"), memory.text) == ("MiB", "128")
    vcpu = domain.find("vcpu")
    assert vcpu is not None and (vcpu.get("current"), vcpu.text) == ("1", "4")
    assert domain.find("os/type").get("machine") == "q35"  # type: ignore[union-attr]
    assert domain.findtext("os/kernel") == str(guest / "vmlinuz")
    assert domain.findtext("os/initrd") == str(guest / "initrd.img")
    # the fleet's machine file boots the same kernel line
    assert domain.findtext("os/cmdline") == bench_scale.APPEND
    assert 'append = "{append}"' in bench_scale.GUEST
    assert domain.find("features/acpi") is not None  # the power button `virsh shutdown` presses
    assert domain.findtext("on_poweroff") == "destroy"
    source = domain.find("devices/serial[@type='file']/source")
    assert source is not None and source.get("path") == str(serial)
    agent = domain.find("devices/channel/target")
    assert agent is not None and agent.get("name") == "org.qemu.guest_agent.0"
    assert domain.find("devices/disk") is None


def figures(qvm_ms: float, libvirt_ms: float) -> bench_libvirt.Figures:
    made: bench_libvirt.Figures = {}
    for count in (1, 16):
        for what in ("status", "cpu list", "list", "stop all", *bench_libvirt.FLOORS):
            made["qvm", what, count] = qvm_ms * (2 if count == 16 else 1)
            made["libvirt", what, count] = libvirt_ms
        made["qvm", "PSS", count] = 5.0 * count
        made["libvirt", "PSS", count] = 27.0
    return made


def rows_of(table: str) -> list[list[str]]:
    return [[cell.strip() for cell in line.strip("|").split("|")] for line in table.splitlines()]


def test_the_table_gives_each_ratio_and_the_issue_s_verdict() -> None:
    rows = rows_of(bench_libvirt.ratio_table(figures(40.0, 20.0), [1, 16]))
    assert rows[0] == ["what", "VMs", "qvm", "libvirt", "qvm / libvirt", "target"]
    status_1 = next(r for r in rows if r[0].startswith("`qvm status`") and r[1] == "1")
    assert status_1[2:] == ["40.0 ms", "20.0 ms", "x2.00", "<= x1.0: **not met**"]
    list_16 = next(r for r in rows if r[0].startswith("`qvm list` /") and r[1] == "16")
    assert list_16[4:] == ["x4.00", "<= x1.3: **not met**"]
    growth = next(r for r in rows if "qvm against itself" in r[0])
    assert growth[2:] == ["80.0 ms", "40.0 ms", "x2.00", "<= x1.5: **not met**"]
    stop_16 = next(r for r in rows if r[0].startswith("stop all") and r[1] == "16")
    assert stop_16[2:4] == ["0.08 s", "0.02 s"]
    pss_16 = next(r for r in rows if r[0] == "PSS per VM" and r[1] == "16")
    assert pss_16[2:] == ["5.0 MiB", "1.7 MiB", "x2.96", "<= 6 MiB: **met**"]
    floors = [r for r in rows if r[0].startswith("`python -I -S -c pass`")]
    assert len(floors) == 4  # two Pythons, two counts

    rows = rows_of(bench_libvirt.ratio_table(figures(10.0, 20.0), [1, 16]))
    status_1 = next(r for r in rows if r[0].startswith("`qvm status`") and r[1] == "1")
    assert status_1[4:] == ["x0.50", "<= x1.0: **met**"]


def test_a_figure_not_measured_is_a_dash_not_a_verdict() -> None:
    made = figures(40.0, 20.0)
    del made["libvirt", "status", 1]
    made["qvm", "cpu list", 1] = float("nan")
    rows = rows_of(bench_libvirt.ratio_table(made, [1, 16]))
    status_1 = next(r for r in rows if r[0].startswith("`qvm status`") and r[1] == "1")
    assert status_1[3:] == ["-", "-", "<= x1.0: not measured"]
    cpu_1 = next(r for r in rows if r[0].startswith("`qvm cpu list`") and r[1] == "1")
    assert cpu_1[2] == "-" and cpu_1[5] == "<= x1.0: not measured"


def test_the_growth_table_says_why_a_count_is_missing() -> None:
    rows = [{"vms": 32.0, "all ready": float("nan"), "list": 90.0}]
    note = "32 VMs: not every guest printed QVM-GUEST-READY within 600 s"
    text = bench_scale.table(rows, {"python": 7.0}, [note])
    assert "| 32 | - | 90.0 ms |" in text
    assert text.splitlines()[-1] == note


PANIC = """[    0.052000]  secondary_startup_64_no_verify+0xe4/0xeb
[    0.052000] ---[ end Kernel panic - not syncing: IO-APIC + timer doesn't work!  Boot with \
apic=debug and send a report.  Then try booting with the 'noapic' option. ]---
"""


def test_a_guest_that_panicked_at_boot_ends_the_wait_with_the_reason(tmp_path: Path) -> None:
    (tmp_path / "s00").write_text("...\nQVM-GUEST-READY\n")
    (tmp_path / "s01").write_text(PANIC)
    assert bench_scale.panic_of(tmp_path / "s00") is None
    panic = bench_scale.panic_of(tmp_path / "s01")
    assert panic is not None and panic.startswith("IO-APIC + timer doesn't work!")
    with pytest.raises(bench_scale.GuestPanicked, match=r"1 of 2 guests.*s01: IO-APIC"):
        bench_scale.wait_serial(["s00", "s01"], lambda name: tmp_path / name)
    assert bench_scale.wait_serial(["s00"], lambda name: tmp_path / name) < 1


def test_a_process_has_ended_once_it_is_a_zombie() -> None:
    child = subprocess.Popen(["true"])
    deadline = time.monotonic() + 10
    while not bench_scale.exited(child.pid) and time.monotonic() < deadline:
        time.sleep(0.01)
    assert bench_scale.exited(child.pid)  # ended, not yet reaped
    child.wait()
    assert bench_scale.exited(child.pid)
    assert not bench_scale.exited(os.getpid())
