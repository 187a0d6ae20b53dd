"""``shares.json``: the host folders of the current QEMU run (the machine file's and those
``qvm share add`` added), each with its virtiofsd process and whether the guest has it
mounted. The VM's supervisor owns the daemons and writes the file; it is read by
``qvm share list``/``del``, snapshots and status. ``launch.json`` carries the boot shares
(``ShareRecord`` without a daemon), which the supervisor starts before QEMU.

No pathlib here: the supervisor imports this module (``qvm.layout.runfiles``).
"""

from __future__ import annotations

import os

from qvm.base.checking import TYPE_CHECKING
from qvm.base.jsonfile import write_json_atomic
from qvm.store.fields import Fields, PlainRecord, read_record

if TYPE_CHECKING:
    from typing import Self

ORIGINS = ("boot", "qvm")
MOUNT_STATES = ("waiting", "mounted", "failed", "unmounted")
_HINT = "the VM's supervisor writes it anew at each QEMU start (qvm restart)"


class ShareRecord(PlainRecord):
    """One share of a QEMU run. ``id`` is its device id and the guest's mount tag."""

    id: str
    host: str  # absolute
    guest: str
    readonly: bool
    via: str  # one of SHARE_VIAS
    origin: str = "boot"  # one of ORIGINS
    socket: str | None = None  # virtiofsd's vhost-user socket (virtiofs)
    pid: int | None = None  # virtiofsd's pid and start time (its identity)
    start_time: int | None = None
    mount: str = "waiting"  # one of MOUNT_STATES: the guest's mount, by its agent's word
    mount_error: str | None = None  # why the guest could not mount it

    @classmethod
    def read(cls, f: Fields) -> Self:
        # launch.json's reader imports this module: `qvm status` of a VM without shares
        # reads none, and needs no device-kind table
        from qvm.layout.kinds import SHARE_VIAS  # noqa: PLC0415 -- see the comment above

        return f.declared(
            cls,
            via=f.one_of("via", SHARE_VIAS),
            origin=f.one_of("origin", ORIGINS, "boot"),
            pid=f.pid("pid", None),
            mount=f.one_of("mount", MOUNT_STATES, "waiting"),
        )


def read_shares(path: str | os.PathLike[str]) -> tuple[ShareRecord, ...]:
    """The shares in ``shares.json`` at ``path`` (none when there is no file)."""
    f = read_record(path, lambda data, source: Fields(data, source, _HINT), _HINT)
    return () if f is None else f.records("shares", ShareRecord.read, ())


def write_shares(path: str | os.PathLike[str], shares: tuple[ShareRecord, ...]) -> None:
    write_json_atomic(path, {"shares": [share.to_json() for share in shares]})


def find_share(shares: tuple[ShareRecord, ...], guest: str) -> ShareRecord | None:
    """The share mounted at ``guest`` (a trailing ``/`` does not matter)."""
    wanted = guest.rstrip("/") or "/"
    return next((s for s in shares if s.guest.rstrip("/") == wanted), None)
