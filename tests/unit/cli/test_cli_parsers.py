"""The fast path (qvm.cli.parsing.fast) and the Typer CLI (qvm.cli.parsing.typer_app) turn
a command line into the same call, for every command: otherwise a command would behave
differently depending on which of the two parsed it."""

from __future__ import annotations

import inspect
import re
import subprocess
import sys
from typing import Any

import pytest
import typer
from hypothesis import given, settings
from hypothesis import strategies as st
from typer.testing import CliRunner

from qvm.cli import resolve
from qvm.cli.parsing import typer_app
from qvm.cli.parsing.declare import GROUPS, TOP_LEVEL, parameters
from qvm.cli.parsing.fast import plain_call
from qvm.cli.parsing.typer_app import add_module, module_commands, typer_command

SAMPLES = {"str": "x1", "int": "3", "float": "2.5", "Path": "some/file.img"}
GLOBALS = ["--machines", "m/dir", "--state-dir=s/dir"]


def every_command() -> list[tuple[list[str], Any]]:
    found = [
        ([word], module_commands(module).functions[word]) for word, module in TOP_LEVEL.items()
    ]
    for group in GROUPS:
        found += [([group, word], f) for word, f in module_commands(group).functions.items()]
    return found


COMMANDS = every_command()


def sample(annotation: str) -> str:
    return SAMPLES[annotation.removesuffix(" | None").removeprefix("list[").removesuffix("]")]


def plain_spellings(function: Any) -> list[list[str]]:
    """What a user plainly types after the command words: the required arguments, all
    arguments, each spelling of each option (before and after the arguments), and every
    option at once."""
    declared = parameters(function)
    required: list[str] = []
    every_argument: list[str] = []
    for _, annotation, param in declared:
        if param.kind == "argument":
            values = [sample(annotation)] * (2 if annotation.startswith("list[") else 1)
            every_argument += values
            required += values if param.required else []
    options: list[list[list[str]]] = []  # per parameter, its spellings
    for _, annotation, param in declared:
        if param.kind != "option":
            continue
        spellings = []
        for decl in param.decls:
            if annotation == "bool":
                spellings.append([decl])
            elif annotation.startswith("list["):
                spellings.append([decl, sample(annotation), f"{decl}={sample(annotation)}"])
            else:
                spellings.append([decl, sample(annotation)])
                if decl.startswith("--"):
                    spellings.append([f"{decl}={sample(annotation)}"])
        options.append(spellings)
    lines = [required, every_argument]
    for spellings in options:
        lines += [required + spelling for spelling in spellings]
        lines += [spelling + every_argument for spelling in spellings]
    all_options = [arg for spellings in options for arg in spellings[0]]
    lines += [every_argument + all_options, all_options + required]
    return lines


def typer_call(argv: list[str]) -> tuple[Any, Any] | int:
    """What the Typer CLI calls for ``argv``: (global values, values), or its exit code."""
    calls: dict[str, Any] = {}
    app = typer.Typer(context_settings={"help_option_names": ["-h", "--help"]})
    app.callback()(typer_command(resolve.global_options, lambda **kw: calls.update(globals=kw)))
    words = [a for a in argv if not a.startswith("-") and a not in GLOBALS]
    add_module(
        app,
        words[0] if words[0] in GROUPS else TOP_LEVEL[words[0]],
        words[:2],
        run=lambda **kw: calls.update(values=kw),
    )
    result = CliRunner().invoke(app, argv)
    if result.exit_code != 0 or "values" not in calls:
        return result.exit_code
    return calls["globals"], calls["values"]


@pytest.mark.parametrize(("words", "function"), COMMANDS, ids=[" ".join(w) for w, _ in COMMANDS])
def test_both_parsers_call_the_same(words: list[str], function: Any) -> None:
    for args in plain_spellings(function):
        for global_args in ([], GLOBALS):
            argv = [*global_args, *words, *args]
            fast = plain_call(argv)
            assert fast is not None, f"the fast path declined a plain command line: {argv}"
            assert fast.function is function
            assert typer_call(argv) == (fast.global_values, fast.values), argv


@pytest.mark.parametrize(
    "argv",
    [
        [],
        ["-h"],
        ["--help"],
        ["logs"],  # a required argument is missing
        ["logs", "vm1", "vm2"],  # one too many
        ["logs", "vm1", "-h"],
        ["logs", "vm1", "--bogus"],
        ["logs", "--", "vm1"],
        ["cpu"],
        ["cpu", "bogus", "vm1"],
        ["cpu", "add", "vm1", "-n3"],  # Click reads this; the fast path leaves it to Click
        ["cpu", "add", "vm1", "--count", "many"],
        ["cpu", "add", "vm1", "--count"],
        ["cpu", "add", "vm1", "--count", "2", "--count", "3"],
        ["cpu", "add", "vm1", "--json=yes"],
        ["cpu", "del", "vm1", "--timeout", "-1"],
        ["logs", "vm1", "-fn", "3"],
        ["bogus"],
        ["--machines"],
        ["--machines", "m", "--bogus", "x", "list"],
        ["list", "--machines", "m"],  # global options go before the command word
    ],
)
def test_the_fast_path_leaves_the_rest_to_typer(argv: list[str]) -> None:
    assert plain_call(argv) is None


