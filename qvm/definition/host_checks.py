"""What a valid definition still needs from this host, checked at ``up`` (not at load):
the kernel, initrd and images exist, each forward's host address is one of this host's,
and this QEMU knows the CPU model and machine type. The caller passes in what QEMU
supports, so this stays free of any QEMU probing."""

from __future__ import annotations

import errno
import os
from collections.abc import Collection
from pathlib import Path

from qvm.definition.reader import did_you_mean, shown
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
            Problem(file, "machine.type", f"unknown to {binary}", shown(machine.type), hint)
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
                shown(model),
                f"{close} {hint}" if close else hint,
            )
        )
    for nic_index, nic in enumerate(machine.nics):
        for fwd_index, forward in enumerate(nic.forwards):
            problem = address_problem(forward.host_addr, forward.protocol)
            if problem is not None:
                key = f"nic[{nic_index}].forwards[{fwd_index}]"
                problems.append(Problem(file, key, problem, None, ADDRESS_HINT))
    problems += _share_problems(machine, file)
    for key, path in _files_needed(machine):
        problem = _file_problem(path)
        if problem is not None:
            got = shown(str(path), MAX_PATH_SHOWN)
            problems.append(Problem(file, key, problem, got, _file_hint(path)))
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


def _share_problems(machine: Machine, file: str) -> list[Problem]:
    """Each share's host folder exists and is a folder; virtiofs needs root here."""
    problems = []
    for index, share in enumerate(machine.shares):
        key = f"share[{index}]"
        got = shown(str(share.host), MAX_PATH_SHOWN)
        try:
            problem = None if share.host.is_dir() else "is not a folder"
            if not share.host.exists():
                problem = "folder not found"
        except OSError as error:
            problem = f"cannot be read: {error.strerror or error}"
        if problem is not None:
            problems.append(Problem(file, f"{key}.host", problem, got, "check the path"))
        if share.via == "virtiofs" and os.geteuid() != 0:
            problems.append(
                Problem(
                    file,
                    f"{key}.via",
                    "virtiofs needs root: Debian 12's virtiofsd cannot run as another user",
                    None,
                    'run qvm as root, or use via = "9p" with a guest kernel that has 9p',
                )
            )
    return problems


# a path is shown longer than other values: its end is what tells files apart
MAX_PATH_SHOWN = 300


def _file_problem(path: Path) -> str | None:
    try:
        if not path.exists():
            return "file not found"
        if path.is_dir():
            return "is a folder, not a file"
    except OSError as error:  # a name too long, a folder that cannot be searched
        return f"cannot be read: {error.strerror or error}"
    return None


def _file_hint(path: Path) -> str:
    parts = path.parts
    built = any(parts[i : i + 2] == ("build", "test-guest") for i in range(len(parts) - 1))
    return "run scripts/build-test-guest" if built else "check the path"


ADDRESS_HINT = "use 127.0.0.1, 0.0.0.0 or an address 'ip -4 addr' lists"


def address_problem(host_addr: str, protocol: str) -> str | None:
    """Why a forward cannot listen on ``host_addr`` here (an address this host does not
    have), or None. A bind to port 0 asks the kernel without taking any port for good;
    whether the forward's own port is free is decided when it is bound."""
    import socket  # noqa: PLC0415 -- 2-3 ms, for machines with forwards only

    kind = socket.SOCK_STREAM if protocol == "tcp" else socket.SOCK_DGRAM
    try:
        with socket.socket(socket.AF_INET, kind) as sock:
            sock.bind((host_addr, 0))
    except OSError as error:
        if error.errno == errno.EADDRNOTAVAIL:
            return f"host address {host_addr} is not an address of this host"
        return f"cannot listen on {host_addr}: {error.strerror or error}"
    return None
