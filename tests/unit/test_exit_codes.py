"""The exit status contract (qvm/errors.py, the README's "Exit status"): usage errors are 2
whether the parser or qvm itself finds them, a command's JSON says the status it exits
with, and `qvm exec` keeps its own outcomes (125, 126, 127) out of the program's way.
Through the real CLI; nothing here boots a VM."""

from __future__ import annotations

import json
from collections.abc import Iterator

import pytest
from framework.harness import Qvm, one_line_error, scratch_qvm

from qvm.control import guest_exec
from qvm.errors import (
    EXIT_CANNOT_RUN,
    EXIT_NOT_FOUND,
    AgentCommandError,
    ProgramNotStarted,
)


@pytest.fixture
def cli() -> Iterator[Qvm]:
    with scratch_qvm("deb") as qvm:
        yield qvm


@pytest.mark.parametrize(
    "argv",
    [
        ["new", "x", "--kernel", "/k", "--memory", "1X"],
        ["mem", "add", "deb", "1X"],
        ["wait", "deb", "--for", "http"],
        ["cpu", "add", "deb", "--count", "-1"],
        ["cpu", "del", "deb", "--count", "0"],
        ["port", "add", "deb", "tcp:x:80"],
        ["port", "add", "deb", "foo"],
        ["cpu", "del", "deb", "1", "--count", "2"],
        ["qmp", "deb"],
    ],
    ids=" ".join,
)
def test_values_qvm_checks_itself_are_usage_errors_as_the_parsers_are(
    cli: Qvm, argv: list[str]
) -> None:
    done = cli(*argv, check=False)
    assert done.returncode == 2, (done.returncode, done.stderr)
    assert one_line_error(done).startswith("qvm: ")
    assert cli("up", "--no-such-option", "deb", check=False).returncode == 2  # Click's own


def test_a_commands_json_says_the_status_it_exits_with(cli: Qvm) -> None:
    for argv in (["up", "typo", "--json"], ["up", "..", "--json"], ["down", "typo", "--json"]):
        done = cli(*argv, check=False)
        entries = json.loads(done.stdout)
        entries = entries if isinstance(entries, list) else [entries]
        assert {e["exit_code"] for e in entries} == {done.returncode}, (argv, done.stdout)
    # a group command exits with the highest status of its VMs: a bad name (2) over a
    # VM that does not exist (1)
    assert cli("up", "typo", "..", check=False).returncode == 2


def test_exec_says_qvm_failed_as_125_not_as_a_programs_1(cli: Qvm) -> None:
    done = cli("exec", "deb", "--", "true", check=False)
    assert done.returncode == 125, done.stderr
    assert "not running" in one_line_error(done)
    assert cli("exec", "typo", "--", "true", check=False).returncode == 125
    # a mistake on the command line is still a usage error
    assert cli("exec", "deb", check=False).returncode == 2


def test_a_program_the_agent_cannot_start_is_127_or_126() -> None:
    class Agent:
        name = "vm1"

        def __init__(self, why: str) -> None:
            self.why = why

        def execute(self, command: str, arguments: object) -> object:
            desc = f"Failed to execute child process “x” ({self.why})"
            raise AgentCommandError("guest-exec failed", "GenericError", desc)

    for why, code in (("No such file or directory", EXIT_NOT_FOUND),
                      ("Permission denied", EXIT_CANNOT_RUN)):  # fmt: skip
        with pytest.raises(ProgramNotStarted) as error:
            guest_exec.start(Agent(why), ["x"])  # type: ignore[arg-type]
        assert error.value.exit_code == code
        assert str(error.value) == f"vm1: cannot run x in the guest: {why}"
