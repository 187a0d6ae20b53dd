"""Which accelerator this host can use, and why.

KVM is only worth choosing where it can run a standard guest. Some hosts expose a
``/dev/kvm`` that cannot: kvm_pvm (a paravirtual KVM for nested sandboxes) starts QEMU
and answers QMP, but a normal Linux guest dies with "KVM internal error ... emulation
failure" and ``-cpu host`` aborts. So "auto" looks past the device node.
"""

from __future__ import annotations

import os
from pathlib import Path

from qvm.base.record import Record
from qvm.errors import HostError


class KvmFacts(Record):
    device_exists: bool
    device_accessible: bool
    kvm_pvm_loaded: bool
    cpu_has_virt_flags: bool  # vmx (Intel) or svm (AMD) in /proc/cpuinfo


class AccelChoice(Record):
    accel: str  # "kvm" or "tcg"
    reason: str
    kvm_pvm: bool = False  # KVM here is kvm_pvm: "-cpu host" and "-cpu max" abort QEMU


def probe_kvm(root: Path = Path("/")) -> KvmFacts:
    device = root / "dev/kvm"
    return KvmFacts(
        device_exists=device.exists(),
        device_accessible=os.access(device, os.R_OK | os.W_OK),
        kvm_pvm_loaded=(root / "sys/module/kvm_pvm").exists(),
        cpu_has_virt_flags=_cpu_has_virt_flags(root / "proc/cpuinfo"),
    )


def _cpu_has_virt_flags(cpuinfo: Path) -> bool:
    try:
        text = cpuinfo.read_text()
    except OSError:
        return False
    for line in text.splitlines():
        if line.startswith("flags"):
            flags = set(line.partition(":")[2].split())
            return bool(flags & {"vmx", "svm"})
    return False


def kvm_unusable_reason(facts: KvmFacts) -> str | None:
    """Why KVM cannot run a standard guest here, or None when it can."""
    if not facts.device_exists:
        return "/dev/kvm does not exist"
    if not facts.device_accessible:
        return "/dev/kvm is not readable and writable by this user"
    if facts.kvm_pvm_loaded:
        return "/dev/kvm is kvm_pvm, which cannot run a standard guest"
    if not facts.cpu_has_virt_flags:
        return "the CPU has no vmx/svm flag"
    return None


def choose_accel(requested: str, facts: KvmFacts) -> AccelChoice:
    """Pick the accelerator for ``[machine] accel``; raise HostError if "kvm" cannot start."""
    unusable = kvm_unusable_reason(facts)
    if requested == "tcg":
        return AccelChoice("tcg", 'accel = "tcg" in the definition')
    if requested == "kvm":
        if facts.kvm_pvm_loaded and facts.device_accessible:
            # PVM-aware guests do run there; a standard one ends in a KVM internal error,
            # which the supervisor records. Asking for it by name is the user's call.
            return AccelChoice(
                "kvm",
                'accel = "kvm" in the definition (kvm_pvm: runs only PVM-aware guests)',
                kvm_pvm=True,
            )
        if unusable:
            raise HostError(
                f'KVM was asked for (accel = "kvm") but is unusable: {unusable} '
                '(hint: set accel = "auto" or "tcg")'
            )
        return AccelChoice("kvm", 'accel = "kvm" in the definition')
    if unusable:
        return AccelChoice("tcg", f"auto: {unusable}")
    return AccelChoice("kvm", "auto: /dev/kvm is usable")
