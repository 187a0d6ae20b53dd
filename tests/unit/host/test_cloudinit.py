"""cloud-init seeds: keys chosen, exact user-data/meta-data, the ISO read back, paths."""

from __future__ import annotations

import base64
import os
import shutil
import subprocess
from pathlib import Path

import pytest

from qvm.cmdline.argv import LaunchInputs, build_argv
from qvm.definition.load import load_machine
from qvm.definition.sshkeys import key_line_problem
from qvm.errors import DefinitionError
from qvm.host.cloudinit import (
    instance_id,
    make_key_pair,
    meta_data_text,
    plan_seed,
    read_iso,
    user_data_text,
    write_seed,
)
from qvm.layout.rundir import RunDir


def public_key(kind: str, comment: str) -> str:
    """A well-formed public key line: TYPE, then its wire format in base64 (the type's
    name and a key field, each length-prefixed), then a comment."""
    fields = [kind.encode(), bytes(range(32))]
    blob = b"".join(len(field).to_bytes(4, "big") + field for field in fields)
    return f"{kind} {base64.b64encode(blob).decode()} {comment}"


KEY = public_key("ssh-ed25519", "me@host")
RSA = public_key("ssh-rsa", "other@host")


def machine(tmp_path: Path, body: str, name: str = "vm1"):  # noqa: ANN201
    path = tmp_path / f"{name}.toml"
    path.write_text(body)
    return load_machine(path)


def test_default_keys_are_the_users_id_pub_files(tmp_path: Path) -> None:
    home = tmp_path / "home"
    (home / ".ssh").mkdir(parents=True)
    (home / ".ssh" / "id_ed25519.pub").write_text(KEY + "\n")
    (home / ".ssh" / "id_ed25519").write_text("private")
    (home / ".ssh" / "id_rsa.pub").write_text(RSA + "\n")
    vm = machine(tmp_path, "[cloud_init]\n")
    plan = plan_seed(vm, RunDir(tmp_path / "run"), home=home)
    assert plan.keys == (KEY, RSA)
    assert plan.identities == (home / ".ssh" / "id_ed25519",)  # id_rsa has no private half
    assert not plan.generate_key
    assert plan.user == "qvm"


def test_no_keys_at_home_means_a_per_vm_key_pair(tmp_path: Path) -> None:
    vm = machine(tmp_path, "[cloud_init]\n")
    run = RunDir(tmp_path / "run")
    plan = plan_seed(vm, run, home=tmp_path / "empty-home")
    assert plan.generate_key and plan.keys == ()
    assert plan.identities == (run.path / "id_ed25519",)


def test_explicit_keys_lines_and_files(tmp_path: Path) -> None:
    (tmp_path / "k.pub").write_text("# a comment\n" + KEY + "\n")
    (tmp_path / "k").write_text("private")
    vm = machine(
        tmp_path,
        f'[cloud_init]\nuser = "dev"\nssh_authorized_keys = ["{RSA}", "k.pub"]\n',
    )
    plan = plan_seed(vm, RunDir(tmp_path / "run"), home=tmp_path)
    assert plan.keys == (RSA, KEY)
    assert plan.identities == (tmp_path / "k",)
    assert plan.user == "dev"


@pytest.mark.parametrize(
    ("file", "text", "problem"),
    [
        ("k.pub", "\n", "no public key in {path} (hint: check the file)"),
        # a private key named for a public one: its lines would reach the guest, and every
        # snapshot and clone of it, through the seed
        (
            "id_ed25519",
            "-----BEGIN OPENSSH PRIVATE KEY-----\nb3BlbnNzaC1rZXktdjEA\n",
            "{path}: this is a private key; pass {path}.pub",
        ),
    ],
    ids=["no key", "a private key"],
)
def test_a_key_file_without_a_public_key_is_refused_at_up(
    tmp_path: Path, file: str, text: str, problem: str
) -> None:
    path = tmp_path / file
    path.write_text(text)
    vm = machine(tmp_path, f'[cloud_init]\nssh_authorized_keys = ["{file}"]\n')
    with pytest.raises(DefinitionError) as error:
        plan_seed(vm, RunDir(tmp_path / "run"), home=tmp_path)
    assert str(error.value) == (
        f"{tmp_path}/vm1.toml: cloud_init.ssh_authorized_keys[0]: " + problem.format(path=path)
    )
    assert error.value.exit_code == 2


