from __future__ import annotations

from pathlib import Path

import pytest

from qvm.errors import HostError
from qvm.host.accel import AccelChoice, KvmFacts, choose_accel, probe_kvm
from qvm.host.qemu import parse_cpu_help, parse_machine_help

USABLE = KvmFacts(True, True, False, True)
PVM = KvmFacts(True, True, True, False)


def test_auto_picks_kvm_only_where_it_can_run_a_guest() -> None:
    assert choose_accel("auto", USABLE).accel == "kvm"
    pvm = choose_accel("auto", PVM)
    assert (pvm.accel, pvm.reason) == (
        "tcg",
        "auto: /dev/kvm is kvm_pvm, which cannot run a standard guest",
    )
    assert choose_accel("auto", KvmFacts(False, False, False, True)).reason == (
        "auto: /dev/kvm does not exist"
    )
    assert choose_accel("auto", KvmFacts(True, False, False, True)).accel == "tcg"
    assert choose_accel("auto", KvmFacts(True, True, False, False)).accel == "tcg"


def test_explicit_kvm_on_an_unusable_host_is_an_error() -> None:
    with pytest.raises(HostError, match=r"KVM was asked for .* does not exist.*hint: set accel"):
        choose_accel("kvm", KvmFacts(False, False, False, True))
    with pytest.raises(HostError, match=r"KVM was asked for .* not readable and writable"):
        choose_accel("kvm", KvmFacts(True, False, True, True))
    assert choose_accel("tcg", USABLE).accel == "tcg"


def test_explicit_kvm_on_kvm_pvm_is_the_users_call() -> None:
    """kvm_pvm runs PVM-aware guests: asked for by name, KVM is used, and the reason says so."""
    assert choose_accel("kvm", PVM) == AccelChoice(
        "kvm", 'accel = "kvm" in the definition (kvm_pvm: runs only PVM-aware guests)', True
    )
    assert choose_accel("auto", PVM).accel == "tcg"


def test_probe_reads_the_files(tmp_path: Path) -> None:
    (tmp_path / "dev").mkdir()
    (tmp_path / "dev/kvm").write_text("")
    (tmp_path / "sys/module/kvm_pvm").mkdir(parents=True)
    (tmp_path / "proc").mkdir()
    (tmp_path / "proc/cpuinfo").write_text("processor: 0\nflags : fpu sse2 svm\n")
    facts = probe_kvm(tmp_path)
    assert facts == KvmFacts(True, True, True, True)


def test_this_host_is_known() -> None:
    """On this project's machines /dev/kvm is kvm_pvm: auto must choose TCG here."""
    facts = probe_kvm()
    choice = choose_accel("auto", facts)
    if Path("/sys/module/kvm_pvm").exists():
        assert choice.accel == "tcg"


def test_parse_help_outputs() -> None:
    cpu_help = (
        "Available CPUs:\n"
        "x86 486                   (alias configured by machine type)\n"
        "x86 IvyBridge-IBRS        (alias of IvyBridge-v2)\n"
        "x86 max                   Enables all features supported by the accelerator\n"
        "\n"
        "Recognized CPUID flags:\n"
        "  3dnow 3dnowext\n"
    )
    assert parse_cpu_help(cpu_help) == ("486", "IvyBridge-IBRS", "max")
    machine_help = (
        "Supported machines are:\n"
        "microvm              microvm (i386)\n"
        "pc                   Standard PC (i440FX + PIIX, 1996) (alias of pc-i440fx-7.2)\n"
        "q35                  Standard PC (Q35 + ICH9, 2009) (alias of pc-q35-7.2)\n"
    )
    assert parse_machine_help(machine_help) == ("microvm", "pc", "q35")
