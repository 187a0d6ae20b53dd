"""Fixed host ports and forwards records, ssh command lines, wait conditions, reset/rm,
the image-lock pre-flight: everything around reaching a test VM that needs no QEMU."""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import os
import socket
import struct
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from framework.fake_qmp import state_json

from qvm.base.jsonfile import write_json_atomic
from qvm.control.forwards import _matches
from qvm.definition.forwards import expand_shorthand
from qvm.definition.load import load_machine
from qvm.errors import HostError, QvmError, VmStateError
from qvm.host.holders import image_conflicts, image_records
from qvm.host.ports import port_in_use
from qvm.layout.locks import try_lock
from qvm.layout.rundir import RunDir
from qvm.ops.access import SshTarget, parse_condition, ssh_argv, ssh_target, wait_ready
from qvm.ops.files import remove, reset
from qvm.ops.guest import default_owner
from qvm.ops.up import _check_fixed_ports
from qvm.store.forwards import read_forwards
from qvm.store.launch import Image, LaunchRecord

FWD22 = {
    "nic": "net0",
    "proto": "tcp",
    "host_addr": "127.0.0.1",
    "host_port": 40123,
    "guest_port": 22,
}


def make_run(tmp_path: Path, name: str = "vm1", **launch: object) -> RunDir:
    run = RunDir(tmp_path / "state" / name)
    run.path.mkdir(parents=True)
    write_json_atomic(run.launch_file, {"name": name, "argv": ["qemu"], **launch})
    return run


@contextlib.contextmanager
def running(run: RunDir) -> Iterator[None]:
    """``run``'s lock held, as its live supervisor holds it."""
    fd = try_lock(run.lock_file)
    assert fd is not None
    try:
        yield
    finally:
        os.close(fd)


# --- ports ---------------------------------------------------------------------------------


def test_a_taken_fixed_port_names_its_holder_and_port_zero_is_left_to_qemu(
    tmp_path: Path,
) -> None:
    with socket.socket() as holder:
        holder.bind(("127.0.0.1", 0))
        holder.listen()
        taken = holder.getsockname()[1]
        assert port_in_use("127.0.0.1", taken, "tcp")
        path = tmp_path / "vm1.toml"
        path.write_text(f'[[nic]]\nforwards = ["tcp:0:22", "tcp:{taken}:80"]\n')
        with pytest.raises(HostError) as error:
            _check_fixed_ports(load_machine(path))
        assert str(error.value) == (
            f"{path}: nic[0].forwards[1]: tcp port 127.0.0.1:{taken} is already in use by "
            f"pid {os.getpid()} ({_my_name()}) (hint: pick another host port, or 0 for any "
            "free one)"
        )
    # port 0 is not probed: QEMU binds it (qvm.host.usernet reads it back)
    path.write_text('[[nic]]\nforwards = ["tcp:0:22", "udp:0:53"]\n')
    _check_fixed_ports(load_machine(path))


def _my_name() -> str:
    import psutil

    return psutil.Process().name()


def current_forwards(run: RunDir) -> list[dict[str, Any]]:
    return [forward.to_json() for forward in read_forwards(run)]


def test_forwards_record_belongs_to_one_qemu_run(tmp_path: Path) -> None:
    run = make_run(tmp_path, forwards=[FWD22])
    write_json_atomic(run.state_file, state_json(10, 5))
    assert current_forwards(run) == [FWD22]
    extra = {**FWD22, "host_port": 40124, "guest_port": 80}
    write_json_atomic(
        run.forwards_file, {"qemu_pid": 10, "qemu_start_time": 5, "forwards": [FWD22, extra]}
    )
    assert current_forwards(run) == [FWD22, extra]
    # QEMU restarted (another start time): only its argv's forwards hold
    write_json_atomic(run.state_file, state_json(10, 6))
    assert current_forwards(run) == [FWD22]


@pytest.mark.parametrize(
    ("text", "matches"),
    [
        ("40123", True),
        ("tcp:40123", True),
        ("udp:40123", False),
        ("tcp:127.0.0.1:40123", True),
        ("tcp:0.0.0.0:40123", False),
        ("tcp:40123:22", True),
        ("tcp:40123:23", False),
        ("tcp:127.0.0.1:40123:22", True),
        ("40124", False),
    ],
)
def test_port_del_matches_a_forward_or_a_host_port(text: str, matches: bool) -> None:
    assert _matches(FWD22, text, None) is matches


# --- ssh ------------------------------------------------------------------------------------