@pytest.mark.parametrize(
    ("text", "problem"),
    [
        ("ssh-rsa AAAAB3 x@y\n", "line 1: the key after ssh-rsa is cut or mangled"),
        (f"{KEY}\nhello\n", "line 2: not a public key line"),
        (KEY[:40] + "\n", "line 1: the key after ssh-ed25519 is cut or mangled"),
        ("ssh-ed25519\n", "line 1: no key after ssh-ed25519"),
    ],
)
def test_a_malformed_key_line_is_refused_at_up(tmp_path: Path, text: str, problem: str) -> None:
    (tmp_path / "k.pub").write_text(text)
    vm = machine(tmp_path, '[cloud_init]\nssh_authorized_keys = ["k.pub"]\n')
    with pytest.raises(DefinitionError) as error:
        plan_seed(vm, RunDir(tmp_path / "run"), home=tmp_path)
    assert str(error.value).startswith(
        f"{tmp_path}/vm1.toml: cloud_init.ssh_authorized_keys[0]: {tmp_path}/k.pub: {problem}"
    )


def test_a_default_key_file_that_is_not_a_public_key_is_refused(tmp_path: Path) -> None:
    home = tmp_path / "home"
    (home / ".ssh").mkdir(parents=True)
    (home / ".ssh" / "id_ed25519.pub").write_text("-----BEGIN OPENSSH PRIVATE KEY-----\n")
    vm = machine(tmp_path, "[cloud_init]\n")
    with pytest.raises(DefinitionError, match="this is a private key"):
        plan_seed(vm, RunDir(tmp_path / "run"), home=home)


def test_an_inline_key_line_cut_short_is_refused_at_up(tmp_path: Path) -> None:
    vm = machine(tmp_path, f'[cloud_init]\nssh_authorized_keys = ["{KEY[:44]}"]\n')
    with pytest.raises(DefinitionError, match=r"ssh_authorized_keys\[0\]: the key after"):
        plan_seed(vm, RunDir(tmp_path / "run"), home=tmp_path)


def test_keys_with_options_and_real_keys_pass(tmp_path: Path) -> None:
    assert key_line_problem(f'no-pty,from="10.0.0.1" {KEY}') is None
    private = tmp_path / "id"
    make_key_pair(private, "t@h")
    for kind in ("rsa", "ecdsa"):
        other = tmp_path / f"id_{kind}"
        run = ["ssh-keygen", "-q", "-t", kind, "-N", "", "-f", str(other)]
        subprocess.run(run, check=True)
        assert key_line_problem(other.with_suffix(".pub").read_text()) is None
    assert key_line_problem((tmp_path / "id.pub").read_text()) is None


def test_user_data_text_is_exact(tmp_path: Path) -> None:
    vm = machine(
        tmp_path,
        "[cloud_init]\n"
        f'ssh_authorized_keys = ["{KEY}"]\n'
        'packages = ["curl", "jq"]\n'
        'runcmd = ["echo \'hi\' > /tmp/x", ["touch", "/tmp/y"]]\n',
    )
    plan = plan_seed(vm, RunDir(tmp_path / "run"), home=tmp_path)
    assert user_data_text(plan) == (
        "#cloud-config\n"
        "users:\n"
        '  - name: "qvm"\n'
        '    shell: "/bin/bash"\n'
        '    sudo: "ALL=(ALL) NOPASSWD:ALL"\n'
        "    lock_passwd: true\n"
        "    ssh_authorized_keys:\n"
        f'      - "{KEY}"\n'
        "manage_etc_hosts: true\n"
        "packages:\n"
        '  - "curl"\n'
        '  - "jq"\n'
        "runcmd:\n"
        "  - \"echo 'hi' > /tmp/x\"\n"
        '  - ["touch", "/tmp/y"]\n'
    )


def test_user_data_is_yaml_that_cloud_init_reads_as_intended(tmp_path: Path) -> None:
    import yaml  # the parser cloud-init itself uses

    vm = machine(
        tmp_path,
        f'[cloud_init]\nssh_authorized_keys = ["{KEY}"]\nruncmd = ["a: b # c", ["x", "y"]]\n',
    )
    text = user_data_text(plan_seed(vm, RunDir(tmp_path / "run"), home=tmp_path))
    data = yaml.safe_load(text)
    assert data["users"][0]["ssh_authorized_keys"] == [KEY]
    assert data["runcmd"] == ["a: b # c", ["x", "y"]]


