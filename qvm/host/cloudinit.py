"""cloud-init NoCloud seeds: which SSH keys go in, the user-data and meta-data texts, the
``cidata`` ISO image, and the per-VM key pair qvm makes when the user has none.

``plan_seed`` decides everything from the definition and this host (the user's
``~/.ssh/id_*.pub``) without writing anything; ``write_seed`` makes the files in the run
dir. The texts are pure functions of the plan, so tests read them back exactly.

The ISO is written with pycdlib (ISO 9660 with Rock Ridge and Joliet, volume id
``cidata``, files ``user-data`` and ``meta-data``), which cloud-init's NoCloud datasource
finds by its label on any block device.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
from pathlib import Path
from typing import Any

from qvm.base.record import Record
from qvm.definition.schema import CloudInitSpec, Machine
from qvm.definition.sshkeys import NO_PUBLIC_KEY, key_file_problem, key_line_problem
from qvm.errors import DefinitionError, HostError, Problem
from qvm.host.tools import run_tool
from qvm.layout.rundir import RunDir

SEED_LABEL = "cidata"
GENERATED_KEY = "id_ed25519"  # in the run dir, when qvm makes the VM's key pair


class SeedPlan(Record):
    user: str
    keys: tuple[str, ...]  # public key lines; empty when qvm will make the key pair
    identities: tuple[Path, ...]  # private keys `qvm ssh` offers (-i); may be empty
    generate_key: bool  # make RUN/id_ed25519 and put its public half in
    user_data_file: Path | None  # the user's own user-data, used as is
    packages: tuple[str, ...]
    runcmd: tuple[str | tuple[str, ...], ...]
    # fstab lines for the shares (cloud-init's ``mounts``), made by qvm.cmdline.share_mount
    mounts: tuple[tuple[str, ...], ...] = ()


def default_public_keys(home: Path) -> list[Path]:
    """The user's own public keys: ``~/.ssh/id_*.pub``, sorted."""
    return sorted(p for p in (home / ".ssh").glob("id_*.pub") if p.is_file())


def plan_seed(machine: Machine, run: RunDir, home: Path | None = None) -> SeedPlan:
    """What the seed will hold; reads key files but writes nothing."""
    spec = machine.cloud_init or CloudInitSpec()
    home = Path.home() if home is None else home
    generated = run.path / GENERATED_KEY
    if spec.user_data is not None:
        return SeedPlan(
            user=spec.user,
            keys=(),
            identities=(generated,) if generated.exists() else (),
            generate_key=False,
            user_data_file=spec.user_data,
            packages=(),
            runcmd=(),
        )
    if spec.ssh_authorized_keys is None:
        sources: list[str | Path] = list(default_public_keys(home))
        generate = not sources
    else:
        sources = list(spec.ssh_authorized_keys)
        generate = False
    keys: list[str] = []
    identities: list[Path] = []
    for index, source in enumerate(sources):
        if isinstance(source, str):
            problem = key_line_problem(source)
            if problem is not None:
                key = f"cloud_init.ssh_authorized_keys[{index}]"
                raise DefinitionError([Problem(str(machine.path), key, problem)])
            keys.append(source)
            continue
        keys.extend(_read_public_keys(machine, index, source, spec.ssh_authorized_keys is None))
        private = source.with_suffix("") if source.suffix == ".pub" else None
        if private is not None and private.is_file():
            identities.append(private)
    if generate:
        identities = [generated]
    return SeedPlan(
        user=spec.user,
        keys=tuple(keys),
        identities=tuple(identities),
        generate_key=generate,
        user_data_file=None,
        packages=spec.packages,
        runcmd=spec.runcmd,
    )


def _read_public_keys(machine: Machine, index: int, path: Path, default: bool) -> list[str]:
    """The key lines of ``path``: public keys only, never a private key's lines, which
    would reach the guest, and every snapshot and clone of it, through the seed."""
    key = "cloud_init" if default else f"cloud_init.ssh_authorized_keys[{index}]"
    try:
        text = path.read_bytes().decode(errors="replace")
    except OSError as exc:
        raise DefinitionError(
            [Problem(str(machine.path), key, f"cannot read {path}: {exc.strerror}")]
        ) from exc
    problem = key_file_problem(text, str(path))
    if problem == NO_PUBLIC_KEY:
        raise DefinitionError(
            [Problem(str(machine.path), key, f"no public key in {path}", hint="check the file")]
        )
    if problem is not None:
        raise DefinitionError([Problem(str(machine.path), key, f"{path}: {problem}")])
    lines = (line.strip() for line in text.splitlines())
    return [line for line in lines if line and not line.startswith("#")]


# --- the texts ---------------------------------------------------------------------------


def instance_id(machine_name: str, user_data: str) -> str:
    """From the VM's name, and changing with the user-data: cloud-init applies its per-
    instance settings (user, keys, packages, runcmd) again when the config changed."""
    return f"{machine_name}-{hashlib.sha256(user_data.encode()).hexdigest()[:8]}"


def meta_data_text(machine_name: str, user_data: str) -> str:
    return f"instance-id: {instance_id(machine_name, user_data)}\nlocal-hostname: {machine_name}\n"


