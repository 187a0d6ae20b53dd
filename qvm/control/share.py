"""Shares on a running VM: list, add (virtiofs) and remove, the guest's mount included.

Add is one hotplug transaction (``qvm.control.transaction``): the supervisor starts the
share's virtiofsd (``qvm-share-start``, its own relay command; undone by
``qvm-share-stop``), ``chardev-add`` of a socket client to it, ``device_add`` of a
``vhost-user-fs-pci`` on a free PCIe root port (q35) or ``pci.0`` (pc); then the guest's
agent mounts it. QEMU 7.2 needs the VM's RAM shared for that (``memory.shared``, or a
virtiofs [[share]] at boot): a VM that booted without is refused before anything happens.
9p shares exist only from the start (QEMU has no 9p hotplug).

Remove unmounts in the guest first (a busy mount is refused, naming the processes that
hold it), then ``device_del``, ``chardev-remove`` and ``qvm-share-stop``.

Nothing here prints.
"""

from __future__ import annotations

import os
import time
from pathlib import Path
from typing import Any

from qvm.base.record import Record
from qvm.base.text import display_path
from qvm.cmdline.argv import has_shared_memory, share_chardev
from qvm.cmdline.share_mount import holders_argv, mount_argv, unmount_argv
from qvm.control import transaction
from qvm.control.agent import open_agent
from qvm.control.guest_exec import run_to_end
from qvm.control.pci import choose_pci_bus, pci_places
from qvm.control.qmp_session import QmpSession
from qvm.definition.load import guest_path_problem
from qvm.errors import AgentError, HotplugError, QvmError, UsageError
from qvm.layout import kinds
from qvm.layout.rundir import RunDir
from qvm.store.launch import LaunchRecord
from qvm.store.pending import pending_ids
from qvm.store.shares import ShareRecord, find_share, read_shares
from qvm.supervisor.wire import SHARE_MOUNTED, SHARE_START, SHARE_STOP

DEFAULT_UNPLUG_TIMEOUT = 10.0
MOUNT_TIMEOUT = 30.0
SHARE = transaction.Peripheral(kinds.SHARE.noun)


class ShareInfo(Record, transaction.ListedDevice):
    id: str  # the device id and the guest's mount tag
    host: str
    guest: str
    readonly: bool
    via: str
    origin: str  # "boot" (the machine file) or "qvm" (qvm share add)
    mount: str  # "waiting", "mounted", "failed", "unmounted": the guest's, by its agent
    mount_error: str | None = None
    daemon_pid: int | None = None  # virtiofsd's
    pending: bool = False


class ShareList(Record):
    name: str
    shares: list[ShareInfo]
    shared_memory: bool  # whether `share add` can plug one into this QEMU run

    def as_json(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "shares": [share.as_json() for share in self.shares],
            "shared_memory": self.shared_memory,
        }


def _info(share: ShareRecord, pending: set[str]) -> ShareInfo:
    same = {name: getattr(share, name) for name in ShareInfo._fields if name in share._fields}
    return ShareInfo(**same, daemon_pid=share.pid, pending=share.id in pending)


def _listing(run: RunDir, launch: LaunchRecord) -> ShareList:
    pending = pending_ids(run)
    shares = [_info(share, pending) for share in read_shares(run.shares_file)]
    return ShareList(run.name, shares, has_shared_memory(launch.argv))


def list_shares(run: RunDir) -> ShareList:
    with transaction.opened(run) as (_, launch):  # "not running" first
        return _listing(run, launch)


# --- add -------------------------------------------------------------------------------


class ShareAdd(Record):
    name: str
    share: ShareInfo
    seconds: float

    def as_json(self) -> dict[str, Any]:
        return {"name": self.name, "share": self.share.as_json(), "seconds": self.seconds}


def check_add(run: RunDir, launch: LaunchRecord, host: Path, guest: str, via: str) -> None:
    """What is refused before anything happens: bad paths, 9p, a VM without shared RAM."""
    name = run.name
    if via != "virtiofs":
        raise UsageError(
            f"{name}: share add: --via {via}: only virtiofs shares can be added to a running "
            'VM (QEMU has no 9p hotplug) (hint: add a [[share]] with via = "9p" to the machine '
            f"file, then qvm restart {name})"
        )
    if not host.is_dir():
        what = "is not a folder" if host.exists() else "folder not found"
        raise UsageError(f"{name}: share add: HOST: {what}, got {str(host)!r}")
    if "," in str(host):
        raise UsageError(f"{name}: share add: HOST must not contain a comma, got {str(host)!r}")
    problem = guest_path_problem(guest)
    if problem is not None:
        raise UsageError(f"{name}: share add: GUEST {problem}, got {guest!r}")
    if not has_shared_memory(launch.argv):
        file = launch.machine_file
        where = f" in {display_path(file)}" if file else ""
        raise HotplugError(
            f"{name}: share add: this VM booted without shared memory, which virtiofs needs "
            f"(hint: set memory.shared = true{where}, then qvm restart {name})"
        )
    if os.geteuid() != 0:
        raise HotplugError(
            f"{name}: share add: virtiofs needs root: Debian 12's virtiofsd cannot run as "
            "another user (hint: run qvm as root)"
        )