def test_meta_data_instance_id_follows_name_and_user_data() -> None:
    assert meta_data_text("vm1", "x") == (
        f"instance-id: {instance_id('vm1', 'x')}\nlocal-hostname: vm1\n"
    )
    assert instance_id("vm1", "x").startswith("vm1-")
    assert instance_id("vm1", "x") != instance_id("vm1", "y")


def test_seed_iso_has_label_cidata_and_both_files(tmp_path: Path) -> None:
    vm = machine(tmp_path, f'[cloud_init]\nssh_authorized_keys = ["{KEY}"]\n')
    run = RunDir(tmp_path / "run")
    run.path.mkdir()
    plan = plan_seed(vm, run, home=tmp_path)
    assert write_seed(vm, plan, run) is True
    label, files = read_iso(run.seed_image)
    assert label == "cidata"
    assert sorted(files) == ["meta-data", "user-data"]
    assert files["user-data"].decode() == user_data_text(plan)
    assert files["meta-data"].decode() == meta_data_text("vm1", user_data_text(plan))
    assert run.user_data.read_text() == user_data_text(plan)
    # unchanged config: the seed is kept, and known_hosts with it
    run.known_hosts.write_text("qvm-vm1 ssh-ed25519 AAAA\n")
    assert write_seed(vm, plan, run) is False
    assert run.known_hosts.exists()


def test_changed_config_rewrites_seed_and_drops_known_hosts(tmp_path: Path) -> None:
    run = RunDir(tmp_path / "run")
    run.path.mkdir()
    vm = machine(tmp_path, f'[cloud_init]\nssh_authorized_keys = ["{KEY}"]\n')
    write_seed(vm, plan_seed(vm, run, home=tmp_path), run)
    run.known_hosts.write_text("old host key\n")
    vm = machine(tmp_path, f'[cloud_init]\nssh_authorized_keys = ["{KEY}"]\npackages = ["jq"]\n')
    assert write_seed(vm, plan_seed(vm, run, home=tmp_path), run) is True
    assert not run.known_hosts.exists()
    assert "jq" in read_iso(run.seed_image)[1]["user-data"].decode()


@pytest.mark.skipif(shutil.which("ssh-keygen") is None, reason="ssh-keygen not installed")
def test_generated_key_pair_goes_in_and_is_made_once(tmp_path: Path) -> None:
    vm = machine(tmp_path, "[cloud_init]\n")
    run = RunDir(tmp_path / "run")
    run.path.mkdir()
    write_seed(vm, plan_seed(vm, run, home=tmp_path / "nohome"), run)
    public = (run.path / "id_ed25519.pub").read_text().strip()
    assert public.startswith("ssh-ed25519 ") and public.endswith(" qvm@vm1")
    assert oct(os.stat(run.path / "id_ed25519").st_mode & 0o777) == "0o600"
    assert public in read_iso(run.seed_image)[1]["user-data"].decode()
    assert make_key_pair(run.path / "id_ed25519", "other") == public


def test_raw_user_data_is_used_as_is(tmp_path: Path) -> None:
    (tmp_path / "ud.yaml").write_text("#cloud-config\nusers: [default]\n")
    vm = machine(tmp_path, '[cloud_init]\nuser = "debian"\nuser_data = "ud.yaml"\n')
    run = RunDir(tmp_path / "run")
    run.path.mkdir()
    plan = plan_seed(vm, run, home=tmp_path)
    assert plan.user == "debian" and not plan.generate_key
    write_seed(vm, plan, run)
    assert read_iso(run.seed_image)[1]["user-data"] == b"#cloud-config\nusers: [default]\n"


def test_user_data_excludes_generated_keys(tmp_path: Path) -> None:
    with pytest.raises(DefinitionError) as error:
        machine(
            tmp_path,
            '[cloud_init]\nuser_data = "ud.yaml"\nssh_authorized_keys = []\nruncmd = ["x"]\n',
        )
    assert str(error.value).splitlines() == [
        f"{tmp_path}/vm1.toml: cloud_init.ssh_authorized_keys: cannot be combined with "
        "user_data (qvm uses that file as is), got [] (hint: put ssh_authorized_keys into "
        "the user_data file, or drop user_data)",
        f"{tmp_path}/vm1.toml: cloud_init.runcmd: cannot be combined with user_data (qvm "
        'uses that file as is), got ["x"] (hint: put runcmd into the user_data file, or '
        "drop user_data)",
    ]


