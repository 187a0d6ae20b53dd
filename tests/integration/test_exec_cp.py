"""`qvm exec` and `qvm cp` against the real qemu-ga in the real test guest.

One VM serves the tests that leave it as they found it (``vm``, booted once for the
module); the ones that need a machine of their own (no agent, a VM killed mid-copy) boot
it through the ``qvm`` fixture. What the guest holds is checked in the guest itself
(sha256sum, stat, kill -0 through `qvm exec`)."""

from __future__ import annotations

import hashlib
import json
import os
import signal
import stat
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from framework.harness import (
    GUEST_DIR,
    Qvm,
    build_test_image,
    one_line_error,
    owned_qvm,
)
from framework.jsonschema_lite import validate
from framework.wait import wait_until

pytestmark = pytest.mark.integration

MiB = 1024**2


@pytest.fixture(scope="module")
def vm() -> Iterator[Qvm]:
    """A running test guest named vm1 whose agent answers; killed after the module."""
    if not (GUEST_DIR / "vmlinuz").exists():
        pytest.fail(f"no test guest in {GUEST_DIR} (run scripts/build-test-guest)")
    with owned_qvm() as harness:
        harness.guest_machine("vm1")
        harness("up", "vm1")
        harness("wait", "vm1", "--for", "agent", "--timeout", "120")
        yield harness


def guest_sha256(qvm: Qvm, path: str) -> str:
    return qvm("exec", "vm1", "--", "sha256sum", path).stdout.split()[0]


# --- exec ------------------------------------------------------------------------------


def test_exit_codes_are_the_commands(vm: Qvm) -> None:
    assert vm("exec", "vm1", "--", "true").returncode == 0
    done = vm("exec", "vm1", "--", "sh", "-c", "echo out; echo err >&2; exit 7", check=False)
    assert (done.returncode, done.stdout, done.stderr) == (7, "out\n", "err\n")
    result = json.loads(vm("exec", "vm1", "--json", "--", "sh", "-c", "exit 7", check=False).stdout)
    validate(result, "exec.json")
    assert (result["exit_code"], result["signal"], result["status"]) == (7, None, 7)


def test_a_signal_is_128_plus_it(vm: Qvm) -> None:
    done = vm("exec", "vm1", "--", "sh", "-c", "kill -9 $$", check=False)
    assert done.returncode == 128 + 9
    done = vm("exec", "vm1", "--json", "--", "sh", "-c", "kill -9 $$", check=False)
    result = json.loads(done.stdout)
    validate(result, "exec.json")
    assert (result["exit_code"], result["signal"], result["timed_out"]) == (None, 9, False)


def test_arguments_arrive_exactly_without_a_shell(vm: Qvm) -> None:
    words = ["a b", "it's", '"q"', "", "$HOME", "*", "back\\slash", "--", "-n"]
    done = vm("exec", "vm1", "--", "printf", "[%s]\\n", *words)
    assert done.stdout.splitlines() == [f"[{w}]" for w in words]


def test_the_programs_options_are_its_own(vm: Qvm) -> None:
    """`qvm exec VM ls -l` failed with "No such option: -l": no -- needed."""
    listed = vm("exec", "vm1", "ls", "-ld", "/tmp")
    assert listed.stdout.startswith("d"), listed.stdout


def test_large_binary_output_byte_for_byte(vm: Qvm) -> None:
    vm("exec", "vm1", "--", "sh", "-c", "head -c 6291456 /dev/urandom > /tmp/random")
    done = vm.run_bytes("exec", "vm1", "--", "cat", "/tmp/random")
    assert done.returncode == 0, done.stderr
    assert len(done.stdout) == 6 * MiB
    assert hashlib.sha256(done.stdout).hexdigest() == guest_sha256(vm, "/tmp/random")
    # --json carries output that is not text as base64 too
    done = vm.run_bytes("exec", "vm1", "--json", "--", "head", "-c", "4096", "/tmp/random")
    result = json.loads(done.stdout)
    validate(result, "exec.json")
    first = vm.run_bytes("exec", "vm1", "--", "head", "-c", "4096", "/tmp/random").stdout
    assert base64_decode(result["stdout_base64"]) == first


