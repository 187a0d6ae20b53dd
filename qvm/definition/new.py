"""`qvm new`: a machine file from a few options, written with tomli-w.

``new_document`` turns the options into the TOML data (pure, every value checked with
the same rules the loader uses); ``write_new`` writes it next to the other machine files
without ever replacing one (a hard link of a finished temporary file), loads it back to
prove it valid, and notes in the VM's run dir that qvm made it, with its checksum, so
``qvm rm --purge`` removes it only while it is still exactly what qvm wrote.
"""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Any

from qvm.base.record import Record
from qvm.base.sizes import SizeError, parse_size
from qvm.base.urls import is_url
from qvm.definition.forwards import ForwardError, parse_forward
from qvm.definition.schema import USER_PATTERN
from qvm.definition.sshkeys import key_file_problem, key_line_problem
from qvm.errors import DefinitionError, Problem, UsageError
from qvm.layout.names import NAME_PATTERN, NAME_RULE, shown

DEFAULT_MEMORY = "1G"  # cloud-init runs Python at first boot: 512M is tight
SSH_FORWARD = "tcp:0:22"  # any free host port to the guest's sshd


class NewOptions(Record):
    name: str
    image: str | None = None  # path or http(s) URL
    sha256: str | None = None
    sha512: str | None = None
    cpus: int | None = None
    max_cpus: int | None = None
    memory: str | None = None
    disk_size: str | None = None
    forwards: tuple[str, ...] = ()
    kernel: str | None = None
    initrd: str | None = None
    append: str | None = None
    user: str | None = None
    ssh_keys: tuple[str, ...] = ()
    packages: tuple[str, ...] = ()
    runcmd: tuple[str, ...] = ()
    user_data: str | None = None
    cloud_init: bool = True
    machine_type: str | None = None


def _absolute(text: str, cwd: Path) -> str:
    """Paths on the command line are the shell's: relative to the current folder."""
    if is_url(text):
        return text
    try:
        expanded = Path(text).expanduser()
    except RuntimeError:  # ~nosuchuser/...: left as written, then reported as not found
        expanded = Path(text)
    return os.path.normpath(cwd / expanded)


