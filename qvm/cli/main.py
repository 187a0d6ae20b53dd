"""The `qvm` command: a thin layer that parses arguments, calls the core and prints."""

from __future__ import annotations

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


def _register() -> None:
    from qvm.cli import cpu, qmp, vm

    vm.register(app)
    app.add_typer(cpu.app, name="cpu")
    qmp.register(app)


_register()


def main() -> None:
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
