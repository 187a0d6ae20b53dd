"""The `qvm` command line as Typer builds it from the declarations (``qvm.cli.parsing.declare``):
full help, Click's error messages, every spelling Click accepts.

``qvm.cli.app.run`` sends here whatever ``qvm.cli.parsing.fast`` does not run by itself: help, a
mistake, an unusual spelling.
"""

from __future__ import annotations

import functools
import importlib
import inspect
import typing
from collections.abc import Callable
from pathlib import Path
from typing import Any

import click
import typer
from typer.core import TyperCommand, TyperGroup

from qvm.cli import resolve
from qvm.cli.parsing.completion import INSTALL, SHOW, completer
from qvm.cli.parsing.declare import GROUPS, TOP_LEVEL, Commands, Param, fixed_arguments
from qvm.cli.parsing.fast import split_global_options
from qvm.errors import (
    EXIT_CANNOT_RUN,
    EXIT_EXEC_FAILED,
    EXIT_EXEC_TIMEOUT,
    EXIT_FAILURE,
    EXIT_INTERRUPTED,
    EXIT_NOT_FOUND,
    EXIT_OK,
    EXIT_PENDING,
    EXIT_TERMINATED,
    EXIT_TIMEOUT,
    EXIT_USAGE,
    EXIT_VM_CRASHED,
    EXIT_VM_KILLED,
    EXIT_VM_PANICKED,
)

# The words users bring from other tools (virsh, limactl, docker, multipass), and the
# word qvm has for each: offered when one is typed, never run in its place. Aliases would
# give one action two names in the help, the docs and TAB, and `delete` or `stop` would
# do qvm's exact thing, which may not be what the other tool's word does (rm keeps the
# machine file; down is ACPI first); a suggestion teaches the word and costs nothing
# until the mistake is made.
SYNONYMS: dict[str, tuple[str, ...]] = {
    "start": ("up",),
    "boot": ("up",),
    "stop": ("down",),
    "shutdown": ("down",),
    "halt": ("down",),
    "ls": ("list",),
    "ps": ("list",),
    "shell": ("ssh", "console"),
    "login": ("ssh",),
    "delete": ("rm", "del", "detach"),
    "remove": ("rm", "del", "detach"),
    "destroy": ("kill",),
    "info": ("status",),
    "show": ("status", "list"),
    "inspect": ("status",),
    "create": ("new",),
    "init": ("new",),
    "reboot": ("restart",),
    "log": ("logs",),
    "copy": ("cp",),
    "revert": ("restore",),
    "rollback": ("restore",),
    "plug": ("add", "attach"),
    "unplug": ("del", "detach"),
}


class QvmGroup(TyperGroup):
    """A command group whose "No such command" also knows ``SYNONYMS``."""

    def resolve_command(
        self, ctx: click.Context, args: list[str]
    ) -> tuple[str | None, click.Command | None, list[str]]:
        try:
            return super().resolve_command(ctx, args)
        except click.UsageError as error:
            word = args[0] if args else ""
            ours = [w for w in SYNONYMS.get(word.lower(), ()) if w in self.commands]
            if ours:
                error.message = f"No such command {word!r}. Did you mean {ours[0]!r}?"
            raise


# `qvm --help` ends with it, the README has it as a table (tests/unit/test_docs.py)
EXIT_STATUS = (
    (EXIT_OK, "done"),
    (EXIT_FAILURE, "failed: one line on stderr says why"),
    (EXIT_USAGE, "a usage error: the command line, a machine file, a VM name"),
    (EXIT_PENDING, "an unplug stands: the guest has not completed it (yet)"),
    (EXIT_TIMEOUT, "qvm wait: not ready in time"),
    (EXIT_VM_CRASHED, "qvm up --foreground: QEMU crashed"),
    (EXIT_VM_PANICKED, "qvm up --foreground: the guest panicked"),
    (EXIT_VM_KILLED, "qvm up --foreground: QEMU was killed (SIGKILL)"),
    (EXIT_EXEC_TIMEOUT, "qvm exec/run: the program outlived --timeout"),
    (EXIT_EXEC_FAILED, "qvm exec/run: qvm failed (no such VM, not running, no agent)"),
    (EXIT_CANNOT_RUN, "qvm exec/run: the program could not be run"),
    (EXIT_NOT_FOUND, "qvm exec/run: no such program in the guest"),
    (EXIT_INTERRUPTED, "interrupted (Ctrl-C)"),
    (EXIT_TERMINATED, "qvm run: cancelled by SIGTERM (its VM destroyed)"),
)
# "\b": Click prints the paragraph as it is, not rewrapped
EXIT_STATUS_HELP = "\b\nExit status:\n{}\n{}".format(
    "\n".join(f"  {code:<4} {meaning}" for code, meaning in EXIT_STATUS),
    "A command about several VMs exits with the highest of their statuses; qvm exec\n"
    "and qvm run otherwise with the program's (128 + N for signal N), qvm ssh with ssh's.",
)

