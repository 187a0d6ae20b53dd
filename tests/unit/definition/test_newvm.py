"""qvm new: the exact TOML written from flags, refusal to overwrite, bad flags."""

from __future__ import annotations

import base64
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from qvm.definition.load import load_machine
from qvm.definition.new import NewOptions, new_document, render
from qvm.errors import DefinitionError, QvmError
from qvm.layout.rundir import RunDir
from qvm.ops.new import write_new

QVM = [sys.executable, "-m", "qvm.cli"]


def test_minimal_image_gets_memory_ssh_forward_and_cloud_init(tmp_path: Path) -> None:
    doc = new_document(NewOptions("vm1", image="img/debian.qcow2"), tmp_path)
    assert render(doc) == (
        "[memory]\n"
        'size = "1G"\n'
        "\n"
        "[[disk]]\n"
        f'base = "{tmp_path}/img/debian.qcow2"\n'
        "\n"
        "[[nic]]\n"
        "forwards = [\n"
        '    "tcp:0:22",\n'
        "]\n"
        "\n"
        "[cloud_init]\n"
        'user = "qvm"\n'
    )


def public_key(comment: str) -> str:
    """A well-formed ed25519 public key line (its wire format: type name, key bytes)."""
    kind = b"ssh-ed25519"
    blob = len(kind).to_bytes(4, "big") + kind + (32).to_bytes(4, "big") + bytes(32)
    return f"ssh-ed25519 {base64.b64encode(blob).decode()} {comment}"


KEY = public_key("me@host")


def test_every_flag(tmp_path: Path) -> None:
    (tmp_path / "keys").mkdir()
    (tmp_path / "keys" / "id.pub").write_text(public_key("other@host") + "\n")
    options = NewOptions(
        "dev",
        image="https://example.org/debian-12.qcow2",
        sha256="AB" * 32,
        cpus=2,
        max_cpus=4,
        memory="2G",
        disk_size="20G",
        forwards=("tcp:8080:80", "udp:0.0.0.0:5353:53"),
        kernel="/boot/vmlinuz",
        initrd="initrd.img",
        append="root=/dev/vda rw console=ttyS0",
        user="dev",
        ssh_keys=(KEY, "keys/id.pub"),
        packages=("curl",),
        runcmd=("echo hi > /tmp/hi",),
        machine_type="pc",
    )
    assert render(new_document(options, tmp_path)) == (
        "[machine]\n"
        'type = "pc"\n'
        "\n"
        "[cpu]\n"
        "count = 2\n"
        "max = 4\n"
        "\n"
        "[memory]\n"
        'size = "2G"\n'
        "\n"
        "[boot]\n"
        'kernel = "/boot/vmlinuz"\n'
        f'initrd = "{tmp_path}/initrd.img"\n'
        'append = "root=/dev/vda rw console=ttyS0"\n'
        "\n"
        "[[disk]]\n"
        'base = "https://example.org/debian-12.qcow2"\n'
        f'sha256 = "{"ab" * 32}"\n'
        'size = "20G"\n'
        "\n"
        "[[nic]]\n"
        "forwards = [\n"
        '    "tcp:0:22",\n'
        '    "tcp:8080:80",\n'
        '    "udp:0.0.0.0:5353:53",\n'
        "]\n"
        "\n"
        "[cloud_init]\n"
        'user = "dev"\n'
        "ssh_authorized_keys = [\n"
        f'    "{KEY}",\n'
        f'    "{tmp_path}/keys/id.pub",\n'
        "]\n"
        'packages = [\n    "curl",\n]\n'
        'runcmd = [\n    "echo hi > /tmp/hi",\n]\n'
    )


def test_a_given_ssh_forward_is_not_doubled_and_no_cloud_init_adds_none(tmp_path: Path) -> None:
    doc = new_document(NewOptions("a", image="x.raw", forwards=("tcp:2222:22",)), tmp_path)
    assert doc["nic"] == [{"forwards": ["tcp:2222:22"]}]
    doc = new_document(NewOptions("b", image="x.raw", cloud_init=False), tmp_path)
    assert doc["nic"] == [{}]
    assert "cloud_init" not in doc


def test_bad_flags_are_all_reported(tmp_path: Path) -> None:
    with pytest.raises(QvmError) as error:
        new_document(
            NewOptions(
                "Bad Name",
                image="https://example.org/x.qcow2",
                memory="lots",
                forwards=("tcp:22",),
                user="Root",
            ),
            tmp_path,
        )
    message = str(error.value)
    assert message.startswith("qvm new: NAME: must be 1 to 63 lowercase letters")
    for part in (
        "--memory:",
        '--forward: invalid port forward "tcp:22"',
        "--user: must be a user name like 'qvm', got 'Root'",
        "--image URL needs --sha256 or --sha512",
    ):
        assert part in message