def new_document(options: NewOptions, cwd: Path) -> dict[str, Any]:
    """The machine file's data; raises QvmError listing every bad option."""
    problems: list[str] = []
    if not re.fullmatch(NAME_PATTERN, options.name):
        problems.append(f"NAME: must be {NAME_RULE}, got {shown(options.name)}")
    if options.image is None and options.kernel is None:
        problems.append("needs --image FILE|URL, or --kernel for direct kernel boot")
    for flag, value in (("--memory", options.memory), ("--disk-size", options.disk_size)):
        if value is not None:
            try:
                parse_size(value)
            except SizeError as exc:
                problems.append(f"{flag}: {exc}")
    for forward in options.forwards:
        try:
            parse_forward(forward.replace(":auto:", ":0:"))
        except ForwardError as exc:
            problems.append(f"--forward: {exc}")
    if options.user is not None and not re.fullmatch(USER_PATTERN, options.user):
        problems.append(f"--user: must be a user name like 'qvm', got {shown(options.user)}")
    if options.cpus is not None and options.cpus < 1:
        problems.append(f"--cpus: must be >= 1, got {options.cpus}")
    if options.max_cpus is not None and options.max_cpus < (options.cpus or 1):
        problems.append(f"--max-cpus: must be >= --cpus, got {options.max_cpus}")
    url = options.image is not None and is_url(options.image)
    if url and not (options.sha256 or options.sha512):
        problems.append("--image URL needs --sha256 or --sha512 (the image's published checksum)")
    if not url and (options.sha256 or options.sha512):
        problems.append("--sha256/--sha512 are only for an --image URL")
    if options.disk_size is not None and options.image is None:
        problems.append("--disk-size needs --image")
    if options.user_data is not None and (options.ssh_keys or options.packages or options.runcmd):
        problems.append("--user-data is used as is: it excludes --ssh-key, --package and --runcmd")
    if problems:
        raise UsageError("qvm new: " + "; ".join(problems))
    if options.cloud_init:
        check_ssh_keys(options, cwd)

    doc: dict[str, Any] = {}
    if options.machine_type:
        doc["machine"] = {"type": options.machine_type}
    cpu: dict[str, Any] = {}
    if options.cpus is not None:
        cpu["count"] = options.cpus
    if options.max_cpus is not None:
        cpu["max"] = options.max_cpus
    if cpu:
        doc["cpu"] = cpu
    doc["memory"] = {"size": options.memory or DEFAULT_MEMORY}
    if options.kernel is not None:
        boot: dict[str, Any] = {"kernel": _absolute(options.kernel, cwd)}
        if options.initrd is not None:
            boot["initrd"] = _absolute(options.initrd, cwd)
        if options.append is not None:
            boot["append"] = options.append
        doc["boot"] = boot
    if options.image is not None:
        disk: dict[str, Any] = {"base": _absolute(options.image, cwd)}
        if options.sha256:
            disk["sha256"] = options.sha256.lower()
        if options.sha512:
            disk["sha512"] = options.sha512.lower()
        if options.disk_size is not None:
            disk["size"] = options.disk_size
        doc["disk"] = [disk]
    forwards = list(options.forwards)
    if options.cloud_init and not any(_to_guest_ssh(f) for f in forwards):
        forwards.insert(0, SSH_FORWARD)
    doc["nic"] = [{"forwards": forwards}] if forwards else [{}]
    if options.cloud_init:
        cloud: dict[str, Any] = {"user": options.user or "qvm"}
        if options.ssh_keys:
            cloud["ssh_authorized_keys"] = [
                key.strip() if _is_key_line(key) else _absolute(key, cwd)
                for key in options.ssh_keys
            ]
        if options.packages:
            cloud["packages"] = list(options.packages)
        if options.runcmd:
            cloud["runcmd"] = list(options.runcmd)
        if options.user_data is not None:
            cloud["user_data"] = _absolute(options.user_data, cwd)
        doc["cloud_init"] = cloud
    return doc


def _is_key_line(text: str) -> bool:
    return text.lstrip().startswith(("ssh-", "ecdsa-", "sk-"))


def check_ssh_keys(options: NewOptions, cwd: Path) -> None:
    """Each --ssh-key a public key line or a file of them: a private key named by
    mistake would reach the guest through the seed (DefinitionError, exit 2, naming it)."""
    for key in options.ssh_keys:
        if _is_key_line(key):
            problem = key_line_problem(key)
            if problem is not None:
                where = f"qvm new {options.name}"
                raise DefinitionError([Problem(where, "--ssh-key", problem, shown(key))])
            continue
        path = _absolute(key, cwd)
        try:
            text = Path(path).read_bytes().decode(errors="replace")
        except OSError as exc:
            problem = f"cannot read it: {exc.strerror or exc}"
        else:
            problem = key_file_problem(text, path)
        if problem is not None:
            raise DefinitionError([Problem(path, "", problem, hint=_KEY_HINT)])


_KEY_HINT = "--ssh-key takes a public key line or a .pub file"


def _to_guest_ssh(forward: str) -> bool:
    parts = forward.split(":")
    return len(parts) in (3, 4) and parts[0].lower() == "tcp" and parts[-1] == "22"


def render(doc: dict[str, Any]) -> str:
    """TOML text of ``doc``, tables in its order; arrays of tables always as [[name]]
    (tomli-w would write a short one inline, ``disk = [{...}]``, which reads worse)."""
    import tomli_w  # noqa: PLC0415 -- only to write the file, after every check passed

    chunks = []
    for key, value in doc.items():
        if isinstance(value, list) and value and all(isinstance(v, dict) for v in value):
            chunks += [f"[[{key}]]\n" + tomli_w.dumps(item) for item in value]
        else:
            chunks.append(tomli_w.dumps({key: value}))
    return "\n".join(chunks)
