"""What a valid definition still needs from this host, checked at ``up`` (not at load):
the kernel, initrd and images exist, and this QEMU knows the CPU model and machine type.
The caller passes in what QEMU supports, so this stays free of any host probing."""

from __future__ import annotations

from collections.abc import Collection
from pathlib import Path

from qvm.definition.reader import did_you_mean, render
from qvm.definition.schema import Machine
from qvm.errors import Problem


def check_host(
    machine: Machine, cpu_models: Collection[str], machine_types: Collection[str]
) -> list[Problem]:
    """What stops ``machine`` from starting on this host, given what its QEMU supports.

    ``cpu_models`` and ``machine_types`` are what ``-cpu help`` and ``-machine help`` list
    (aliases such as q35 and pc included). Looks at the file system for the kernel,
    initrd and disk images, and nothing else.
    """
    file = str(machine.path)
    binary = machine.qemu.binary
    problems = []
    if machine.type not in machine_types:
        hint = f"'{binary} -machine help' lists them"
        problems.append(
            Problem(file, "machine.type", f"unknown to {binary}", render(machine.type), hint)
        )
    model = machine.cpu.model
    if model is not None and model not in cpu_models:
        hint = f"'{binary} -cpu help' lists them"
        close = did_you_mean(model, cpu_models)
        problems.append(
            Problem(
                file,
                "cpu.model",
                f"unknown to {binary}",
                render(model),
                f"{close} {hint}" if close else hint,
            )
        )
    for key, path in _files_needed(machine):
        problem = _file_problem(path)
        if problem is not None:
            problems.append(Problem(file, key, problem, render(str(path)), _file_hint(path)))
    return problems


def _files_needed(machine: Machine) -> list[tuple[str, Path]]:
    needed = [("boot.kernel", machine.boot.kernel), ("boot.initrd", machine.boot.initrd)]
    for index, disk in enumerate(machine.disks):
        needed.append((f"disk[{index}].file", disk.file))
        if disk.url is None:  # a URL's image is downloaded at start
            needed.append((f"disk[{index}].base", disk.base))
    cloud_init = machine.cloud_init
    if cloud_init is not None:
        needed.append(("cloud_init.user_data", cloud_init.user_data))
        for index, key in enumerate(cloud_init.ssh_authorized_keys or ()):
            if isinstance(key, Path):
                needed.append((f"cloud_init.ssh_authorized_keys[{index}]", key))
    return [(key, path) for key, path in needed if path is not None]


def _file_problem(path: Path) -> str | None:
    if not path.exists():
        return "file not found"
    if path.is_dir():
        return "is a folder, not a file"
    return None


def _file_hint(path: Path) -> str:
    parts = path.parts
    built = any(parts[i : i + 2] == ("build", "test-guest") for i in range(len(parts) - 1))
    return "run scripts/build-test-guest" if built else "check the path"