def base64_decode(text: str) -> bytes:
    import base64

    return base64.b64decode(text)


def test_env_adds_to_the_agents_environment(vm: Qvm) -> None:
    done = vm(
        "exec", "vm1", "--env", "FOO=a b", "--env", "EMPTY=", "--",
        "sh", "-c", 'printf "%s|%s|%s" "$FOO" "${EMPTY-unset}" "$PATH"',
    )  # fmt: skip
    foo, empty, path = done.stdout.split("|")
    assert (foo, empty) == ("a b", "")
    assert "/bin" in path.split(":")  # the agent's PATH is still there
    done = vm("exec", "vm1", "--env", "NOEQUALS", "--", "true", check=False)
    assert one_line_error(done) == "qvm: --env NOEQUALS: expected NAME=VALUE"
    assert done.returncode == 2


def test_stdin_reaches_the_command(vm: Qvm) -> None:
    data = bytes(range(256)) * 4096  # 1 MiB, every byte value
    done = vm.run_bytes("exec", "vm1", "--stdin", "--", "sha256sum", input=data)
    assert done.stdout.split()[0].decode() == hashlib.sha256(data).hexdigest()
    # without --stdin the command reads /dev/null, and qvm leaves its own stdin alone
    done = vm.run_bytes("exec", "vm1", "--", "wc", "-c", input=b"not sent")
    assert done.stdout.split()[0] == b"0"


def test_a_program_that_does_not_exist(vm: Qvm) -> None:
    done = vm("exec", "vm1", "--", "no-such-program", "arg", check=False)
    assert one_line_error(done) == (
        "qvm: vm1: cannot run no-such-program in the guest: No such file or directory"
    )
    assert done.stdout == ""
    assert done.returncode == 127  # as shells say it, not the 1 a program may exit with
    done = vm("exec", "vm1", "--", "/etc/hostname", check=False)  # there, not executable
    assert done.returncode == 126, done.stderr
    # the program's own codes pass through, whatever they are
    for code in (1, 2, 124, 125):
        assert vm("exec", "vm1", "--", "sh", "-c", f"exit {code}", check=False).returncode == code


def test_a_command_that_outlives_the_timeout_is_reported_still_running(vm: Qvm) -> None:
    started = time.monotonic()
    done = vm("exec", "vm1", "--timeout", "1", "--", "sleep", "30", check=False)
    assert time.monotonic() - started < 25  # not the 30 s of the sleep
    assert done.returncode == 124  # as timeout(1): out of the way of the program's own 4
    line = one_line_error(done)
    assert line.startswith("qvm: vm1: sleep still running in the guest after 1 s (--timeout)")
    pid = line.split("as pid ")[1].split()[0]
    # the guest agrees: it is still there, until we end it
    assert vm("exec", "vm1", "--", "kill", "-0", pid, check=False).returncode == 0
    vm("exec", "vm1", "--", "kill", pid)
    result = json.loads(
        vm("exec", "vm1", "--json", "--timeout", "0.5", "--", "sleep", "30", check=False).stdout
    )
    validate(result, "exec.json")
    assert (result["timed_out"], result["running"], result["exit_code"]) == (True, True, None)
    vm("exec", "vm1", "--", "kill", str(result["pid"]))


# --- cp -------------------------------------------------------------------------------------