app = typer.Typer(
    name="qvm",
    cls=QvmGroup,
    help="Launch, supervise and hotplug QEMU/KVM test VMs defined in TOML files.",
    epilog=EXIT_STATUS_HELP,
    no_args_is_help=True,
    add_completion=False,
    rich_markup_mode=None,  # plain help: rich costs start-up time on every command
    pretty_exceptions_enable=False,
    context_settings={"help_option_names": ["-h", "--help"]},
)

# the order `qvm --help` lists them in: the VM's life first, then hotplug, then the rest
HELP_ORDER = ("vm", "cpu", "mem", "disk", "nic", "net", "qmp", "dev", "port")


def typer_command(
    function: Callable[..., None],
    run: Callable[..., None] | None = None,
    words: tuple[str, ...] = (),
) -> Callable[..., None]:
    """``function`` as Typer wants it: the same parameters, with Typer's Argument/Option
    where the declaration has qvm's, completed on TAB as ``completer(words, name)`` says.
    Calls ``run`` (default: ``function``) with them."""
    signature = inspect.signature(function)
    target = run or function

    @functools.wraps(function)
    def command(**kwargs: Any) -> None:
        target(**kwargs)

    # resolved here: qvm.cli.resolve names Path for type checkers only (a query does
    # without pathlib), and Typer evaluates the annotations in the function's module
    command.__annotations__ = _type_hints(function)

    command.__signature__ = signature.replace(  # type: ignore[attr-defined]
        parameters=[
            p.replace(default=_typer_param(p.default, completer(words, p.name)))
            if isinstance(p.default, Param)
            else p
            for p in signature.parameters.values()
        ]
    )
    return command


def _type_hints(function: Callable[..., Any]) -> dict[str, Any]:
    return typing.get_type_hints(function, localns={"Path": Path})


def _typer_param(param: Param, complete: Callable[..., list[str]] | None = None) -> Any:
    if param.kind == "argument":
        return typer.Argument(
            param.default, help=param.help, metavar=param.metavar, autocompletion=complete
        )
    return typer.Option(
        param.default,
        *param.decls,
        help=param.help,
        metavar=param.metavar,
        autocompletion=complete,
    )


def guest_command_class(fixed: int) -> type[TyperCommand]:
    """A command whose arguments after the first ``fixed`` are a guest's command line:
    from its first word on no option is qvm's (`qvm ssh VM ls -l` runs ``ls -l``), as
    `limactl shell` has it. Click reads options anywhere; a ``--`` put before that word
    tells it otherwise."""

    class GuestCommand(TyperCommand):
        def parse_args(self, ctx: click.Context, args: list[str]) -> list[str]:
            return super().parse_args(ctx, _end_options_at_guest_line(self, args, fixed))

    return GuestCommand


def _end_options_at_guest_line(command: click.Command, args: list[str], fixed: int) -> list[str]:
    takes_value = {
        name
        for param in command.params
        if isinstance(param, click.Option) and not param.is_flag and not param.count
        for name in param.opts
    }
    seen = 0
    index = 0
    while index < len(args):
        arg = args[index]
        if arg == "--":
            return args
        if arg.startswith("-") and arg != "-":
            index += 2 if arg in takes_value else 1
            continue
        if seen == fixed:
            return [*args[:index], "--", *args[index:]]
        seen += 1
        index += 1
    return args


def _print_version(value: bool) -> None:
    if value:
        from qvm.cli.version import version_text

        print(version_text())
        raise typer.Exit()


def root_command() -> Callable[..., None]:
    """`qvm`'s own options: the global ones, and those that answer before any command
    (``qvm.cli.app.run`` handles them itself; here they are for the help and for TAB)."""
    base = typer_command(resolve.global_options)
    signature = inspect.signature(base)
    keyword = inspect.Parameter.KEYWORD_ONLY
    extra = [
        inspect.Parameter(
            "version",
            keyword,
            annotation=bool,
            default=typer.Option(
                False,
                "--version",
                is_eager=True,
                callback=_print_version,
                help="Print the versions of qvm, QEMU and Python.",
            ),
        ),
        *(
            inspect.Parameter(
                flag.lstrip("-").replace("-", "_"),
                keyword,
                annotation=str | None,
                default=typer.Option(None, flag, metavar="[SHELL]", help=text),
            )
            for flag, text in (
                (INSTALL, "Install completion for bash, zsh or fish (default: this shell)."),
                (SHOW, "Print the completion script for bash, zsh or fish."),
            )
        ),
    ]

    def root(
        version: bool = False,
        install_completion: str | None = None,
        show_completion: str | None = None,
        **global_values: Any,
    ) -> None:
        resolve.global_options(**global_values)

    root.__doc__ = resolve.global_options.__doc__
    root.__annotations__ = {
        **_type_hints(resolve.global_options),
        **{p.name: p.annotation for p in extra},
    }
    root.__signature__ = signature.replace(  # type: ignore[attr-defined]
        parameters=[*signature.parameters.values(), *extra]
    )
    return root


