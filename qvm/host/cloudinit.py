"""cloud-init NoCloud seeds: which SSH keys go in, the user-data, meta-data,
network-config and vendor-data texts, the ``cidata`` ISO image, and the per-VM key pair
qvm makes when the user has none.

``plan_seed`` decides everything from the definition and this host (the user's
``~/.ssh/id_*.pub``) without writing anything; ``qvm.ops.up`` adds the NICs' addresses
and the network members once the VM has joined its networks; ``write_seed`` makes the
files in the run dir. The texts are pure functions of the plan, so tests read them back
exactly.

What cloud-init does with each, and when (cloud-init 22.4, Debian 12's, read and booted):

- ``user-data`` (the user, keys, packages, runcmd) and ``network-config`` (version 2: each
  network NIC matched by its MAC with its static address, the user-mode NICs on DHCP) are
  applied once per instance: the instance-id in ``meta-data`` is the VM's name and a hash
  of both, so a changed ``[cloud_init]`` or a changed address is applied at the next
  boot, and a clone (another name) is an instance of its own.
- ``vendor-data`` holds what must be current at every boot but must not make a new
  instance: a ``bootcmd`` (run at every boot, the data read from the seed anew) that
  writes the network members into ``/etc/hosts`` between the marker lines the agent's
  script uses (``qvm.store.guestnet``), and mounts the shares. A user-data that has its
  own ``bootcmd`` wins over it (cloud-init merges vendor-data under user-data).

The ISO is written with pycdlib (ISO 9660 with Rock Ridge and Joliet, volume id
``cidata``), which cloud-init's NoCloud datasource finds by its label on any block device.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import re
from pathlib import Path
from typing import Any

from qvm.base.record import Record
from qvm.definition.schema import CloudInitSpec, Machine
from qvm.definition.sshkeys import NO_PUBLIC_KEY, key_file_problem, key_line_problem
from qvm.errors import DefinitionError, HostError, Problem
from qvm.host.tools import run_tool
from qvm.layout.rundir import RunDir
from qvm.store.guestnet import hosts_script

SEED_LABEL = "cidata"
GENERATED_KEY = "id_ed25519"  # in the run dir, when qvm makes the VM's key pair
# what Linux takes as an interface name (IFNAMSIZ - 1 bytes), kept to plain characters
_IFNAME = re.compile(r"[A-Za-z][A-Za-z0-9_-]{0,14}")


class SeedInterface(Record):
    """A NIC as network-config says it: found by its MAC, named by its qvm id."""

    id: str  # the NIC's id in qvm (net0...): network-config's name for its entry
    mac: str
    address: str | None  # static, with its prefix (10.70.211.2/24); None: DHCP (user-mode)


class SeedPlan(Record):
    user: str
    keys: tuple[str, ...]  # public key lines; empty when qvm will make the key pair
    identities: tuple[Path, ...]  # private keys `qvm ssh` offers (-i); may be empty
    generate_key: bool  # make RUN/id_ed25519 and put its public half in
    user_data_file: Path | None  # the user's own user-data, used as is
    packages: tuple[str, ...]
    runcmd: tuple[str | tuple[str, ...], ...]
    # the shares' mount commands at every boot (qvm.cmdline.share_mount.boot_mount_argv)
    mounts: tuple[tuple[str, ...], ...] = ()
    # with a NIC on a network: every NIC (network-config), and the members (address, name)
    interfaces: tuple[SeedInterface, ...] = ()
    hosts: tuple[tuple[str, str], ...] = ()


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


def instance_id(machine_name: str, user_data: str, network_config: str = "") -> str:
    """From the VM's name, and changing with the user-data and the network-config:
    cloud-init applies its per-instance settings (user, keys, packages, runcmd, the
    network) again when they changed, and only then."""
    digest = hashlib.sha256((user_data + network_config).encode()).hexdigest()[:8]
    return f"{machine_name}-{digest}"


def meta_data_text(machine_name: str, user_data: str, network_config: str = "") -> str:
    ident = instance_id(machine_name, user_data, network_config)
    return f"instance-id: {ident}\nlocal-hostname: {machine_name}\n"


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
    # manage_etc_hosts: the VM's name resolves in the guest (sudo looks it up); on a
    # network only its 127.0.1.1 line ("localhost"), since true rewrites the whole file
    # at every boot after the vendor-data's bootcmd wrote the members in. No
    # ssh_pwauth: setting it makes cloud-init restart sshd late in the boot, dropping
    # logins that just worked (the user has no password anyway: lock_passwd)
    hosts_mode: str | bool = "localhost" if plan.hosts else True
    document: dict[str, Any] = {"users": [user], "manage_etc_hosts": hosts_mode}
    if plan.packages:
        document["packages"] = list(plan.packages)
    if plan.runcmd:
        document["runcmd"] = [c if isinstance(c, str) else list(c) for c in plan.runcmd]
    return "#cloud-config\n" + _yaml(document, 0)


def network_config_text(interfaces: tuple[SeedInterface, ...]) -> str:
    """network-config version 2, as JSON (which cloud-init reads as the YAML it is), or
    "" without NICs on networks: cloud-init's own default (DHCP on the first NIC) then.

    Each NIC is matched by its MAC and named by its qvm id (``set-name``): cloud-init
    waits for a NIC it is to rename (its first stage may run before udev has loaded
    virtio_net), and the guest's names are those ``qvm status`` shows. An id that cannot
    be an interface name is matched only (then cloud-init looks the name up by MAC)."""
    if not any(i.address is not None for i in interfaces):
        return ""
    ethernets: dict[str, Any] = {}
    for interface in interfaces:
        entry: dict[str, Any] = {"match": {"macaddress": interface.mac.lower()}}
        if _IFNAME.fullmatch(interface.id):
            entry["set-name"] = interface.id
        if interface.address is None:
            entry["dhcp4"] = True
        else:
            entry["dhcp4"] = False
            entry["addresses"] = [interface.address]
        ethernets[interface.id] = entry
    return json.dumps({"version": 2, "ethernets": ethernets}, indent=2) + "\n"


def vendor_data_text(plan: SeedPlan) -> str:
    """The #cloud-config of every boot (see the module's docstring), or "" if there is
    nothing to do: the members into /etc/hosts, then the shares mounted."""
    commands: list[list[str]] = []
    if plan.hosts:
        commands.append(["/bin/sh", "-c", hosts_script(plan.hosts)])
    commands += [list(m) for m in plan.mounts]
    if not commands:
        return ""
    return "#cloud-config\n" + _yaml({"bootcmd": commands}, 0)


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

    A new instance-id means cloud-init will act again, with new SSH host keys: the VM's
    known_hosts file is removed with it (not when only the vendor-data changed).
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
    network_config = network_config_text(plan.interfaces)
    meta_data = meta_data_text(machine.name, user_data, network_config)
    # (the name in the seed, the copy in the run dir for people, the text: "" is no file)
    texts = (
        ("user-data", run.user_data, user_data),
        ("meta-data", run.meta_data, meta_data),
        ("network-config", run.network_config, network_config),
        ("vendor-data", run.vendor_data, vendor_data_text(plan)),
    )
    unchanged = run.seed_image.exists() and all(
        path.read_text() == text if path.exists() else not text for _, path, text in texts
    )
    if unchanged:
        return False
    new_instance = not run.meta_data.exists() or run.meta_data.read_text() != meta_data
    files = {name: text.encode() for name, _, text in texts if text}
    tmp = run.seed_image.with_name(f".{run.seed_image.name}.{os.getpid()}.tmp")
    try:
        build_iso(tmp, files)
        os.replace(tmp, run.seed_image)
    finally:
        tmp.unlink(missing_ok=True)
    for _, path, text in texts:
        if text:
            path.write_text(text)
        else:
            path.unlink(missing_ok=True)
    if new_instance:
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
