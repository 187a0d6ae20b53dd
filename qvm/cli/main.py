"""The `qvm` command: a thin layer that parses arguments, calls the core and prints."""

from __future__ import annotations

import gc
import sys
from pathlib import Path

import typer

from qvm.cli import common
from qvm.errors import QvmError

app = typer.Typer(
    name="qvm",
    help="Launch, supervise and hotplug QEMU/KVM test VMs defined in TOML files.",
    no_args_is_help=True,
    add_completion=False,
    rich_markup_mode=None,  # plain help: rich costs start-up time on every command
    pretty_exceptions_enable=False,
    context_settings={"help_option_names": ["-h", "--help"]},
)


@app.callback()
def global_options(
    machines: Path | None = typer.Option(
        None, "--machines", help="Folder of machine TOML files (also $QVM_MACHINES)."
    ),
    state_dir: Path | None = typer.Option(
        None, "--state-dir", help="Where run dirs live (also $QVM_STATE_DIR)."
    ),
) -> None:
    common.configure(machines, state_dir)


VM_COMMANDS = ("up", "down", "kill", "restart", "status", "list", "logs", "console", "cmdline")
GLOBAL_OPTIONS_WITH_VALUE = ("--machines", "--state-dir")
# memory, disk and NIC hotplug: qvm/cli/mem.py, disk.py, nic.py
DEVICE_GROUPS = ("mem", "disk", "nic")


def command_word(argv: list[str]) -> str | None:
    """The subcommand named on the command line, skipping global options."""
    args = iter(argv)
    for arg in args:
        if arg in GLOBAL_OPTIONS_WITH_VALUE:
            next(args, None)
        elif not arg.startswith("-"):
            return arg
    return None


def register(word: str | None) -> None:
    """Build only the command that will run: Typer inspects every registered function at
    start-up, and `qvm status` should not pay for `qvm cpu set`'s signature."""
    from qvm.cli import vm

    if word in VM_COMMANDS:
        vm.register(app, only=word)
        return
    if word == "cpu":
        from qvm.cli import cpu

        app.add_typer(cpu.app, name="cpu")
        return
    if word in DEVICE_GROUPS:
        _add_device_group(word)
        return
    if word == "qmp":
        from qvm.cli import qmp

        qmp.register(app)
        return
    from qvm.cli import dev

    if word in dev.COMMANDS:
        dev.register(app, only=word)
        return
    if word == "port":
        from qvm.cli import port

        app.add_typer(port.app, name="port")
        return
    from qvm.cli import cpu, port, qmp  # help, or an unknown command: show them all

    vm.register(app)
    app.add_typer(cpu.app, name="cpu")
    for group in DEVICE_GROUPS:
        _add_device_group(group)
    qmp.register(app)
    dev.register(app)
    app.add_typer(port.app, name="port")


def _add_device_group(word: str) -> None:
    """qvm mem/disk/nic: one Typer app per module, qvm/cli/<word>.py."""
    import importlib

    app.add_typer(importlib.import_module(f"qvm.cli.{word}").app, name=word)


def main() -> None:
    register(command_word(sys.argv[1:]))
    # What is loaded by now lives until exit: keep it out of the collector's sight, so
    # that collections during the command, and the interpreter's last one at exit, scan
    # only what the command itself creates (measured: 15-30 ms less per command). Then
    # collect as usual (qvm.cli.run turned it off for the imports): `qvm console` runs long.
    gc.freeze()
    gc.enable()
    try:
        app()
    except QvmError as error:
        sys.stderr.write(f"qvm: {error}\n")
        sys.exit(error.exit_code)
    except KeyboardInterrupt:
        sys.stderr.write("qvm: interrupted\n")
        sys.exit(130)


if __name__ == "__main__":
    main()
