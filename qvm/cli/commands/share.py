"""Shared host folders on a running VM: share list, add, del."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

from qvm.cli import device_options, resolve
from qvm.cli.output import emit_json, ms, say, table, warn
from qvm.cli.parsing import declare
from qvm.cli.parsing.declare import AS_JSON, MACHINE, Argument, Commands, Option

if TYPE_CHECKING:
    from qvm.control.share import ShareInfo
    from qvm.control.transaction import Removal

commands = Commands(help="List, add and remove shared host folders of a running VM.")


@commands.command("list")
def list_cmd(name: str = MACHINE, as_json: bool = AS_JSON) -> None:
    """Every share (the machine file's and those added), its host folder, where the guest
    has it mounted and its virtiofsd.

    JSON: schemas/share-list.json
    """
    from qvm.control.share import list_shares

    shares = list_shares(resolve.run_dir_of(name))
    if as_json:
        emit_json(shares.as_json())
        return
    rows = [
        [s.id, s.origin, s.host, s.guest, "ro" if s.readonly else "rw", s.via, _mount_text(s)]
        for s in shares.shares
    ]
    say(table(["ID", "ORIGIN", "HOST", "GUEST", "MODE", "VIA", "MOUNT"], rows))
    if not shares.shared_memory:
        say(f"{name}: booted without shared memory: share add is refused (memory.shared)")


def _mount_text(share: ShareInfo) -> str:
    return f"{share.mount}: {share.mount_error}" if share.mount_error else share.mount


@commands.command("add")
def add(
    name: str = MACHINE,
    host: str = Argument(..., metavar="HOST", help="The host folder to share."),
    guest: str = Argument(..., metavar="GUEST", help="Where the guest mounts it (absolute)."),
    readonly: bool = Option(
        False, "--readonly", help="The guest cannot write (enforced on the host)."
    ),
    via: str = Option(
        "virtiofs", "--via", help="virtiofs (the only one a running VM can take; 9p: at start)."
    ),
    as_json: bool = AS_JSON,
) -> None:
    """Share a host folder with a running VM (virtiofsd, chardev-add, device_add of a
    vhost-user-fs-pci; undone if a step fails) and mount it in the guest through its
    agent. The VM needs shared memory (memory.shared = true, or a [[share]] at boot).

    JSON: schemas/share-add.json
    """
    from qvm.cli.progress import run_waiting
    from qvm.control.share import add_share

    run = resolve.run_dir_of(name)
    result = run_waiting(
        f"{name}: adding the share", add_share, run, Path(host), guest, readonly, via
    )
    if as_json:
        emit_json(result.as_json())
        return
    share = result.share
    mode = "read-only" if share.readonly else "read-write"
    say(f"{name}: added {share.id}: {share.host} ({mode}, virtiofsd pid {share.daemon_pid})")
    if share.mount == "mounted":
        say(f"{name}: the guest mounted it at {share.guest} ({ms(result.seconds)} in all)")
    else:
        warn(f"qvm: {name}: the guest did not mount it at {share.guest}: {share.mount_error}")


@commands.command("del")
def delete(
    name: str = MACHINE,
    guest: str = Argument(..., metavar="GUEST", help="The share's guest path (qvm share list)."),
    timeout: float = declare.UNPLUG_TIMEOUT,
    as_json: bool = AS_JSON,
) -> None:
    """Unmount a share qvm added in the guest (refused while busy, naming who holds it),
    unplug it and stop its virtiofsd. Pending: exit status 3.

    JSON: schemas/share-del.json
    """
    from qvm.control.share import remove_share

    device_options.remove_device(
        name, guest, timeout, remove_share, None, as_json, "share", _removed_text
    )


def _removed_text(result: Removal[ShareInfo]) -> str:
    share = result.device
    return (
        f"unmounted {share.guest} and removed {share.id} in {ms(result.unplug.seconds)}; "
        "its virtiofsd is stopped"
    )