def user_data_text(plan: SeedPlan, public_keys: tuple[str, ...] | None = None) -> str:
    """The generated #cloud-config document (``public_keys`` overrides ``plan.keys``,
    e.g. with the key pair made for the VM)."""
    keys = plan.keys if public_keys is None else public_keys
    user: dict[str, Any] = {
        "name": plan.user,
        "shell": "/bin/bash",
        "sudo": "ALL=(ALL) NOPASSWD:ALL",
        "lock_passwd": True,
        "ssh_authorized_keys": list(keys),
    }
    # manage_etc_hosts: the VM's name resolves in the guest (sudo looks it up). No
    # ssh_pwauth: setting it makes cloud-init restart sshd late in the boot, dropping
    # logins that just worked (the user has no password anyway: lock_passwd)
    document: dict[str, Any] = {"users": [user], "manage_etc_hosts": True}
    if plan.packages:
        document["packages"] = list(plan.packages)
    if plan.runcmd:
        document["runcmd"] = [c if isinstance(c, str) else list(c) for c in plan.runcmd]
    if plan.mounts:
        # the guest mounts the shares at every boot by itself, agent or not
        document["mounts"] = [list(m) for m in plan.mounts]
    return "#cloud-config\n" + _yaml(document, 0)


def _yaml(value: Any, indent: int) -> str:
    """Block-style YAML for dicts, lists and scalars; scalars are JSON (valid YAML)."""
    pad = " " * indent
    if isinstance(value, dict):
        out = ""
        for key, item in value.items():
            if isinstance(item, dict | list) and item:
                out += f"{pad}{key}:\n" + _yaml(item, indent + 2)
            else:
                out += f"{pad}{key}: {_scalar(item)}\n"
        return out
    if isinstance(value, list):
        out = ""
        for item in value:
            if isinstance(item, dict) and item:
                inner = _yaml(item, indent + 2)
                out += f"{pad}- " + inner[indent + 2 :]
            elif isinstance(item, list) and item:
                out += f"{pad}- " + _flow(item) + "\n"
            else:
                out += f"{pad}- {_scalar(item)}\n"
        return out
    return pad + _scalar(value) + "\n"


def _flow(items: list[Any]) -> str:
    return "[" + ", ".join(_scalar(item) for item in items) + "]"


def _scalar(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, list | dict):
        return "[]" if isinstance(value, list) else "{}"
    return json.dumps(value, ensure_ascii=False)


# --- writing -------------------------------------------------------------------------------


def write_seed(machine: Machine, plan: SeedPlan, run: RunDir) -> bool:
    """Make the key pair (if planned and missing) and the seed; True if the seed changed.

    A changed seed means cloud-init will act again (new instance-id), with new SSH host
    keys: the VM's known_hosts file is removed with it.
    """
    keys = plan.keys
    if plan.generate_key:
        keys = (make_key_pair(run.path / GENERATED_KEY, f"qvm@{machine.name}"),)
    if plan.user_data_file is not None:
        try:
            user_data = plan.user_data_file.read_text()
        except OSError as exc:
            raise HostError(f"cannot read {plan.user_data_file}: {exc.strerror}") from exc
    else:
        user_data = user_data_text(plan, keys)
    meta_data = meta_data_text(machine.name, user_data)
    texts = {run.user_data: user_data, run.meta_data: meta_data}
    unchanged = run.seed_image.exists() and all(
        path.exists() and path.read_text() == text for path, text in texts.items()
    )
    if unchanged:
        return False
    tmp = run.seed_image.with_name(f".{run.seed_image.name}.{os.getpid()}.tmp")
    try:
        build_iso(tmp, {"user-data": user_data.encode(), "meta-data": meta_data.encode()})
        os.replace(tmp, run.seed_image)
    finally:
        tmp.unlink(missing_ok=True)
    for path, text in texts.items():
        path.write_text(text)
    run.known_hosts.unlink(missing_ok=True)
    return True


def build_iso(path: Path, files: dict[str, bytes], label: str = SEED_LABEL) -> None:
    """An ISO 9660 image (Rock Ridge + Joliet names) holding ``files`` at its root."""
    import pycdlib  # noqa: PLC0415 -- 10+ ms, only when a seed is written

    iso = pycdlib.PyCdlib()
    iso.new(interchange_level=3, joliet=3, rock_ridge="1.09", vol_ident=label)
    for index, (name, data) in enumerate(sorted(files.items())):
        iso_name = f"/F{index}.;1"  # ISO 9660's own 8.3 name; readers use the RR/Joliet one
        iso.add_fp(io.BytesIO(data), len(data), iso_name, rr_name=name, joliet_path=f"/{name}")
    try:
        iso.write(str(path))
    finally:
        iso.close()


def read_iso(path: Path) -> tuple[str, dict[str, bytes]]:
    """The volume id and the files (by Rock Ridge name) of an ISO image (for tests)."""
    import pycdlib  # noqa: PLC0415 -- 10+ ms, only when a seed is read back (tests)

    iso = pycdlib.PyCdlib()
    iso.open(str(path))
    try:
        label = iso.pvd.volume_identifier.decode().strip()
        files = {}
        for child in iso.list_children(rr_path="/"):
            if child.is_dot() or child.is_dotdot():
                continue
            name = child.rock_ridge.name().decode()
            out = io.BytesIO()
            iso.get_file_from_iso_fp(out, rr_path=f"/{name}")
            files[name] = out.getvalue()
        return label, files
    finally:
        iso.close()


def make_key_pair(private: Path, comment: str) -> str:
    """Make an ed25519 key pair without a passphrase (once); return the public key line."""
    public = private.with_name(private.name + ".pub")
    if not (private.exists() and public.exists()):
        private.unlink(missing_ok=True)
        public.unlink(missing_ok=True)
        argv = ["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-C", comment, "-f", str(private)]
        run_tool(argv, "openssh-client", timeout=30, what=f"ssh-keygen -f {private}")
    return public.read_text().strip()
