"""What the hotplug commands (cpu, mem, disk, nic) share: the machine file for
--persist, the one line for an unplug that did not complete, and what ``disk`` and
``nic`` say alike: their lists, an attached device, the whole of removing one."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

from qvm.cli import resolve
from qvm.cli.output import abort, emit_json, fail_all, say, table, warn
from qvm.errors import EXIT_PENDING, EXIT_USAGE
from qvm.layout.rundir import RunDir

if TYPE_CHECKING:
    from qvm.control.disk import DiskAttach
    from qvm.control.nic import NicAdd
    from qvm.control.pci import PciListing
    from qvm.control.transaction import DeviceUnplug, ListedDevice, Removal
    from qvm.definition.persist import EntryPersistResult, PersistResult

_Listed = TypeVar("_Listed", bound="ListedDevice")
_Result = TypeVar("_Result")


def size_argument(name: str, option: str, text: str) -> int:
    """A size on the command line ("256M", "1G", bytes), or one line saying why not."""
    from qvm.base.sizes import SizeError, parse_size

    try:
        return parse_size(text)
    except SizeError as error:
        abort(f"{name}: {option}: {error}", EXIT_USAGE)


def machine_file(run: RunDir) -> Path:
    """The TOML the running VM came from (``--persist`` writes there)."""
    from qvm.store.launch import read_launch

    launch = read_launch(run.launch_file)
    file = launch.machine_file if launch is not None else None
    if not file:
        abort(f"{run.name}: --persist: the run dir does not say which machine file it came from")
    return Path(file)


def follow_persist(run: RunDir, done: PersistResult | EntryPersistResult) -> None:
    """The running VM's record takes the machine file qvm's own ``--persist`` wrote: the
    file describes the VM as it runs, not a change for its next start."""
    from qvm.store.launch import follow_persist as follow

    follow(run.launch_file, done.sha256_before, done.sha256_after)


def persisted_json(run: RunDir, done: EntryPersistResult) -> dict[str, Any]:
    """A ``[[disk]]``/``[[nic]]`` written or removed (the run's record follows it), for
    output: the file absolute, as it is wherever the output is read."""
    follow_persist(run, done)
    return {
        "file": str(Path(done.path).absolute()),
        "table": done.table,
        "action": done.action,
        "entry": done.entry,
    }


def unplug_problems(name: str, unplug: DeviceUnplug, what: str) -> None:
    """Exit with one line unless the device and its backend are gone: refused (1),
    pending (3), or removed but its backend could not be deleted (1)."""
    from qvm.control.transaction import pending_text

    if unplug.outcome == "refused":
        abort(f"{name}: {unplug.id}: {unplug.detail}; the {what} stays")
    if unplug.outcome == "pending":
        abort(pending_text(name, unplug.id, unplug.detail, what), EXIT_PENDING)
    if unplug.cleanup_errors:
        fail_all([f"{name}: {unplug.id} was removed, but {e}" for e in unplug.cleanup_errors])


def show_listing(
    name: str,
    listing: PciListing[_Listed],
    as_json: bool,
    headers: list[str],
    row: Callable[[_Listed], list[Any]],
    words: str,
) -> None:
    """``disk list`` and ``nic list``: the listing as JSON, or a table of its devices (a
    ``row`` each), the free PCI places and what the guest says it has (its ``words``)."""
    if as_json:
        emit_json(listing.as_json())
        return
    say(table(headers, [row(device) for device in listing.devices]))
    say(f"{name}: {listing.places.summary()}")
    if listing.guest is not None:
        seen = ", ".join(listing.guest) or "none"
        say(f"{name}: the guest reports {words}: {seen} (its own QVM-STATE line)")


def say_plugged(
    name: str,
    result: DiskAttach | NicAdd,
    verb: str,
    dev_id: str,
    persisted: dict[str, Any] | None,
) -> None:
    """The end of ``disk attach``/``nic add``: a --force warning, the PCI places left, and
    the entry --persist added to the machine file."""
    if result.forced_after_unplug:
        warn(f"qvm: {name}: {verb} after a vCPU unplug under TCG (--force)")
    say(f"{name}: {result.places.summary()}")
    if persisted:
        say(f"{name}: added a [[{persisted['table']}]] for {dev_id} to {persisted['file']}")


def unplug_waiting(
    name: str, dev_id: str, timeout: float, remove: Callable[..., _Result]
) -> tuple[RunDir, _Result]:
    """``remove(run, dev_id, timeout=...)``, an unplug of the device ``dev_id`` of the VM
    ``name``, while the guest is waited for: the VM's run dir, and what ``remove`` gave."""
    from qvm.cli.progress import run_waiting

    timeout = resolve.timeout_seconds(timeout)
    run = resolve.run_dir_of(name)
    label = f"{name}: waiting for the guest to release {dev_id}"
    return run, run_waiting(label, remove, run, dev_id, timeout=timeout)


def remove_device(
    name: str,
    dev_id: str,
    timeout: float,
    remove: Callable[..., Removal[_Listed]],
    unpersist: Callable[[RunDir, _Listed], dict[str, Any]] | None,
    as_json: bool,
    what: str,
    removed_text: Callable[[Removal[_Listed]], str],
) -> None:
    """``disk detach`` and ``nic del``: ``remove(run, dev_id, timeout=...)`` (a
    ``Removal``) while the guest is waited for; once the device is gone, with --persist,
    ``unpersist(run, device)`` takes its entry out of the machine file. Then the result
    (``removed_text`` says what went) and the exit ``unplug_problems`` decides."""
    run, result = unplug_waiting(name, dev_id, timeout, remove)
    unplug = result.unplug
    persisted = None
    if unpersist is not None and unplug.outcome == "removed":
        persisted = unpersist(run, result.device)
    if as_json:
        emit_json({**result.as_json(), "persisted": persisted})
    elif unplug.outcome == "removed":
        say(f"{name}: {removed_text(result)}")
        if persisted is not None:
            entry = f"[[{result.key}]]"
            if persisted["action"] == "removed":
                say(f"{name}: removed its {entry} from {persisted['file']}")
            else:
                say(f"{name}: {persisted['file']} has no {entry} for it: nothing to remove")
    if unpersist is not None and persisted is None:
        warn(f"qvm: {name}: --persist: not written, the live change did not complete")
    unplug_problems(name, unplug, what)
