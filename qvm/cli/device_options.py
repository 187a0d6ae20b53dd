"""What the hotplug commands (cpu, mem, disk, nic) share: the machine file for
--persist, and the one line for an unplug that did not complete."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from qvm.cli.output import abort, fail_all
from qvm.cli.parsing.declare import Option
from qvm.errors import EXIT_PENDING

# options the mem, disk and nic commands share
AS_JSON = Option(False, "--json", help="Print JSON (schema in the README).")
FORCE = Option(
    False,
    "--force",
    help="Go on even after a vCPU unplug in this QEMU run under TCG, where QEMU 7.2 crashes "
    "on any device_add.",
)
UNPLUG_TIMEOUT = Option(
    10.0, "--timeout", help="Seconds to wait for the guest to release the device."
)


def size_argument(name: str, option: str, text: str) -> int:
    """A size on the command line ("256M", "1G", bytes), or one line saying why not."""
    from qvm.base.sizes import SizeError, parse_size

    try:
        return parse_size(text)
    except SizeError as error:
        abort(f"{name}: {option}: {error}")


def machine_file(run: Any) -> Path:
    """The TOML the running VM came from (``--persist`` writes there)."""
    from qvm.store.launch import read_launch

    launch = read_launch(run.launch_file)
    file = launch.machine_file if launch is not None else None
    if not file:
        abort(f"{run.name}: --persist: the run dir does not say which machine file it came from")
    return Path(file)


def persisted_json(done: Any) -> dict[str, Any]:
    """A ``[[disk]]``/``[[nic]]`` written or removed, for output."""
    from qvm.base.text import display_path

    return {
        "file": display_path(done.path),
        "table": done.table,
        "action": done.action,
        "entry": done.entry,
    }


def unplug_problems(name: str, unplug: Any, what: str) -> None:
    """Exit with one line unless the device and its backend are gone: refused (1),
    pending (3), or removed but its backend could not be deleted (1)."""
    from qvm.control.transaction import pending_text

    if unplug.outcome == "refused":
        abort(f"{name}: {unplug.id}: {unplug.detail}; the {what} stays")
    if unplug.outcome == "pending":
        abort(pending_text(name, unplug.id, unplug.detail, what), EXIT_PENDING)
    if unplug.cleanup_errors:
        fail_all([f"{name}: {unplug.id} was removed, but {e}" for e in unplug.cleanup_errors])