def test_cp_round_trip_byte_for_byte_with_mode(vm: Qvm) -> None:
    local = vm.root / "data.bin"
    local.write_bytes(os.urandom(3 * MiB + 12345))
    local.chmod(0o640)
    digest = hashlib.sha256(local.read_bytes()).hexdigest()

    vm("cp", str(local), "vm1:/tmp/")  # a folder in the guest: the file keeps its name
    assert guest_sha256(vm, "/tmp/data.bin") == digest
    assert vm("exec", "vm1", "--", "stat", "-c", "%a", "/tmp/data.bin").stdout.strip() == "640"

    back = vm.root / "back"
    back.mkdir()
    result = vm.json("cp", "vm1:/tmp/data.bin", str(back))
    validate(result, "cp.json")
    copy = back / "data.bin"
    assert result["bytes"] == copy.stat().st_size == local.stat().st_size
    assert result["mode"] == "0640"
    assert hashlib.sha256(copy.read_bytes()).hexdigest() == digest
    assert stat.S_IMODE(copy.stat().st_mode) == 0o640
    assert sorted(p.name for p in back.iterdir()) == ["data.bin"]  # no temporary left

    vm("cp", "vm1:/tmp/data.bin", str(back / "renamed"))
    assert (back / "renamed").read_bytes() == local.read_bytes()


def guest_listing(vm: Qvm, folder: str) -> list[str]:
    return sorted(vm("exec", "vm1", "--", "ls", "-a", folder).stdout.split())


def test_cp_into_the_guest_through_a_part_file_with_an_owner(vm: Qvm) -> None:
    """The copy is written to a hidden part file and renamed into place: one that fails
    leaves no part file and the old target as it was; --owner gives it away."""
    vm("exec", "vm1", "--", "mkdir", "-p", "/tmp/own")
    local = vm.root / "notes.txt"
    local.write_text("new\n")
    local.chmod(0o640)
    vm("exec", "vm1", "--", "sh", "-c", "echo old > /tmp/own/notes.txt")
    refused = vm("cp", "--owner", "nobody-here", str(local), "vm1:/tmp/own/", check=False)
    assert refused.returncode == 1
    assert one_line_error(refused) == (
        "qvm: vm1:/tmp/own/notes.txt: cannot give it to nobody-here (no such user or group"
        " in the guest?); the partial copy was removed"
    )
    assert guest_listing(vm, "/tmp/own") == [".", "..", "notes.txt"]  # no part file left
    assert vm("exec", "vm1", "--", "cat", "/tmp/own/notes.txt").stdout == "old\n"
    vm("cp", "--owner", "65534:65534", str(local), "vm1:/tmp/own/notes.txt")
    owned = vm("exec", "vm1", "--", "stat", "-c", "%u:%g %a", "/tmp/own/notes.txt").stdout
    assert owned.strip() == "65534:65534 640"
    assert vm("exec", "vm1", "--", "cat", "/tmp/own/notes.txt").stdout == "new\n"
    bad = vm("cp", "--owner", "-x", str(local), "vm1:/tmp/own/", check=False)
    assert bad.returncode == 2 and "--owner: must be USER or USER:GROUP" in bad.stderr


def test_cp_r_copies_a_folder_into_the_guest_and_back(vm: Qvm) -> None:
    tree = vm.root / "tree"
    (tree / "sub").mkdir(parents=True)
    (tree / "a.txt").write_text("a\n")
    (tree / "sub" / "b.bin").write_bytes(os.urandom(1000))
    (tree / "sub" / "b.bin").chmod(0o600)
    plain = vm("cp", str(tree), "vm1:/tmp/", check=False)
    assert plain.returncode == 1 and "(hint: qvm cp -r copies a folder)" in plain.stderr
    vm("cp", "-r", str(tree), "vm1:/tmp/")  # an existing folder: the tree goes into it
    assert vm("exec", "vm1", "--", "cat", "/tmp/tree/a.txt").stdout == "a\n"
    digest = hashlib.sha256((tree / "sub" / "b.bin").read_bytes()).hexdigest()
    assert guest_sha256(vm, "/tmp/tree/sub/b.bin") == digest
    mode = vm("exec", "vm1", "--", "stat", "-c", "%a", "/tmp/tree/sub/b.bin").stdout.strip()
    assert mode == "600"
    assert guest_listing(vm, "/tmp/tree/sub") == [".", "..", "b.bin"]

    back = vm.root / "back-tree"
    plain_out = vm("cp", "vm1:/tmp/tree", str(back), check=False)
    assert plain_out.returncode == 1 and "(hint: qvm cp -r copies a folder)" in plain_out.stderr
    vm("cp", "-r", "vm1:/tmp/tree", str(back))  # not there yet: the folder becomes it
    assert (back / "a.txt").read_text() == "a\n"
    assert (back / "sub" / "b.bin").read_bytes() == (tree / "sub" / "b.bin").read_bytes()
    assert stat.S_IMODE((back / "sub" / "b.bin").stat().st_mode) == 0o600
    vm("cp", "-r", "vm1:/tmp/tree/sub", str(back))  # there: a folder of its name inside
    assert (back / "sub" / "b.bin").is_file() and sorted(os.listdir(back)) == ["a.txt", "sub"]


