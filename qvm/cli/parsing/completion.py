"""Shell completion for bash, zsh and fish, the way Typer programs do it.

``qvm --show-completion [SHELL]`` prints the script, ``qvm --install-completion [SHELL]``
installs it where Typer does (bash: ~/.bash_completions/qvm.sh, sourced from ~/.bashrc;
zsh: ~/.zfunc/_qvm; fish: ~/.config/fish/completions/qvm.fish); SHELL defaults to the
shell qvm runs under. On TAB the script runs `qvm` with ``_QVM_COMPLETE`` set, and Click
answers from the full Typer CLI: command words, options, and for the arguments the
candidates of ``qvm.cli.completion`` (VM names, per command the VM's device ids, for
`cp` ``NAME:`` and local paths).

bash gets its own script: Typer's passes ``COMP_WORDS``, which bash has already split at
every ":" (``tcp:127.0.0.1:2222:22`` arrives as seven words); this one passes the line
itself and answers with what is left after the last ":", as bash-completion's
``__ltrim_colon_completions`` does.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from typing import Any

import click
import click.shell_completion
from click.shell_completion import split_arg_string
from typer import _completion_classes, _completion_shared

from qvm.cli import resolve
from qvm.errors import EXIT_USAGE, QvmError

PROG = "qvm"
COMPLETE_VAR = "_QVM_COMPLETE"
SHELLS = ("bash", "zsh", "fish")
INSTALL, SHOW = "--install-completion", "--show-completion"

BASH_SCRIPT = """\
_qvm_completion() {
    local IFS=$'\\n'
    COMPREPLY=( $( env COMP_LINE="$COMP_LINE" COMP_POINT="$COMP_POINT" \\
                   _QVM_COMP_WORDBREAKS="$COMP_WORDBREAKS" \\
                   _QVM_COMPLETE=complete_bash "$1" 2>/dev/null ) )
    # `qvm cp deb<TAB>` gives "deb:", a folder "dir/": the word goes on, no space after it
    if [[ ${#COMPREPLY[@]} -eq 1 && ${COMPREPLY[0]} == *[:/] ]]; then
        compopt -o nospace 2>/dev/null
    fi
    return 0
}

complete -o default -F _qvm_completion qvm"""


class BashComplete(_completion_classes.BashComplete):
    """Reads the command line up to the cursor (``COMP_LINE``, ``COMP_POINT``)."""

    source_template = BASH_SCRIPT

    def get_completion_args(self) -> tuple[list[str], str]:
        line = os.environ.get("COMP_LINE", "")
        point = int(os.environ.get("COMP_POINT") or len(line))
        line = line[:point]
        try:
            words = split_arg_string(line)
        except ValueError:
            words = line.split()
        args = words[1:]
        if args and not line.endswith((" ", "\t")):
            return args[:-1], args[-1]
        return args, ""

    def complete(self) -> str:
        args, incomplete = self.get_completion_args()
        values = [item.value for item in self.get_completions(args, incomplete)]
        if ":" in os.environ.get("_QVM_COMP_WORDBREAKS", "") and ":" in incomplete:
            # bash replaces only the part of the word after its last ":"
            cut = incomplete.rfind(":") + 1
            values = [value[cut:] for value in values if value.startswith(incomplete[:cut])]
        return "\n".join(values)


def completing() -> bool:
    """Whether this run answers a TAB press rather than running a command."""
    return COMPLETE_VAR in os.environ


def completed_words() -> list[str]:
    """The finished words after `qvm` on the line being completed (not the one under the
    cursor), in any shell's protocol: only the command they name needs building."""
    if "COMP_LINE" in os.environ:
        line = os.environ["COMP_LINE"][: int(os.environ.get("COMP_POINT") or 10**9)]
    else:
        line = os.environ.get("_TYPER_COMPLETE_ARGS", "")
    try:
        words = split_arg_string(line)[1:]
    except ValueError:
        return []
    return words if line.endswith((" ", "\t")) else words[:-1]


def enable() -> None:
    """Click's completion classes for bash, zsh and fish, Typer's instruction style."""
    _completion_classes.completion_init()
    click.shell_completion.add_completion_class(BashComplete, "bash")


def script_request(argv: list[str]) -> Callable[[], None] | None:
    """``--show-completion [SHELL]`` or ``--install-completion [SHELL]`` before the
    command word, ready to run; None if neither is there."""
    from qvm.cli.parsing.fast import split_global_options

    options, rest = split_global_options(argv)
    for flag, action in ((SHOW, show), (INSTALL, install)):
        if flag in options:
            shell = rest[0] if rest else None
            if len(rest) > 1:
                return None  # a mistake: Click says what is wrong with it
            return lambda: action(shell)
    return None


def shell_name(shell: str | None) -> str:
    """``shell``, or the one qvm runs under; a shell qvm has no script for: UsageError."""
    if shell is None:
        shell = _completion_shared._get_shell_name() or os.path.basename(
            os.environ.get("SHELL", "")
        )
    if shell not in SHELLS:
        detected = f"{shell!r}" if shell else "no shell found"
        error = QvmError(
            f"completion: {detected} is not a shell qvm completes "
            f"(hint: name one: qvm {SHOW} {'|'.join(SHELLS)})"
        )
        error.exit_code = EXIT_USAGE
        raise error
    return shell


def script(shell: str) -> str:
    if shell == "bash":
        return BASH_SCRIPT
    return _completion_shared.get_completion_script(
        prog_name=PROG, complete_var=COMPLETE_VAR, shell=shell
    )


def show(shell: str | None) -> None:
    print(script(shell_name(shell)))


def install(shell: str | None) -> None:
    shell = shell_name(shell)
    try:
        _, path = _completion_shared.install(shell=shell, prog_name=PROG, complete_var=COMPLETE_VAR)
        if shell == "bash":
            path.write_text(BASH_SCRIPT + "\n")
    except OSError as error:
        raise QvmError(
            f"completion: cannot install the {shell} script: {error.strerror or error}"
            f"{f': {error.filename}' if error.filename else ''} "
            f"(hint: qvm {SHOW} {shell} prints it, to install it yourself)"
        ) from None
    print(f"{shell} completion installed in {path}")
    print("It takes effect in new shells (or source the file in this one).")


# (command words, parameter) -> what completes it; every other `name` is a VM name, and
# `names` VM names and @GROUP
DEVICE_PARAMS: dict[tuple[tuple[str, ...], str], str] = {
    (("cpu", "del"), "ids"): "cpu",
    (("mem", "del"), "dev_id"): "mem",
    (("mem", "resize"), "dev_id"): "virtio-mem",
    (("disk", "detach"), "dev_id"): "disk",
    (("nic", "del"), "dev_id"): "nic",
    (("share", "del"), "guest"): "share",
    (("port", "del"), "spec"): "port",
}
# (command words, parameter) -> the tags of the snapshots of the VMs named on the line
SNAPSHOT_PARAMS = {
    (("snapshot", "restore"), "tag"),
    (("snapshot", "rm"), "tag"),
    (("up",), "restore"),
}
NEW_NAMES = {("new",)}  # names that must not exist yet: nothing to offer
# (command words, parameter): NAME:PATH in a VM or a local path
COPY_PARAMS = {(("cp",), "source"), (("cp",), "target")}


def completer(words: tuple[str, ...], parameter: str) -> Callable[..., list[str]] | None:
    """The Typer ``autocompletion`` of a command's parameter, or None. Its candidates
    (``qvm.cli.completion``, with the device-kind table) load on a TAB press only: every
    help and every mistake builds the Typer CLI, and so asks for the completers."""
    kind = DEVICE_PARAMS.get((words, parameter))
    if kind is not None:

        def complete_device(ctx: click.Context, incomplete: str) -> list[str]:
            from qvm.cli import completion as candidates

            _configure(ctx)
            vm = ctx.params.get("name")
            return _matching(candidates.device_ids(kind, vm), incomplete)

        return complete_device
    if (words, parameter) in SNAPSHOT_PARAMS:

        def complete_tag(ctx: click.Context, incomplete: str) -> list[str]:
            from qvm.cli import completion as candidates

            _configure(ctx)
            named = ctx.params.get("names") or [ctx.params.get("name")]
            if not any(named):
                named = _names_before_option(parameter)
            return _matching(candidates.snapshot_tags([n for n in named if n]), incomplete)

        return complete_tag
    if (words, parameter) in COPY_PARAMS:

        def complete_copy_end(ctx: click.Context, incomplete: str) -> list[str]:
            from qvm.cli import completion as candidates

            _configure(ctx)
            return _matching(candidates.copy_ends(incomplete), incomplete)

        return complete_copy_end
    if parameter == "names":  # a command about several VMs: @GROUP too (`--all` is an option)

        def complete_targets(ctx: click.Context, incomplete: str) -> list[str]:
            from qvm.cli import completion as candidates

            _configure(ctx)
            return _matching(candidates.target_words(), incomplete)

        return complete_targets
    if parameter == "name" and words not in NEW_NAMES:

        def complete_vm(ctx: click.Context, incomplete: str) -> list[str]:
            from qvm.cli import completion as candidates

            _configure(ctx)
            return _matching(candidates.vm_names(), incomplete)

        return complete_vm
    return None


def _names_before_option(option: str) -> list[str]:
    """The VM names on the line being completed, for the value of ``--OPTION`` that ends it:
    Click leaves every parameter unparsed while an option still lacks its value."""
    from qvm.cli.parsing.fast import split_global_options

    _, rest = split_global_options(completed_words())
    words = rest[1:]  # after the command word
    flag = f"--{option}"
    return [
        word
        for index, word in enumerate(words)
        if not word.startswith("-") and (index == 0 or words[index - 1] != flag)
    ]


def _configure(ctx: click.Context) -> None:
    """The global options on the line being completed (``--machines``, ``--state-dir``):
    their callback does not run while Click only parses for completion."""
    params: dict[str, Any] = ctx.find_root().params
    resolve.configure(params.get("machines"), params.get("state_dir"))


def _matching(values: list[str], incomplete: str) -> list[str]:
    return [value for value in values if value.startswith(incomplete)]