def add_share(run: RunDir, host: Path, guest: str, readonly: bool, via: str) -> ShareAdd:
    """Plug a virtiofs share of ``host`` and mount it at ``guest`` in the guest."""
    launch = transaction.launch_of(run)
    host = Path(os.path.abspath(host))
    check_add(run, launch, host, guest, via)
    guest = guest.rstrip("/")
    started = time.monotonic()
    with transaction.opened(run, launch) as (session, launch):
        shares = read_shares(run.shares_file)
        taken = find_share(shares, guest)
        if taken is not None:
            raise HotplugError(
                f"{run.name}: share add: {guest} is already a share ({taken.id}, of "
                f"{taken.host}) (hint: qvm share del {run.name} {guest} first)"
            )
        bus = choose_pci_bus(pci_places(session, launch), run, launch, "share add")
        ids = transaction.taken_ids(session, run, (s.id for s in shares))
        dev_id = transaction.fresh_id(kinds.SHARE.id_prefix, ids)[1]
        socket = str(run.share_socket(dev_id))
        share = ShareRecord(dev_id, str(host), guest, readonly, via, "qvm", socket)
        chardev = share_chardev(dev_id)
        backend = {
            "type": "socket",
            "data": {"addr": {"type": "unix", "data": {"path": socket}}, "server": False},
        }
        device = {"driver": "vhost-user-fs-pci", "id": dev_id, "chardev": chardev, "tag": dev_id}
        steps = [
            transaction.Step(SHARE_START, share.to_json(), (SHARE_STOP, {"id": dev_id})),
            transaction.Step(
                "chardev-add", {"id": chardev, "backend": backend}, _chardev_cleanup(dev_id)[0]
            ),
            transaction.Step("device_add", device | ({"bus": bus} if bus else {})),
        ]
        transaction.plug(session, run, transaction.Plug("share add", steps))
        mount, error = _guest_mount(run, share)
        _note_mount(session, dev_id, mount, error)
        after = find_share(read_shares(run.shares_file), guest) or share
        info = _info(after._replace(mount=mount, mount_error=error), pending_ids(run))
        return ShareAdd(run.name, info, transaction.since(started))


def _chardev_cleanup(dev_id: str) -> tuple[tuple[str, dict[str, Any]], ...]:
    """What goes with a live share's device: its chardev, then its virtiofsd."""
    return (("chardev-remove", {"id": share_chardev(dev_id)}), (SHARE_STOP, {"id": dev_id}))


def _guest_mount(run: RunDir, share: ShareRecord) -> tuple[str, str | None]:
    """Mount the new share in the guest through its agent: ("mounted", None), or
    ("failed", why) (the device stays: the user may mount it by hand)."""
    argv = mount_argv(share.id, share.guest, share.via, share.readonly)
    try:
        with open_agent(run) as client:
            result = run_to_end(client, argv, MOUNT_TIMEOUT)
    except QvmError as error:
        return "failed", str(error)
    if result is None:
        return "failed", f"mount still running after {MOUNT_TIMEOUT:g} s"
    if result.status != 0:
        said = " ".join(result.stderr.decode(errors="replace").split()) or "no message"
        return "failed", f"mount: exit status {result.status}: {said}"
    return "mounted", None


def _note_mount(session: QmpSession, dev_id: str, mount: str, error: str | None) -> None:
    session.execute(SHARE_MOUNTED, {"id": dev_id, "mount": mount, "mount_error": error})


# --- remove ------------------------------------------------------------------------------


def remove_share(
    run: RunDir, guest: str, timeout: float = DEFAULT_UNPLUG_TIMEOUT
) -> transaction.Removal[ShareInfo]:
    """Unmount the share at ``guest`` in the guest, unplug it, stop its virtiofsd."""
    with transaction.opened(run) as (session, launch):
        listing = _listing(run, launch)
        found = next((s for s in listing.shares if s.guest.rstrip("/") == guest.rstrip("/")), None)
        if found is None:
            known = ", ".join(s.guest for s in listing.shares) or "none"
            raise HotplugError(
                f"{run.name}: no share at {guest} (shares: {known}) "
                f"(hint: qvm share list {run.name})"
            )
        transaction.check_removable(
            run, launch, found.id, found, kinds.SHARE.noun, [s.id for s in listing.shares]
        )
        if found.mount == "mounted":
            _guest_unmount(run, found)
        _note_mount(session, found.id, "unmounted", None)
        unplug = transaction.unplug_one(
            session, run, SHARE, found.id, timeout, cleanup=_chardev_cleanup(found.id)
        )
        return transaction.Removal(run.name, "share", found._replace(mount="unmounted"), unplug)


def _guest_unmount(run: RunDir, share: ShareInfo) -> None:
    """Unmount in the guest; a busy mount is refused, saying which processes hold it."""
    try:
        with open_agent(run) as client:
            result = run_to_end(client, unmount_argv(share.guest), MOUNT_TIMEOUT)
            if result is not None and result.status == 0:
                return
            holders = run_to_end(client, holders_argv(share.guest), MOUNT_TIMEOUT)
    except AgentError as error:
        raise HotplugError(
            f"{run.name}: share del: cannot unmount {share.guest} in the guest: {error} "
            "(hint: unmount it in the guest, then again)"
        ) from None
    said = " ".join((result.stderr if result else b"").decode(errors="replace").split())
    held = []
    if holders is not None and holders.status == 0:
        held = [line.strip() for line in holders.stdout.decode(errors="replace").splitlines()]
    who = f"held by {', '.join(h for h in held if h)}" if any(held) else said or "busy"
    raise HotplugError(
        f"{run.name}: share del: {share.guest} is in use in the guest ({who}); the share "
        "stays (hint: end those processes or leave the folder, then again)"
    )