def test_cp_of_a_guest_path_that_does_not_exist(vm: Qvm) -> None:
    out = vm.root / "missing"
    out.mkdir()
    done = vm("cp", "vm1:/no/such/file", str(out), check=False)
    assert (
        one_line_error(done) == "qvm: vm1:/no/such/file: No such file or directory (in the guest)"
    )
    assert list(out.iterdir()) == []
    local = vm.root / "small"
    local.write_text("x")
    done = vm("cp", str(local), "vm1:/no/such/dir/file", check=False)
    assert one_line_error(done) == (
        "qvm: vm1:/no/such/dir/file: No such file or directory (in the guest)"
    )


def test_cp_needs_exactly_one_vm_side(vm: Qvm) -> None:
    done = vm("cp", "a", "b", check=False)
    assert "one of them must be NAME:PATH" in one_line_error(done)
    assert done.returncode == 2


# --- machines of their own --------------------------------------------------------------


def test_agent_not_configured(qvm: Qvm) -> None:
    qvm.guest_machine("noagent", extra="\n[agent]\nenabled = false\n")
    qvm("up", "noagent")
    local = qvm.root / "f"
    local.write_text("x")
    for args in (
        ("exec", "noagent", "--", "true"),
        ("cp", str(local), "noagent:/tmp/f"),
        ("cp", "noagent:/etc/hostname", str(qvm.root)),
    ):
        done = qvm(*args, check=False)
        assert one_line_error(done).startswith("qvm: noagent: guest agent not configured"), args
    assert not (qvm.root / "hostname").exists()
    qvm("kill", "noagent")


def test_a_vm_killed_mid_copy_leaves_nothing_on_the_host(qvm: Qvm) -> None:
    qvm.guest_machine("dying")
    qvm("up", "dying")
    qvm("wait", "dying", "--for", "agent", "--timeout", "120")
    # about 1.5 s to read at the ~13 MB/s the agent manages under TCG
    qvm("exec", "dying", "--", "sh", "-c", "head -c 20971520 /dev/zero > /tmp/big")
    out = qvm.root / "out"
    out.mkdir()
    with qvm.background("cp", "dying:/tmp/big", str(out)) as copy:
        # the copy is under way once its temporary file is there
        wait_until(lambda: any(out.iterdir()), 60, "the copy's temporary file")
        qvm("kill", "dying")
        stdout, stderr = copy.communicate(timeout=60)
    assert copy.returncode == 1, stdout
    lines = stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in stderr, stderr
    assert lines[0].startswith("qvm: dying: guest agent channel closed")
    assert lines[0].endswith(f"; {out / 'big'} not written")
    assert list(out.iterdir()) == []