def test_ssh_argv_has_port_user_key_and_per_vm_known_hosts() -> None:
    target = SshTarget(
        "vm1", "qvm", "127.0.0.1", 40123, (Path("/s/vm1/id_ed25519"),), Path("/s/vm1/known_hosts")
    )
    assert ssh_argv(target, ["uname", "-r"]) == [
        "ssh",
        "-p",
        "40123",
        "-o",
        "UserKnownHostsFile=/s/vm1/known_hosts",
        "-o",
        "StrictHostKeyChecking=accept-new",
        "-o",
        "HostKeyAlias=qvm-vm1",
        "-o",
        "CheckHostIP=no",
        "-o",
        "LogLevel=ERROR",
        "-i",
        "/s/vm1/id_ed25519",
        "-o",
        "IdentitiesOnly=yes",
        "-o",
        "BatchMode=yes",  # a command: no password prompts, a refused key fails at once
        "--",
        "qvm@127.0.0.1",
        "uname -r",  # one line for the remote shell, each word quoted (test_json_schemas.py)
    ]
    bare = SshTarget("vm1", None, "127.0.0.1", 2222, (), Path("/k"))
    argv = ssh_argv(bare, batch=True, user="root")
    assert "IdentitiesOnly=yes" not in argv and "-i" not in argv
    assert argv[-2:] == ["--", "root@127.0.0.1"]
    assert "BatchMode=yes" in argv
    assert "BatchMode=yes" not in ssh_argv(bare)  # an interactive login may ask


def test_ssh_target_uses_the_forward_to_port_22(tmp_path: Path) -> None:
    run = make_run(
        tmp_path,
        forwards=[{**FWD22, "guest_port": 80, "host_port": 1}, {**FWD22, "host_addr": "0.0.0.0"}],
        ssh={"user": "dev", "identities": ["/k/id"]},
    )
    target = ssh_target(run)
    assert (target.user, target.host, target.port) == ("dev", "127.0.0.1", 40123)
    assert target.identities == (Path("/k/id"),)
    assert target.known_hosts == run.path / "known_hosts"
    no_ssh = make_run(tmp_path, name="vm2", forwards=[])
    with pytest.raises(HostError, match="vm2: no port forward to guest port 22"):
        ssh_target(no_ssh)


def test_wait_conditions() -> None:
    assert parse_condition("ssh") == ("ssh", None)
    assert parse_condition("qmp") == ("qmp", None)
    assert parse_condition("serial:login: $") == ("serial", "login: $")
    with pytest.raises(QvmError, match="--for must be ssh, qmp, agent or serial:REGEX, got 'tcp'"):
        parse_condition("tcp")
    with pytest.raises(QvmError, match="not a regular expression"):
        parse_condition("serial:(")


# --- reset and rm ------------------------------------------------------------------------------


def test_reset_removes_overlays_seed_and_known_hosts_only(tmp_path: Path) -> None:
    run = make_run(tmp_path)
    base = tmp_path / "base.qcow2"
    base.write_bytes(b"base")
    for name in (
        "disk0.qcow2",
        "disk1.qcow2",
        "seed.iso",
        "user-data",
        "meta-data",
        "known_hosts",
        "forwards.json",
        "serial.log",
        "state.json",
        "id_ed25519",
    ):
        (run.path / name).write_text("x")
    removed = reset(run)
    assert sorted(p.name for p in removed.files) == [
        "disk0.qcow2",
        "disk1.qcow2",
        "forwards.json",
        "known_hosts",
        "meta-data",
        "seed.iso",
        "user-data",
    ]
    assert sorted(p.name for p in run.path.iterdir()) == [
        "id_ed25519",
        "launch.json",
        "serial.log",
        "state.json",
    ]
    assert base.read_bytes() == b"base"


def test_reset_and_rm_refuse_a_running_vm(tmp_path: Path) -> None:
    run = make_run(tmp_path)
    with running(run):
        with pytest.raises(VmStateError, match=r"vm1: is running; reset needs it stopped"):
            reset(run)
        with pytest.raises(VmStateError, match=r"vm1: is running; rm needs it stopped"):
            remove(run, purge=True)


