"""`qvm up --foreground`: the supervisor in the calling process. It says "ready" on
stdout and to systemd's notify socket, other commands work on its VM, SIGTERM powers the
guest off (the guest's own word on its console) and exits 0, Ctrl-C reaches only it, and
the exit status tells a crash and a kill apart. Nothing of the VM is left afterwards."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest
from framework.harness import QVM_BIN, Qvm
from framework.wait import wait_until

pytestmark = pytest.mark.integration


@contextmanager
def foreground(
    qvm: Qvm, *args: str, notify: Path | None = None, session: bool = False
) -> Iterator[subprocess.Popen[str]]:
    """`qvm up --foreground vm1 ARGS` running, once it has said "ready" on stdout."""
    qvm.guest_machine("vm1", max=1)
    env = qvm.env()
    if notify is not None:
        env["NOTIFY_SOCKET"] = str(notify)
    process = subprocess.Popen(
        [str(QVM_BIN), "up", "--foreground", "vm1", *args],
        env=env,
        cwd=qvm.root,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=session,
    )
    qvm.started.add("vm1")
    try:
        assert process.stdout is not None
        ready = process.stdout.readline()
        assert ready.startswith("vm1: ready (QEMU pid "), (ready, process.stderr)
        yield process
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()


def ended(process: subprocess.Popen[str]) -> tuple[int, str, str]:
    stdout, stderr = process.communicate(timeout=60)
    return process.returncode, stdout, stderr


def test_sigterm_powers_the_guest_off_and_exits_0(qvm: Qvm) -> None:
    notify = qvm.root / "notify.sock"
    manager = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    manager.bind(str(notify))
    manager.settimeout(30)
    with manager, foreground(qvm, notify=notify) as process:
        assert manager.recv(64) == b"READY=1"
        # the supervisor is this very process, and every other command works on its VM
        status = qvm.status("vm1")
        assert status["state"] == "running"
        assert status["supervisor_pid"] == process.pid
        qvm("wait", "vm1", "--for", "agent", "--timeout", "60")
        assert qvm("exec", "vm1", "--", "echo", "hi there").stdout == "hi there\n"
        process.send_signal(signal.SIGCONT)  # Slurm's scancel sends it first: nothing
        process.send_signal(signal.SIGTERM)
        assert manager.recv(64) == b"STOPPING=1"
        code, stdout, stderr = ended(process)
    assert code == 0, stderr
    assert "vm1: stopped: the guest powered off" in stdout
    assert "QVM-GUEST-POWEROFF" in qvm.serial("vm1").text()  # the guest's own word
    last = qvm.status("vm1")
    assert last["state"] == "stopped"
    assert last["last_exit"]["ended_by"] == "acpi"
    assert qvm.processes() == []


def test_ctrl_c_at_its_terminal_is_a_stop_not_qemus_death(qvm: Qvm) -> None:
    # the terminal sends SIGINT to the whole foreground process group: QEMU has its own
    with foreground(qvm, "--stop-timeout", "4", session=True) as process:
        os.killpg(process.pid, signal.SIGINT)
        code, stdout, stderr = ended(process)
    assert code == 0, stderr
    last = qvm.status("vm1")["last_exit"]
    assert last["signal"] is None, last  # not "QEMU stopped by a signal"
    assert last["ended_by"] in ("acpi", "agent", "quit"), last
    assert qvm.processes() == []


def test_a_crash_and_a_kill_have_their_own_exit_status(qvm: Qvm) -> None:
    with foreground(qvm) as process:
        pid = qvm.status("vm1")["pid"]
        os.kill(pid, signal.SIGKILL)  # not asked through qvm: a crash
        code, _, stderr = ended(process)
    assert code == 10, stderr
    assert "vm1: crashed: killed by SIGKILL" in stderr
    with foreground(qvm) as process:
        qvm("kill", "vm1")
        code, _, stderr = ended(process)
    assert code == 12, stderr
    wait_until(lambda: not qvm.processes(), 10, "nothing of vm1 left")


def test_foreground_takes_one_vm_and_no_restore(qvm: Qvm) -> None:
    qvm.guest_machine("vm1", max=1)
    for args in (["vm1", "vm2"], ["vm1", "--restore", "t"], ["vm1", "--json"]):
        done = qvm("up", "--foreground", *args, check=False)
        assert done.returncode == 2, (args, done.stderr)
        assert done.stderr.startswith("qvm: qvm up --foreground: "), done.stderr