def test_ctrl_c_mid_copy_into_the_guest_leaves_the_old_target(vm: Qvm) -> None:
    """Ctrl-C left a partial, world-writable file over the old one and said only
    "interrupted": the part file is removed, and the target is as it was."""
    vm("exec", "vm1", "--", "sh", "-c", "mkdir -p /tmp/cut && echo old > /tmp/cut/big")
    local = vm.root / "big"
    local.write_bytes(os.urandom(24 * MiB))  # ~8 s at the ~3 MB/s the agent writes
    with vm.background("cp", str(local), "vm1:/tmp/cut/big") as copy:
        time.sleep(3)  # under way: the agent is the copy's, nothing else can look
        copy.send_signal(signal.SIGINT)
        _, stderr = copy.communicate(timeout=60)
    assert copy.returncode == 130
    assert stderr == (
        "qvm: vm1:/tmp/cut/big: interrupted; the partial copy was removed, the target is as"
        " it was\n"
    )
    listing = vm("exec", "vm1", "--", "ls", "-a", "/tmp/cut").stdout.split()
    assert sorted(listing) == [".", "..", "big"]
    assert vm("exec", "vm1", "--", "cat", "/tmp/cut/big").stdout == "old\n"


@pytest.mark.timeout(1200)
def test_exec_and_cp_in_the_debian_image(qvm: Qvm, tmp_path: Path) -> None:
    """The Debian test image installs qemu-guest-agent (scripts/build-test-image); udev
    starts it when the port appears, and systemd's environment is the one commands get."""
    image = build_test_image()
    assert "qemu-guest-agent" in json.loads((image / "image.json").read_text())["packages"]
    env_home = tmp_path / "home"  # no ~/.ssh keys: qvm makes the VM's own pair
    qvm.machines_dir.mkdir(parents=True, exist_ok=True)
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("HOME", str(env_home))
        qvm(
            "--machines", str(qvm.machines_dir), "new", "deb",
            "--image", str(image / "disk.qcow2"), "--kernel", str(image / "vmlinuz"),
            "--initrd", str(image / "initrd.img"), "--append", "root=/dev/vda rw console=ttyS0",
        )  # fmt: skip
        qvm("up", "deb")
        qvm("wait", "deb", "--for", "agent", "--timeout", "600", timeout=660)
        assert "bookworm" in qvm("exec", "deb", "--", "cat", "/etc/os-release").stdout
        done = qvm("exec", "deb", "--env", "QVM_X=1 2", "--", "sh", "-c", 'echo "$QVM_X:$PATH"')
        value, path = done.stdout.strip().split(":", 1)
        assert value == "1 2" and "/usr/bin" in path.split(":")
        assert qvm("exec", "deb", "--", "sh", "-c", "exit 3", check=False).returncode == 3

        local = tmp_path / "payload"
        local.write_bytes(os.urandom(MiB + 7))
        local.chmod(0o600)
        qvm("cp", str(local), "deb:/root/payload")
        digest = hashlib.sha256(local.read_bytes()).hexdigest()
        assert qvm("exec", "deb", "--", "sha256sum", "/root/payload").stdout.split()[0] == digest
        assert qvm("exec", "deb", "--", "stat", "-c", "%a", "/root/payload").stdout.strip() == "600"
        qvm("cp", "deb:/root/payload", str(tmp_path / "back"))
        assert (tmp_path / "back").read_bytes() == local.read_bytes()
        qvm("kill", "deb")


def test_an_agent_stopped_in_the_guest_is_one_line_and_nothing_is_written(
    vm: Qvm, tmp_path: Path
) -> None:
    """qemu-ga SIGSTOPped inside the guest (typed on its console): exec and cp each say in
    one line that the agent does not answer; the host file is not created."""
    vm("console", "vm1", input="kill -STOP $(pidof qemu-ga)\n")
    try:
        for args in (
            ("exec", "vm1", "--", "true"),
            ("cp", "vm1:/etc/hostname", str(tmp_path / "copy")),
        ):
            started = time.monotonic()
            line = one_line_error(vm(*args, check=False, timeout=120))
            assert "guest agent not answering" in line, (args, line)
            assert time.monotonic() - started < 60, args
        assert not (tmp_path / "copy").exists()
        assert list(tmp_path.iterdir()) == []
    finally:
        vm("console", "vm1", input="kill -CONT $(pidof qemu-ga)\n")
    vm("wait", "vm1", "--for", "agent", "--timeout", "60")
    assert vm("exec", "vm1", "--", "echo", "back").stdout == "back\n"