def test_rm_purge_removes_only_what_qvm_made(tmp_path: Path, monkeypatch) -> None:  # noqa: ANN001
    cache = tmp_path / "cache"
    monkeypatch.setenv("QVM_CACHE_DIR", str(cache))
    (cache / "images").mkdir(parents=True)
    mine = cache / "images" / "k1-debian.qcow2"
    shared = cache / "images" / "k2-ubuntu.qcow2"
    local_base = tmp_path / "local.qcow2"
    for image in (mine, shared, local_base):
        image.write_bytes(b"image")
    images = [{"path": str(p), "writable": False} for p in (mine, shared, local_base)]
    run = make_run(tmp_path, images=images)
    make_run(tmp_path, name="other", images=[{"path": str(shared), "writable": False}])
    machine_file = tmp_path / "machines" / "vm1.toml"
    machine_file.parent.mkdir()
    machine_file.write_text("[memory]\n")
    digest = hashlib.sha256(b"[memory]\n").hexdigest()
    (run.path / "new.json").write_text(
        json.dumps({"machine_file": str(machine_file), "sha256": digest})
    )
    removed = remove(run, purge=True)
    assert sorted(removed.files) == sorted([machine_file, mine, run.path])
    assert removed.kept == [(shared, "used by other")]
    assert shared.exists() and local_base.exists() and not mine.exists()


def test_rm_purge_keeps_a_machine_file_changed_since_new(tmp_path: Path) -> None:
    run = make_run(tmp_path)
    machine_file = tmp_path / "vm1.toml"
    machine_file.write_text("[memory]\nsize = '2G'\n")
    (run.path / "new.json").write_text(
        json.dumps({"machine_file": str(machine_file), "sha256": "0" * 64})
    )
    removed = remove(run, purge=True)
    assert removed.kept == [(machine_file, "changed since qvm new wrote it")]
    assert machine_file.exists() and not run.path.exists()


def test_rm_without_purge_keeps_the_machine_file(tmp_path: Path) -> None:
    run = make_run(tmp_path)
    machine_file = tmp_path / "vm1.toml"
    machine_file.write_text("")
    (run.path / "new.json").write_text(
        json.dumps({"machine_file": str(machine_file), "sha256": hashlib.sha256(b"").hexdigest()})
    )
    assert remove(run, purge=False).files == [run.path]
    assert machine_file.exists()


# --- pre-flight: images another QEMU holds ---------------------------------------------------


def test_image_records_fall_back_to_argv() -> None:
    argv = [
        "qemu",
        "-blockdev",
        "driver=file,node-name=d-file,filename=/i/a.raw",
        "-blockdev",
        "driver=file,node-name=s-file,filename=/r/seed.iso,read-only=on",
    ]
    older = LaunchRecord.from_json({"name": "vm1", "argv": argv}, "launch.json")
    assert image_records(older) == (Image("/i/a.raw", True), Image("/r/seed.iso", False))
    listed = older._replace(images=(Image("/x", False),))
    assert image_records(listed) == (Image("/x", False),)


def test_image_used_by_another_running_vm_is_named(tmp_path: Path) -> None:
    image = tmp_path / "shared.raw"
    image.write_bytes(b"")
    other = make_run(tmp_path, name="builder", images=[{"path": str(image), "writable": True}])
    mine = RunDir(tmp_path / "state" / "vm1")
    assert image_conflicts([("disk[0].base", image, False)], mine) == []  # not running
    with running(other):
        assert image_conflicts([("disk[0].base", image, False)], mine) == [
            ("disk[0].base", image, "VM builder (hint: qvm down builder)")
        ]


def test_base_images_may_be_shared_by_readers(tmp_path: Path) -> None:
    image = tmp_path / "base.qcow2"
    image.write_bytes(b"")
    other = make_run(tmp_path, name="other", images=[{"path": str(image), "writable": False}])
    with running(other):
        mine = RunDir(tmp_path / "state" / "vm1")
        assert image_conflicts([("disk[0].base", image, False)], mine) == []
        conflicts = image_conflicts([("disk[0].file", image, True)], mine)
        assert conflicts == [("disk[0].file", image, "VM other (hint: qvm down other)")]


def test_qemu_style_lock_held_outside_qvm_is_seen(tmp_path: Path) -> None:
    image = tmp_path / "busy.raw"
    image.write_bytes(b"")
    mine = RunDir(tmp_path / "state" / "vm1")
    assert image_conflicts([("disk[0].file", image, True)], mine) == []
    # as a QEMU writing the image does: a shared lock on byte 100 + BLK_PERM_WRITE (1)
    fd = os.open(image, os.O_RDWR)
    try:
        lock = struct.pack("hhqqi4x", fcntl.F_RDLCK, os.SEEK_SET, 101, 1, 0)
        fcntl.fcntl(fd, fcntl.F_OFD_SETLK, lock)
        conflicts = image_conflicts([("disk[0].base", image, False)], mine)
        assert conflicts == [
            ("disk[0].base", image, "another process (hint: 'lslocks' or 'fuser' shows which)")
        ]
    finally:
        os.close(fd)
    assert image_conflicts([("disk[0].file", image, True)], mine) == []