def test_needs_an_image_or_a_kernel(tmp_path: Path) -> None:
    with pytest.raises(QvmError, match="needs --image FILE|URL, or --kernel"):
        new_document(NewOptions("vm1"), tmp_path)


def test_written_file_loads_refuses_overwrite_and_is_noted(tmp_path: Path) -> None:
    image = tmp_path / "base.qcow2"
    image.write_bytes(b"")
    path = tmp_path / "machines" / "vm1.toml"
    run = RunDir(tmp_path / "state" / "vm1")
    machine = write_new(new_document(NewOptions("vm1", image=str(image)), tmp_path), path, run)
    assert machine.path == path.resolve()
    assert machine.disks[0].base == image
    assert machine.cloud_init is not None and machine.cloud_init.user == "qvm"
    assert machine.nics[0].forwards[0].host_port == 0
    note = json.loads((run.path / "new.json").read_text())
    assert note["machine_file"] == str(path.resolve())
    before = path.read_text()
    with pytest.raises(QvmError, match="already exists; qvm new never replaces"):
        write_new(new_document(NewOptions("vm1", image="other.raw"), tmp_path), path, run)
    assert path.read_text() == before
    assert sorted(p.name for p in path.parent.iterdir()) == ["vm1.toml"]  # no temp left
    assert load_machine(path).name == "vm1"


def test_cli_new_writes_into_machines_dir(tmp_path: Path) -> None:
    env = dict(os.environ, QVM_STATE_DIR=str(tmp_path / "state"))
    (tmp_path / "disk.qcow2").write_bytes(b"QFI\xfb" + bytes(508))  # new checks it is an image
    argv = [*QVM, "--machines", str(tmp_path / "m"), "new", "box", "--image", "disk.qcow2"]
    done = subprocess.run(argv, capture_output=True, text=True, cwd=tmp_path, env=env)
    assert done.returncode == 0, done.stderr
    assert done.stdout.splitlines()[0] == f"box: wrote {tmp_path}/m/box.toml"
    again = subprocess.run(argv, capture_output=True, text=True, cwd=tmp_path, env=env)
    assert again.returncode == 1
    assert again.stderr.startswith(f"qvm: {tmp_path}/m/box.toml: already exists")


def test_new_refuses_a_private_key_and_malformed_key_lines(tmp_path: Path) -> None:
    """The private half named by mistake would reach the guest, its snapshots and clones."""
    private = tmp_path / "id_ed25519"
    private.write_text("-----BEGIN OPENSSH PRIVATE KEY-----\nb3BlbnNzaC1rZXktdjEA\n")
    with pytest.raises(DefinitionError) as error:
        new_document(NewOptions("vm1", image="x.raw", ssh_keys=("id_ed25519",)), tmp_path)
    assert str(error.value) == (
        f"{private}: this is a private key; pass {private}.pub"
        " (hint: --ssh-key takes a public key line or a .pub file)"
    )
    assert error.value.exit_code == 2
    with pytest.raises(DefinitionError, match="^qvm new vm1: --ssh-key: the key after"):
        new_document(NewOptions("vm1", image="x.raw", ssh_keys=(KEY[:40],)), tmp_path)
    (tmp_path / "junk.pub").write_text("hello\n")
    with pytest.raises(DefinitionError, match="junk.pub: line 1: not a public key line"):
        new_document(NewOptions("vm1", image="x.raw", ssh_keys=("junk.pub",)), tmp_path)
    with pytest.raises(DefinitionError, match="gone.pub: cannot read it: No such file"):
        new_document(NewOptions("vm1", image="x.raw", ssh_keys=("gone.pub",)), tmp_path)


def test_cli_new_with_a_private_key_exits_2_and_writes_nothing(tmp_path: Path) -> None:
    env = dict(os.environ, QVM_STATE_DIR=str(tmp_path / "state"))
    (tmp_path / "disk.qcow2").write_bytes(b"QFI\xfb" + bytes(508))
    (tmp_path / "id_rsa").write_text("-----BEGIN RSA PRIVATE KEY-----\n")
    argv = [*QVM, "--machines", str(tmp_path / "m"), "new", "box", "--image", "disk.qcow2"]
    done = subprocess.run(
        [*argv, "--ssh-key", "id_rsa"], capture_output=True, text=True, cwd=tmp_path, env=env
    )
    assert done.returncode == 2
    assert done.stderr == (
        f"qvm: {tmp_path}/id_rsa: this is a private key; pass {tmp_path}/id_rsa.pub"
        " (hint: --ssh-key takes a public key line or a .pub file)\n"
    )
    assert not (tmp_path / "m" / "box.toml").exists()
