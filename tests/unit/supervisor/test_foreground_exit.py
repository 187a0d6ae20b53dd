"""`qvm up --foreground`'s exit status from the exit record, and its notify message."""

from __future__ import annotations

import socket
from pathlib import Path

import pytest

from qvm.errors import EXIT_FAILURE, EXIT_VM_CRASHED, EXIT_VM_KILLED, EXIT_VM_PANICKED
from qvm.store.state import ExitRecord
from qvm.supervisor.foreground import announce_end, exit_status, sd_notify


def ending(reason: str, failed: bool, ended_by: str | None = None, **more: object) -> ExitRecord:
    fields: dict[str, object] = {"ran_seconds": 5.0, **more}
    return ExitRecord(None, None, reason, failed, 1.0, ended_by=ended_by, **fields)  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("record", "status"),
    [
        (ending("the guest powered off", False), 0),
        (ending("the guest powered off", False, "acpi"), 0),
        (ending("quit over QMP", False, "quit"), 0),
        (ending("killed by SIGKILL (qvm kill)", False, "kill"), EXIT_VM_KILLED),
        (ending("killed by SIGKILL", True), EXIT_VM_CRASHED),
        (ending("KVM internal error (see qvm logs --qemu)", True), EXIT_VM_CRASHED),
        (ending("guest panic", True), EXIT_VM_PANICKED),
        (ending("QEMU exited with code 1 while starting", True, stderr_tail=("x",)), 1),
        (ending("could not start qemu: No such file", True, ran_seconds=None), 1),
        (None, EXIT_FAILURE),
    ],
)
def test_the_exit_status_says_how_the_vm_ended(record: ExitRecord | None, status: int) -> None:
    assert exit_status(record) == status


def test_the_last_line_goes_to_stderr_for_a_failure(capfd: pytest.CaptureFixture[str]) -> None:
    assert announce_end("vm1", ending("guest panic", True)) == EXIT_VM_PANICKED
    out, err = capfd.readouterr()
    assert (out, err) == ("", "qvm: vm1: crashed: guest panic\n")
    assert announce_end("vm1", ending("the guest powered off", False)) == 0
    assert capfd.readouterr().out == "vm1: stopped: the guest powered off\n"


def test_ready_goes_to_the_notify_socket(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = tmp_path / "notify"
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as manager:
        manager.bind(str(path))
        monkeypatch.setenv("NOTIFY_SOCKET", str(path))
        sd_notify("READY=1")
        assert manager.recv(64) == b"READY=1"
    sd_notify("READY=1")  # a manager that went away: nothing happens
    monkeypatch.delenv("NOTIFY_SOCKET")
    sd_notify("READY=1")
