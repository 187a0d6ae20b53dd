"""The pure parts of `qvm exec` and `qvm cp`: reading the agent's replies, building its
requests, the poll schedule, NAME:PATH, --env, and the host-side write that is renamed
into place only when complete. The real agent is in tests/integration/test_exec_cp.py."""

from __future__ import annotations

import base64
import os
import stat
from pathlib import Path

import pytest

from qvm.control.guest_exec import (
    FIRST_POLL,
    LONGEST_POLL,
    ExecStatus,
    exec_arguments,
    poll_delays,
    spawn_failure,
)
from qvm.control.guest_files import is_directory_error, open_error, parse_stat
from qvm.errors import (
    EXIT_TIMEOUT,
    AgentCommandError,
    AgentError,
    AgentNotAnswering,
    AgentNotConfigured,
    QvmError,
)
from qvm.ops.guest import _replacing, local_target, parse_env, parse_environ, split_remote


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


def test_status_of_a_command_that_exited() -> None:
    reply = {
        "exited": True,
        "exitcode": 7,
        "out-data": b64(b"\x00\xffout\n"),
        "err-data": b64(b"err"),
        "out-truncated": False,
        "err-truncated": True,
    }
    status = ExecStatus.from_reply(reply, "vm1")
    assert status == ExecStatus(True, 7, None, b"\x00\xffout\n", b"err", False, True)
    assert status.status == 7


def test_status_of_a_signal_is_128_plus_it_as_shells_say() -> None:
    status = ExecStatus.from_reply({"exited": True, "signal": 9}, "vm1")
    assert (status.exit_code, status.signal, status.status) == (None, 9, 137)
    assert status.stdout == status.stderr == b""


def test_status_of_a_running_command() -> None:
    status = ExecStatus.from_reply({"exited": False}, "vm1")
    assert not status.exited and status.exit_code is None


@pytest.mark.parametrize(
    "reply",
    [None, [], {}, {"exited": "yes"}, {"exited": True, "out-data": "not base64!"}],
)
def test_a_reply_that_is_not_a_status_is_an_agent_error(reply: object) -> None:
    with pytest.raises(AgentError, match="^vm1: guest-exec-status: "):
        ExecStatus.from_reply(reply, "vm1")


def test_exec_arguments_keep_every_word_and_use_no_shell() -> None:
    argv = ["printf", "%s\n", "a b", "it's", '"q"', "", "$HOME", "*"]
    arguments = exec_arguments(argv)
    assert arguments == {"path": "printf", "arg": argv[1:], "capture-output": True}


def test_exec_arguments_env_and_stdin() -> None:
    arguments = exec_arguments(["cat"], {"A": "1 2", "B": ""}, b"\x00\xff")
    assert arguments["env"] == ["A=1 2", "B="]
    assert base64.b64decode(arguments["input-data"]) == b"\x00\xff"
    with pytest.raises(ValueError):
        exec_arguments([])


def test_polls_start_fast_and_back_off_to_a_ceiling() -> None:
    delays = poll_delays()
    first = [next(delays) for _ in range(40)]
    assert first[0] == FIRST_POLL <= 0.005
    assert first == sorted(first)
    assert first[-1] == LONGEST_POLL
    assert sum(first[:5]) < 0.1  # a command over in 50 ms is seen within a few polls


def test_why_a_program_could_not_start() -> None:
    desc = (
        "Guest agent command failed, error was 'Failed to execute child process “nope”"
        " (No such file or directory)'"
    )
    assert spawn_failure(desc) == "No such file or directory"
    assert spawn_failure("Guest agent command failed, error was 'odd'") == "odd"


def test_stat_lines() -> None:
    assert parse_stat("755 5556 regular file\n") == (0o755, 5556, "regular file")
    assert parse_stat("1777 40 directory") == (0o1777, 40, "directory")
    assert parse_stat("") is None
    assert parse_stat("rwx 1 x") is None


def test_a_guest_path_that_cannot_be_opened_names_vm_and_path() -> None:
    desc = "failed to open file '/no/such' (mode: 'r'): No such file or directory"
    error = open_error("vm1", "/no/such", AgentCommandError("x", "GenericError", desc))
    assert str(error) == "vm1:/no/such: No such file or directory (in the guest)"
    desc = "failed to open file '/tmp' (mode: 'w'): Is a directory"
    assert is_directory_error(AgentCommandError("x", "GenericError", desc))