def test_this_vms_own_qemu_is_left_out_of_the_lock_check(tmp_path: Path) -> None:
    """`qvm disk attach --persist`, then `qvm restart`: the restart plans (and checks
    the images) while the VM still runs, and its own QEMU holds the attached image."""
    image = tmp_path / "data.qcow2"
    image.write_bytes(b"")
    mine = make_run(tmp_path)
    state = {
        "name": "vm1",
        "machine_file": None,
        "accel": "tcg",
        "accel_reason": None,
        "supervisor_pid": os.getpid(),
        "supervisor_start_time": None,
        "state": "running",
        "restarts": 0,
        "exit": None,
        "crash_reason": None,
        "qemu_pid": os.getpid(),  # this process stands for the VM's QEMU
    }
    write_json_atomic(mine.state_file, state)
    fd = os.open(image, os.O_RDWR)  # as QEMU holds a disk it writes
    try:
        lock = struct.pack("hhqqi4x", fcntl.F_RDLCK, os.SEEK_SET, 101, 1, 0)
        fcntl.fcntl(fd, fcntl.F_OFD_SETLK, lock)
        with running(mine):
            assert image_conflicts([("disk[1].file", image, True)], mine) == []
        # the same lock when this VM is not running: someone else's
        assert image_conflicts([("disk[1].file", image, True)], mine) == [
            ("disk[1].file", image, "another process (hint: 'lslocks' or 'fuser' shows which)")
        ]
    finally:
        os.close(fd)


# --- qvm wait -------------------------------------------------------------------------------


def test_waiting_for_ssh_without_a_forward_to_port_22_fails_at_once(tmp_path: Path) -> None:
    """The README's demo VM has no forward to guest port 22: no login can ever work."""
    run = make_run(tmp_path, forwards=[{**FWD22, "guest_port": 80}])
    started = time.monotonic()
    with running(run), pytest.raises(HostError, match="no port forward to guest port 22"):
        wait_ready(run, "ssh", None, timeout=20)
    assert time.monotonic() - started < 5


def test_wait_shows_the_last_probe_problem_and_progress_lines(
    capsys: pytest.CaptureFixture[str],
) -> None:
    from qvm.cli.commands.dev import WaitReport
    from qvm.cli.progress import Spinner

    spinner = Spinner("vm1: waiting for an SSH login")
    spinner.enabled = False  # not a terminal: a CI log
    report = WaitReport(spinner, every=0.0)
    report.tick("qvm@127.0.0.1: Permission denied (publickey).")
    assert capsys.readouterr().err == (
        "vm1: waiting for an SSH login: still waiting after 0 s"
        " (last: qvm@127.0.0.1: Permission denied (publickey).)\n"
    )
    report.every = 3600.0
    report.tick("")
    report.tick("")
    assert capsys.readouterr().err.count("still waiting") == 1  # then not before an hour
    spinner.enabled = True  # a terminal: the spinner's own line says it
    report.tick("x" * 200)
    assert spinner.label == "vm1: waiting for an SSH login (last: " + "x" * 77 + "...)"


def test_port_add_shorthands_forward_one_port_to_the_same_port() -> None:
    """`qvm port add VM 8080` and `tcp:8080`, as users type them."""
    assert expand_shorthand("8080") == "tcp:8080:8080"
    assert expand_shorthand("tcp:8080") == "tcp:8080:8080"
    assert expand_shorthand("UDP:5353") == "UDP:5353:5353"
    for spelled_out in ("tcp:0:22", "tcp:127.0.0.1:2222:22", "http:80", "x", "tcp:auto:22"):
        assert expand_shorthand(spelled_out) == spelled_out


def test_a_copy_into_the_login_users_home_is_theirs_by_default(tmp_path: Path) -> None:
    """`qvm cp` wrote as the agent's root: the login user could not read a 0640 copy."""
    run = make_run(tmp_path, ssh={"user": "dev", "identities": []})
    assert default_owner(run, "/home/dev/notes.txt") == "dev:"
    assert default_owner(run, "/home/dev/a/b/") == "dev:"
    for elsewhere in ("/tmp/x", "/home/devil/x", "/home/dev/../root/x", "/root/x"):
        assert default_owner(run, elsewhere) is None, elsewhere
    assert default_owner(make_run(tmp_path, name="vm2"), "/home/dev/x") is None  # no user
