"""The frozen copies of snapshots for clones (``STATE/VM@TAG/``, ``qvm.ops.clone``): where
each lies, and which clones use it. Read by `qvm snapshot rm` (a used copy refuses it),
`qvm rm` (a template's copies outlive it: said) and `qvm new --from`.
"""

from __future__ import annotations

import re

from qvm.errors import RecordError, VmStateError
from qvm.layout.rundir import RunDir, list_run_dirs
from qvm.store.snapshots import TAG_PATTERN, read_clone


def frozen_dir(template: RunDir, tag: str) -> RunDir:
    return RunDir(template.path.parent / f"{template.name}@{tag}")


def frozen_copies(template: RunDir) -> list[tuple[str, RunDir]]:
    """(tag, folder) of every frozen copy of ``template``'s snapshots there is."""
    prefix = template.name + "@"
    try:
        entries = sorted(template.path.parent.iterdir())
    except OSError:
        return []
    return [
        (entry.name[len(prefix) :], RunDir(entry))
        for entry in entries
        if entry.name.startswith(prefix)
        and re.fullmatch(TAG_PATTERN, entry.name[len(prefix) :])
        and entry.is_dir()
        and not entry.is_symlink()
    ]


def clones_of(template: RunDir, tag: str) -> list[str]:
    """The VMs whose ``clone.json`` names ``template``@``tag``: their disks lie on its
    frozen copy. A record that does not parse counts as one (rather keep than guess)."""
    users = []
    for other in list_run_dirs(template.path.parent):
        try:
            record = read_clone(other)
        except RecordError:
            users.append(f"{other.name} (its clone.json does not parse)")
            continue
        if record is not None and (record.template, record.tag) == (template.name, tag):
            users.append(other.name)
    return users


def check_unused(template: RunDir, tag: str) -> RunDir | None:
    """The frozen copy of ``template``@``tag`` when there is one and no clone uses it;
    None when there is none; refused, naming the clones, when some use it."""
    frozen = frozen_dir(template, tag)
    if not frozen.path.is_dir():
        return None
    users = clones_of(template, tag)
    if users:
        names = [u.split(" ", 1)[0] for u in users]
        raise VmStateError(
            f"{template.name}: snapshot {tag!r} has clones on its frozen copy {frozen.path}: "
            f"{', '.join(users)} (hint: qvm rm {' '.join(names)}, then again)"
        )
    return frozen
