"""How the CLI's commands are declared: plain functions whose parameter defaults say how
each is spelled on the command line, and where each command word lives.

Nothing here imports Typer. The same declarations feed two parsers: ``qvm.cli.parsing.typer_app``
builds the full Typer/Click CLI from them (help, every error message, every spelling
Click accepts), and ``qvm.cli.parsing.fast`` parses the plain, well-formed command lines
itself, so that `qvm status vm1` does not pay 30-80 ms for importing Typer and Click.
"""

from __future__ import annotations

from collections.abc import Callable

from qvm.base.checking import TYPE_CHECKING
from qvm.base.record import Record

if TYPE_CHECKING:
    from typing import Any

# Top-level command words and the module (qvm/cli/<module>.py) that declares each.
TOP_LEVEL = {
    **dict.fromkeys(
        ("up", "down", "kill", "restart", "status", "list", "logs", "console", "cmdline"), "vm"
    ),
    **dict.fromkeys(("new", "reset", "rm", "ssh", "wait"), "dev"),
    "qmp": "qmp",
    "agent": "agent",
    **dict.fromkeys(("exec", "cp"), "guest"),
    "run": "run",
    "systemd": "systemd",
}
# Command groups (`qvm cpu add`): each is the module of the same name.
GROUPS = ("cpu", "mem", "disk", "nic", "share", "port", "snapshot", "net", "slurm")


class Param(Record):
    """One command-line parameter: an argument, or an option with its spellings."""

    kind: str  # "argument" or "option"
    default: Any  # ... for a required one
    decls: tuple[str, ...]
    help: str | None
    metavar: str | None
    # a guest's command line: from its first word on, every word is the guest's, options
    # too (`qvm ssh VM ls -l`), as `limactl shell` has it
    command_line: bool = False

    @property
    def required(self) -> bool:
        return self.default is ...


def Argument(  # noqa: N802 - reads like the Typer call it stands for
    default: Any = ...,
    *,
    help: str | None = None,
    metavar: str | None = None,
    command_line: bool = False,
) -> Any:
    return Param("argument", default, (), help, metavar, command_line)


def Option(  # noqa: N802 - reads like the Typer call it stands for
    default: Any, *decls: str, help: str | None = None, metavar: str | None = None
) -> Any:
    return Param("option", default, decls, help, metavar)


# Parameters several commands declare alike, declared once so that their spelling and help
# cannot drift apart (here, where every command module reads from anyway: no import more).
def persist_option(change: str) -> Any:
    """The --persist of a hotplug command (cpu, disk, nic), one sentence for all:
    ``change`` is what it does to the machine's TOML."""
    return Option(
        False,
        "--persist",
        help=f"After the live change succeeded, {change} (comments and formatting kept).",
    )


AS_JSON = Option(
    False, "--json", help="Print JSON (the schema named below). An error is a JSON object too."
)
MACHINE = Argument(..., help="Machine name.")
MACHINES = Argument(..., help="Machine names.")
# the commands about several VMs (qvm.cli.several)
TARGETS = Argument(
    None,
    help='Machine names, and @GROUP for the machines whose file says group = "GROUP".',
)
ALL_RUNNING = Option(False, "--all", help="Every running VM (then no names).")
JOBS = Option(None, "--jobs", metavar="N", help="At most N VMs at a time (default: all, up to 16).")
SNAPSHOT_TAG = Argument(..., help="The snapshot's name.")
# exec, run and slurm submit: a program run in the guest through its agent
PROGRAM = Argument(
    None,
    help="The program and its arguments (-- before them is optional): every word from the "
    "program on is its own, options too; run as they are, without a shell (write sh -c "
    "'...' for one).",
    command_line=True,
)
STOP_TIMEOUT = Option(30.0, "--timeout", help="Seconds to wait for the guest.")  # down, restart
SKIP_POWER_BUTTON = Option(False, "--force", help="Skip the ACPI power button.")  # down, restart
# cpu, mem, disk and nic (here, not in qvm.cli.device_options: `qvm cpu list` needs no more)
FORCE = Option(
    False,
    "--force",
    help="Go on even after a vCPU unplug in this QEMU run under TCG, where QEMU 7.2 crashes "
    "on any device_add.",
)
UNPLUG_TIMEOUT = Option(
    10.0, "--timeout", help="Seconds to wait for the guest to release the device."
)
# status, cpu list: the round trip their records spare (qvm.store.view)
LIVE = Option(
    False,
    "--live",
    help="Ask the VM's supervisor and guest agent now, and wait for their answers, instead "
    "of reading what the supervisor last recorded.",
)


class Commands:
    """The commands one module declares, by the word that runs each."""

    def __init__(self, help: str | None = None) -> None:
        self.help = help
        self.functions: dict[str, Callable[..., None]] = {}

    def command(self, word: str) -> Callable[[Callable[..., None]], Callable[..., None]]:
        def declare(function: Callable[..., None]) -> Callable[..., None]:
            self.functions[word] = function
            return function

        return declare


def fixed_arguments(function: Callable[..., Any]) -> int | None:
    """How many arguments come before ``function``'s guest command line (`qvm exec VM
    PROGRAM ARG...`: 1), or None when it takes none."""
    arguments = [param for _, _, param in parameters(function) if param.kind == "argument"]
    for index, param in enumerate(arguments):
        if param.command_line:
            return index
    return None


def parameters(function: Callable[..., Any]) -> list[tuple[str, str, Param]]:
    """(name, annotation text, declaration) of each parameter, in order.

    Read from the function's code and defaults rather than ``inspect.signature``: the
    fast path must not import ``inspect`` (~10 ms). The modules use postponed annotations,
    so each annotation is its source text.
    """
    code = function.__code__
    names = code.co_varnames[: code.co_argcount]
    defaults = function.__defaults__ or ()
    if len(defaults) != len(names) or not all(isinstance(d, Param) for d in defaults):
        raise TypeError(f"{function.__qualname__}: every parameter needs Argument() or Option()")
    annotations = function.__annotations__
    return [
        (name, str(annotations.get(name, "")), default)
        for name, default in zip(names, defaults, strict=True)
    ]