def test_bad_cloud_init_values(tmp_path: Path) -> None:
    with pytest.raises(DefinitionError) as error:
        machine(
            tmp_path,
            '[cloud_init]\nuser = "Root"\nssh_authorized_keys = ["ssh-ed25519"]\n'
            'runcmd = [[]]\n[[disk]]\nfile = "x.raw"\nid = "cidata"\n',
        )
    lines = str(error.value).splitlines()
    assert lines[0].startswith(f"{tmp_path}/vm1.toml: cloud_init.user: must be a user name")
    assert lines[1] == (
        f"{tmp_path}/vm1.toml: cloud_init.ssh_authorized_keys[0]: is not a whole public key "
        'line (TYPE BASE64 [COMMENT]), got "ssh-ed25519" (hint: paste the whole line of the '
        ".pub file)"
    )
    assert lines[2] == (
        f"{tmp_path}/vm1.toml: cloud_init.runcmd[0]: must be a string or a non-empty list of "
        "strings, got []"
    )
    assert lines[3] == (
        f'{tmp_path}/vm1.toml: disk[0].id: already used by cloud_init (its seed disk), got "cidata"'
    )


def test_seed_is_attached_read_only_after_the_disks(tmp_path: Path) -> None:
    vm = machine(tmp_path, '[[disk]]\nbase = "b.qcow2"\n[cloud_init]\n')
    run = RunDir(Path("/run/qvm/vm1"))
    argv = build_argv(vm, LaunchInputs(accel="tcg", run_dir=run))
    seed = argv.index(
        "driver=file,node-name=cidata-file,filename=/run/qvm/vm1/seed.iso,read-only=on"
    )
    assert argv[seed - 1] == "-blockdev"
    assert argv[seed + 1 : seed + 5] == [
        "-blockdev",
        "driver=raw,node-name=cidata,file=cidata-file,read-only=on",
        "-device",
        "virtio-blk-pci,drive=cidata,id=cidata",
    ]
    assert argv.index("virtio-blk-pci,drive=disk0,id=disk0") < seed
    no_seed = machine(tmp_path, '[[disk]]\nbase = "b.qcow2"\n', name="vm2")
    assert "cidata" not in " ".join(build_argv(no_seed, LaunchInputs("tcg", run)))


def test_the_seed_mounts_the_shares_at_every_boot(tmp_path: Path) -> None:
    """Through vendor-data's bootcmd: cloud-init 22.4's ``mounts`` drops a line whose
    device is a virtiofs tag ("Ignoring nonexistent named mount fs0")."""
    import yaml  # the parser cloud-init itself uses

    from qvm.host.cloudinit import vendor_data_text
    from qvm.ops.up import share_mounts

    (tmp_path / "data").mkdir()
    vm = machine(
        tmp_path,
        f'[cloud_init]\nssh_authorized_keys = ["{KEY}"]\n'
        '[[share]]\nhost = "data"\nguest = "/srv/data"\n'
        '[[share]]\nhost = "data"\nguest = "/mnt/ro"\nreadonly = true\nvia = "9p"\n',
    )
    plan = plan_seed(vm, RunDir(tmp_path / "run"), home=tmp_path)._replace(mounts=share_mounts(vm))
    assert "mounts" not in yaml.safe_load(user_data_text(plan))
    bootcmd = yaml.safe_load(vendor_data_text(plan))["bootcmd"]
    assert [command[4:] for command in bootcmd] == [
        ["/srv/data", "fs0", "virtiofs", "defaults"],
        ["/mnt/ro", "fs1", "9p", "trans=virtio,version=9p2000.L,msize=512000,ro"],
    ]
    # what the guest runs: mkdir, then mount unless mounted (a fake mount records it)
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "mount").write_text(f'#!/bin/sh\necho "$@" >>{tmp_path}/mounted\n')
    (bin_dir / "mount").chmod(0o755)
    target = tmp_path / "guest" / "srv data"
    command = [*bootcmd[0][:4], str(target), *bootcmd[0][5:]]
    env = {"PATH": f"{bin_dir}:/usr/bin:/bin"}
    subprocess.run(command, check=True, env=env)
    assert target.is_dir()
    assert (tmp_path / "mounted").read_text() == f"-t virtiofs -o defaults -- fs0 {target}\n"