@pytest.mark.parametrize(("words", "function"), COMMANDS, ids=[" ".join(w) for w, _ in COMMANDS])
def test_typer_builds_for_real_the_command_a_line_runs(
    words: list[str], function: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The rest of the app is built for the help listing only: a stand-in the line ran
    would do nothing."""
    declared = {name for name, _, _ in parameters(function)}
    for global_args in ([], GLOBALS, ["--state-dir", "--machines"]):
        for after in (["vm1"], ["--help"], []):
            monkeypatch.setattr(typer_app, "app", typer.Typer())
            typer_app.build([*global_args, *words, *after])
            command = typer.main.get_command(typer_app.app)
            for word in words:
                command = command.get_command(None, word)  # type: ignore[attr-defined]
            built = {param.name for param in command.params}
            assert built == declared, (global_args, words, after)


@pytest.mark.parametrize(
    ("argv", "command", "options"),
    [
        (["ssh", "vm1", "ls", "-l", "/etc/hostname"], ["ls", "-l", "/etc/hostname"], {}),
        (["ssh", "vm1", "--user", "root", "ls", "-l"], ["ls", "-l"], {"user": "root"}),
        (["ssh", "vm1", "-l", "root", "id", "-u"], ["id", "-u"], {"user": "root"}),
        (["ssh", "vm1", "tool", "--json", "--print"], ["tool", "--json", "--print"], {}),
        (["exec", "vm1", "ls", "-l"], ["ls", "-l"], {}),
        (["exec", "vm1", "--timeout", "5", "ls", "--env", "x"], ["ls", "--env", "x"], {}),
        (["exec", "vm1", "--", "ls", "-l"], ["ls", "-l"], {}),
        (["exec", "vm1", "ls", "--", "-l"], ["ls", "--", "-l"], {}),
        (["exec", "--stdin", "vm1", "cat", "-"], ["cat", "-"], {"stdin": True}),
    ],
)
def test_a_guest_command_line_keeps_its_options(
    argv: list[str], command: list[str], options: dict[str, Any]
) -> None:
    """From the guest command's first word on, no option is qvm's: `qvm ssh VM ls -l`
    must not log in as user "/etc/hostname", nor `qvm exec VM ls -l` fail on "-l"."""
    fast = plain_call(argv)
    assert fast is not None, argv
    assert fast.values["command"] == command
    for name, value in options.items():
        assert fast.values[name] == value
    assert typer_call(argv) == (fast.global_values, fast.values), argv


@pytest.mark.parametrize(
    ("argv", "ours"),
    [
        (["start", "vm1"], "up"),  # Click's own guess was 'restart'
        (["stop", "vm1"], "down"),
        (["ls"], "list"),  # Click's own guess was 'logs'
        (["shell", "vm1"], "ssh"),
        (["delete", "vm1"], "rm"),
        (["info", "vm1"], "status"),
        (["disk", "delete", "vm1", "disk1"], "detach"),
        (["snapshot", "ls", "vm1"], "list"),
    ],
)
def test_the_words_users_bring_suggest_qvms_word(argv: list[str], ours: str) -> None:
    result = subprocess.run(
        [sys.executable, "-m", "qvm.cli", *argv], capture_output=True, text=True, check=False
    )
    assert result.returncode == 2
    word = argv[1] if argv[0] in GROUPS else argv[0]
    assert f"No such command '{word}'." in result.stderr
    assert f"Did you mean '{ours}'?" in result.stderr
    assert plain_call(argv) is None  # and none of them runs


def test_help_lists_each_commands_first_sentence_whole() -> None:
    """Click cut each one-liner at about 45 characters ("...wait until QMP...")."""
    for argv in (["--help"], ["mem", "--help"]):
        result = subprocess.run(
            [sys.executable, "-m", "qvm.cli", *argv], capture_output=True, text=True, check=True
        )
        listing = result.stdout.split("Commands:\n", 1)[1]
        assert "..." not in listing, listing
    assert "  up        Start VMs under their own supervisors and wait until QMP answers.\n" in (
        subprocess.run(
            [sys.executable, "-m", "qvm.cli", "--help"], capture_output=True, text=True, check=True
        ).stdout
    )


@settings(max_examples=300, deadline=None)
@given(st.text(alphabet=" \n\t.!?`Aaz:,Z0", max_size=40))
def test_one_liner_ends_where_a_sentence_does(text: str) -> None:
    """The first sentence ends at ". ", "! " or "? " before a capital or a backquote, as
    the regular expression this scan replaced (its compiling cost every help) said."""
    paragraph = " ".join(inspect.cleandoc(text).split("\n\n", 1)[0].split())
    expected = re.split(r"(?<=[.!?]) (?=[A-Z`])", paragraph, maxsplit=1)[0] if text else None
    assert typer_app.one_liner(text) == expected


def test_one_liner_examples() -> None:
    assert typer_app.one_liner("Stop it. Then go.\n\nMore.") == "Stop it."
    assert typer_app.one_liner("Is it e.g. ok? `qvm up` says.") == "Is it e.g. ok?"
    assert typer_app.one_liner("  Ends here!  ") == "Ends here!"
    assert typer_app.one_liner("") is None


def test_the_fast_path_takes_a_command_line_after_double_dash() -> None:
    call = plain_call(["exec", "vm1", "--timeout", "5", "--", "sh", "-c", "exit 7", "--"])
    assert call is not None
    assert call.values["command"] == ["sh", "-c", "exit 7", "--"]
    assert call.values["timeout"] == 5.0
    # where no command line follows, "--" is still Typer's to read
    assert plain_call(["logs", "--", "vm1"]) is None


def test_both_parsers_read_exec_alike() -> None:
    for argv in (
        ["exec", "vm1", "--", "sh", "-c", "kill -9 $$"],
        ["exec", "--json", "vm1", "--env", "A=1", "--env", "B=2", "--", "printf", "--", "-x"],
        ["exec", "vm1", "--stdin", "--", "cat"],
        ["ssh", "vm1", "--", "ls", "-l"],
    ):
        fast = plain_call(argv)
        assert fast is not None, argv
        assert typer_call(argv) == (fast.global_values, fast.values), argv
