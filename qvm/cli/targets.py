"""The VMs a command about several VMs acts on: names (or machine files), ``@GROUP``, or
``--all``.

``@GROUP`` is every machine file of the machines folders whose ``group`` says so
(``qvm.definition.groups``); ``--all`` every running VM (a run dir whose supervisor is
alive), or for `up` every machine file. ``--all`` takes no names: it already means every
VM, so a name beside it is a mistake rather than something to add. Each VM is acted on
once, in the order first named.
"""

from __future__ import annotations

from qvm.base.record import Record
from qvm.cli import resolve
from qvm.errors import UsageError
from qvm.layout.names import NAME_RULE, is_vm_name, shown


class Targets(Record):
    specs: tuple[str, ...]  # each a VM name or a machine file's path, as `qvm up` takes it
    several: bool  # not one VM named by itself: @GROUP, --all or several names


def targets(names: list[str] | None, every: bool, defined: bool = False) -> Targets:
    """``names`` resolved; ``every`` is ``--all``: the running VMs, or with ``defined``
    every machine file. A mistake in how they are named is a UsageError (exit 2)."""
    names = names or []
    if every:
        if names:
            raise UsageError(
                f"--all: names given too ({' '.join(shown(n) for n in names)})",
                hint="--all is every VM: drop the names, or --all",
            )
        specs = defined_specs() if defined else running_vms()
        return Targets(tuple(specs), True)
    if not names:
        what = "every machine" if defined else "every running VM"
        raise UsageError(f"name a VM, a group (@GROUP), or give --all for {what}")
    found: dict[str, None] = {}
    for name in names:
        if is_group(name):
            found.update(dict.fromkeys(group_specs(name[1:])))
        else:
            found.setdefault(name)
    return Targets(tuple(found), len(names) > 1 or is_group(names[0]))


def is_group(name: str) -> bool:
    """``@GROUP``, not a machine file's path that happens to start with "@"."""
    return name.startswith("@") and not resolve.is_path(name)


def group_specs(group: str) -> list[str]:
    """The machines of ``group``; one of none is a usage error naming the folders."""
    from qvm.definition.groups import group_members

    if not is_vm_name(group):
        raise UsageError(f"@{shown(group)}: not a group name: it must be {NAME_RULE}")
    dirs = resolve.search_dirs()
    members = group_members(group, dirs)
    if not members:
        looked = ", ".join(str(d) for d in dirs)
        raise UsageError(
            f"no machine is in group {group!r} (looked in: {looked})",
            hint=f'put group = "{group}" in their machine files',
        )
    return [member.spec for member in members]


def defined_specs() -> list[str]:
    from qvm.definition.groups import listed_machines

    return [machine.spec for machine in listed_machines(resolve.search_dirs())]


def running_vms() -> list[str]:
    """Every VM whose supervisor is alive, by name."""
    from qvm.layout.rundir import list_run_dirs
    from qvm.supervisor.client import supervisor_alive

    return [run.name for run in list_run_dirs(resolve.state_root()) if supervisor_alive(run)]
