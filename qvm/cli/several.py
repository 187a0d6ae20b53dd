"""A command about several VMs (`up`, `down`, `kill`, `restart`, `status`, `snapshot
save`): the VMs named (``qvm.cli.targets``) acted on at once, at most ``--jobs`` at a time
(``qvm.ops.fanout``), each VM's lines printed as it finishes, a failed one named on its
own line and again at the end, and the exit status the highest of the VMs' statuses.

Its ``--json`` is one entry per VM, in the order they were named: a failed VM is an error
object with its ``name`` (``schemas/common.json#/$defs/vm_error``). `up`, `down` and
`kill` always printed a list; `restart`, `status` and `snapshot save` print the one object
they always printed for one VM named by itself, and a list when the command line can name
several (several names, ``@GROUP``, ``--all``), so that a script's shape does not depend on
how many VMs a group holds today.
"""

from __future__ import annotations

from qvm.base.checking import TYPE_CHECKING
from qvm.cli.output import emit_json, error_fields, warn
from qvm.errors import EXIT_OK, QvmError, UsageError

if TYPE_CHECKING:  # every `up` comes here: no typing at run time (qvm.base.checking)
    from collections.abc import Callable, Iterator
    from typing import Any, TypeVar

    Result = TypeVar("Result")
SHOWN_WAITING = 3  # VMs the spinner names while it waits for them
SHOWN_FAILED = 10  # VMs the last line names as failed (each had its own line already)


class Several:
    """One run of a command about several VMs: what it acts on and how it went."""

    def __init__(
        self,
        names: list[str] | None,
        every: bool,
        jobs: int | None,
        defined: bool = False,
        single_object: bool = False,
    ) -> None:
        """``defined``: ``--all`` means every machine file (`up`), not every running VM.
        ``single_object``: one VM named by itself prints one JSON object, and its failure
        is the command's (``QvmError`` raised, as before the command took several)."""
        from qvm.cli.targets import targets

        if jobs is not None and jobs < 1:
            raise UsageError(f"--jobs: must be at least 1, got {jobs}")
        self.targets = targets(names, every, defined)
        self.jobs = jobs
        self.defined = defined
        self.single_object = single_object and not self.targets.several
        self.code = EXIT_OK
        self.failed: list[str] = []
        self.entries: dict[str, dict[str, Any]] = {}

    @property
    def specs(self) -> tuple[str, ...]:
        return self.targets.specs

    def run(self, work: Callable[[str], Result], doing: str) -> Iterator[tuple[str, Result]]:
        """``(spec, work(spec))`` for each VM whose work succeeded, as each finishes; a
        ``QvmError`` is that VM's failure: said at once, recorded, and the others go on.
        ``doing`` is what the spinner says is going on ("stopping")."""
        specs = self.specs
        if len(specs) == 1:  # in this thread: its own spinner says what it waits for
            try:
                yield specs[0], work(specs[0])
            except QvmError as error:
                if self.single_object:
                    raise
                self.fail(specs[0], error)
            return
        from qvm.cli.progress import Spinner
        from qvm.ops.fanout import default_jobs, run_all

        left = dict.fromkeys(specs)
        spinner = Spinner(doing)

        def tick() -> None:
            waiting = ", ".join(list(left)[:SHOWN_WAITING]) + (
                ", ..." if len(left) > SHOWN_WAITING else ""
            )
            spinner.label = f"{doing}: {len(left)} of {len(specs)} to go ({waiting})"
            spinner.tick()

        jobs = self.jobs or default_jobs(len(specs))
        for finished in run_all(specs, work, jobs, tick):
            spinner.done()
            left.pop(finished.item, None)
            raised = finished.error
            if raised is None:
                yield finished.item, finished.result  # type: ignore[misc]  # none raised: set
            elif isinstance(raised, QvmError):
                self.fail(finished.item, raised)
            else:
                raise raised  # a bug: as if there were one VM

    def fail(self, spec: str, error: QvmError) -> None:
        self.code = max(self.code, error.exit_code)
        self.failed.append(spec)
        warn(f"qvm: {error}")
        self.entries[spec] = error_entry(spec, error)

    def record(self, spec: str, entry: dict[str, Any]) -> None:
        self.entries[spec] = entry

    def finish(self, as_json: bool) -> None:
        """The JSON of every VM (with ``as_json``), the failed ones named, the exit
        status: the highest of the VMs'."""
        if as_json:
            listed = [self.entries[spec] for spec in self.specs if spec in self.entries]
            emit_json(listed[0] if self.single_object and listed else listed)
        failed = [spec for spec in self.specs if spec in self.failed]  # in the order named
        if failed and len(self.specs) > 1:
            named = ", ".join(failed[:SHOWN_FAILED])
            if len(failed) > SHOWN_FAILED:
                named += f" and {len(failed) - SHOWN_FAILED} more"
            warn(f"qvm: {len(failed)} of {len(self.specs)} failed: {named}")
        if not self.specs:
            warn(f"qvm: --all: {'no machine file found' if self.defined else 'no VM runs'}")
        if self.code:
            raise SystemExit(self.code)


def error_entry(name: str, error: QvmError) -> dict[str, Any]:
    """One VM of several that failed, in the list the command prints with --json."""
    from qvm.layout.names import is_vm_name

    vm = name if is_vm_name(name) else None  # else a machine file's path
    return {"name": name, **error_fields(error, error.exit_code, vm)}