def module_commands(module: str) -> Commands:
    commands: Commands = importlib.import_module(f"qvm.cli.commands.{module}").commands
    return commands


_SENTENCE_STARTS = frozenset("ABCDEFGHIJKLMNOPQRSTUVWXYZ`")


def one_liner(text: str | None) -> str | None:
    """The first sentence of a help text, whole: what `qvm --help` lists for a command
    (wrapped where it is long). Click would cut it at about 45 characters, mid-phrase:
    "Start VMs under their own supervisors and wait until QMP..."."""
    if not text:
        return None
    paragraph = " ".join(inspect.cleandoc(text).split("\n\n", 1)[0].split())
    # a sentence ends at ". ", "! " or "? " before a capital or a backquote; found without
    # a regular expression, whose compiling would cost every help ~0.3 ms
    space = paragraph.find(" ")
    while space != -1:
        if paragraph[space - 1] in ".!?" and paragraph[space + 1] in _SENTENCE_STARTS:
            return paragraph[:space]
        space = paragraph.find(" ", space + 1)
    return paragraph


def listed_only(word: str, function: Callable[..., None]) -> Callable[[], None]:
    """A stand-in for ``function`` in a help listing: its help text, none of its
    parameters, which Typer would otherwise inspect and convert for nothing (about 20 ms
    for the whole of `qvm --help`)."""

    def listed() -> None:
        # `register` builds the real command for every word Click can run; reaching this
        # means the two disagree on which word that is
        raise RuntimeError(f"qvm: {word!r} was registered for help only")

    listed.__doc__ = function.__doc__
    return listed


def add_module(
    target: typer.Typer,
    module: str,
    words: list[str] | None,
    run: Callable[..., None] | None = None,
) -> None:
    """A module's top-level command ``words[0]``, or its command group with the
    subcommand ``words[1]``, built for real. When the line names none of the module's
    commands, every one of them, for the help listing only (``listed_only``); ``words``
    None: every one for real."""
    commands = module_commands(module)
    grouped = module in GROUPS
    parent = (
        typer.Typer(cls=QvmGroup, help=commands.help, no_args_is_help=True) if grouped else target
    )
    named = None if words is None else words[1:2] if grouped else words[:1]
    if grouped and words == []:
        # `qvm --help` lists the group by its own help: its commands are listed by
        # `qvm GROUP --help`, and each stand-in would cost Typer its build for nothing
        target.add_typer(parent, name=module, short_help=one_liner(commands.help))
        return
    for name, function in commands.functions.items():
        if named is None or named == [name]:
            path = (module, name) if grouped else (name,)
            fixed = fixed_arguments(function)
            cls = None if fixed is None else guest_command_class(fixed)
            short = one_liner(function.__doc__)
            parent.command(name, cls=cls, short_help=short)(typer_command(function, run, path))
        elif not (named and named[0] in commands.functions):  # else another one is named
            parent.command(name, short_help=one_liner(function.__doc__))(
                listed_only(name, function)
            )
    if grouped:
        target.add_typer(parent, name=module, short_help=one_liner(commands.help))


def register(words: list[str] | None) -> None:
    """Build only the command that will run: Typer inspects every registered function at
    start-up, and `qvm status -h` should not pay for `qvm cpu set`'s signature. Help and
    unknown words get every command, for listing only; ``words`` None, every command for
    real (the docs' checks)."""
    app.callback()(root_command())
    word = words[0] if words else None
    if word in TOP_LEVEL:
        add_module(app, TOP_LEVEL[word], words)
    elif word in GROUPS:
        add_module(app, word, words)
    else:
        modules = [*HELP_ORDER, *TOP_LEVEL.values(), *GROUPS]
        for module in dict.fromkeys(modules):
            add_module(app, module, None if words is None else [])


def command_words(argv: list[str]) -> list[str]:
    """The command words on the command line, after the global options: up to the
    first option (a group takes none of its own but --help)."""
    _, rest = split_global_options(argv)
    words: list[str] = []
    for arg in rest[:2]:
        if arg.startswith("-"):
            break
        words.append(arg)
    return words


def build(argv: list[str]) -> Callable[[], Any]:
    """The Typer app, with the command ``argv`` names registered, ready to run. A bare
    `qvm` asks for help: on stdout, and exit 0."""
    from qvm.cli.parsing import completion

    if completion.completing():
        completion.enable()
        register(command_words(completion.completed_words()))
        return app
    register(command_words(argv))
    if not argv:
        return lambda: app(args=["--help"], prog_name="qvm")
    return app