@pytest.mark.parametrize(
    ("spec", "expected"),
    [
        ("vm1:/etc/hostname", ("vm1", "/etc/hostname")),
        ("vm1:relative/file", ("vm1", "relative/file")),
        ("vm1:", None),
        ("/abs/path", None),
        ("./vm1:file", None),
        ("local-file", None),
        ("Bad Name:/x", None),
    ],
)
def test_name_and_path(spec: str, expected: tuple[str, str] | None) -> None:
    assert split_remote(spec) == expected


def test_env_options() -> None:
    assert parse_env(["A=1", "B=x=y", "C="]) == {"A": "1", "B": "x=y", "C": ""}
    for bad in ("A", "=1"):
        with pytest.raises(ValueError, match=f"--env {bad}: expected NAME=VALUE"):
            parse_env([bad])


def test_agent_environment() -> None:
    assert parse_environ(b"PATH=/bin\0HOME=/root\0X=a=b\0\0") == {
        "PATH": "/bin",
        "HOME": "/root",
        "X": "a=b",
    }


def test_local_target(tmp_path: Path) -> None:
    assert local_target(tmp_path, "/etc/hostname", "vm1") == tmp_path / "hostname"
    assert local_target(tmp_path / "copy", "/etc/hostname", "vm1") == tmp_path / "copy"
    with pytest.raises(QvmError, match="no such folder"):
        local_target(tmp_path / "none" / "copy", "/etc/hostname", "vm1")
    with pytest.raises(QvmError, match="names no file"):
        local_target(tmp_path, "/", "vm1")


def test_a_failed_copy_leaves_the_target_as_it_was(tmp_path: Path) -> None:
    target = tmp_path / "file"
    target.write_bytes(b"old")
    with pytest.raises(AgentError), _replacing(target, 0o600) as out:
        out.write(b"half of the new")
        raise AgentError("vm1: guest agent channel closed")
    assert target.read_bytes() == b"old"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["file"]


def test_a_complete_copy_is_renamed_into_place_with_its_mode(tmp_path: Path) -> None:
    target = tmp_path / "file"
    with _replacing(target, 0o750) as out:
        out.write(b"new")
        assert not target.exists()  # nothing at the target until the end
    assert target.read_bytes() == b"new"
    assert stat.S_IMODE(target.stat().st_mode) == 0o750
    with _replacing(target, None) as out:
        out.write(b"newer")
    mask = os.umask(0)
    os.umask(mask)
    assert stat.S_IMODE(target.stat().st_mode) == 0o666 & ~mask


def test_agent_errors_live_in_qvm_errors_and_agent_still_exports_them() -> None:
    from qvm.control import agent

    assert agent.AgentError is AgentError
    assert agent.AgentNotConfigured is AgentNotConfigured
    assert agent.AgentNotAnswering is AgentNotAnswering
    assert agent.AgentCommandError is AgentCommandError
    assert issubclass(AgentNotConfigured, AgentError) and issubclass(AgentError, QvmError)
    assert EXIT_TIMEOUT == 4


def test_exec_prints_output_then_says_what_the_agent_cut(
    monkeypatch: pytest.MonkeyPatch, capsysbinary: pytest.CaptureFixture[bytes]
) -> None:
    """The CLI's side of a reply with ``out-truncated`` (the real agent needs a minute
    under TCG to produce 16 MiB, too slow for the integration tests)."""
    from qvm.cli import resolve
    from qvm.cli.commands.guest import exec_
    from qvm.ops import guest
    from qvm.ops.guest import ExecOutcome

    status = ExecStatus(True, 3, None, b"\x00out", b"err", True, False)
    calls: list[tuple] = []

    def fake_run(run: object, argv: list[str], *rest: object, **options: object) -> ExecOutcome:
        calls.append((argv, rest))
        return ExecOutcome(tuple(argv), 42, 0.1, status)

    monkeypatch.setattr(guest, "run_command", fake_run)
    monkeypatch.setattr(resolve, "run_dir_of", lambda name: name)
    with pytest.raises(SystemExit) as done:
        exec_("vm1", ["yes"], 0.0, None, False, False)
    assert done.value.code == 3
    out, err = capsysbinary.readouterr()
    assert out == b"\x00out"
    assert err == b"err\nqvm: vm1: the guest agent kept only the first 16 MiB of stdout\n"
    assert calls == [(["yes"], (None, None, None))]
