"""A VM's side of its private networks, in its run dir: ``networks.json``, the NICs on
networks with their addresses (written by ``qvm up`` and ``nic add --network`` before
QEMU joins), and ``network-state.json``, the supervisor's word on each link (joined, the
switch died, rejoined, cut) and on the guest's setup (addresses and ``/etc/hosts``).
The second is stamped with its QEMU run: an earlier run's means nothing.

Stdlib only, without pathlib (the supervisor reads and writes both).
"""

from __future__ import annotations

import os
from typing import Any

from qvm.base.jsonfile import write_json_atomic
from qvm.base.record import Record
from qvm.store.fields import Fields, PlainRecord, read_record
from qvm.store.state import QemuRun

_HINT = "qvm restart rewrites it"
LINK_STATES = ("joined", "rejoined", "down")


class NetNic(PlainRecord):
    """One NIC on a network: the facts the supervisor needs to rejoin and set it up."""

    nic: str
    network: str
    mac: str
    address: str
    prefix: int
    hub: int  # the QEMU hub its uplink sits on (qvm.cmdline.argv.uplink_args)


def read_netnics(path: str | os.PathLike[str]) -> tuple[NetNic, ...]:
    record = read_record(path, lambda data, source: Fields(data, source, _HINT), _HINT)
    return () if record is None else record.records("nics", NetNic.read, ())


def write_netnics(path: str | os.PathLike[str], nics: tuple[NetNic, ...]) -> None:
    write_json_atomic(path, {"nics": [n.to_json() for n in nics]})


class LinkState(PlainRecord):
    nic: str
    network: str
    state: str  # one of LINK_STATES
    rejoins: int = 0
    error: str | None = None  # why it is down

    @classmethod
    def read(cls, f: Fields) -> LinkState:
        return f.declared(cls, state=f.one_of("state", LINK_STATES))


class NetworkState(Record):
    run: QemuRun
    links: tuple[LinkState, ...] = ()
    guest_configured: bool = False  # the guest has every address and hosts line now
    guest_error: str | None = None  # why not (yet)
    guest_at: float | None = None  # when it last was

    @classmethod
    def read(cls, f: Fields) -> NetworkState:
        return cls(
            run=QemuRun.stamp_of(f),
            links=f.records("links", LinkState.read, ()),
            guest_configured=f.bool("guest_configured", False),
            guest_error=f.str("guest_error", None),
            guest_at=f.float("guest_at", None),
        )

    def to_json(self) -> dict[str, Any]:
        return {
            **self.run.stamp(),
            "links": [link.to_json() for link in self.links],
            "guest_configured": self.guest_configured,
            "guest_error": self.guest_error,
            "guest_at": self.guest_at,
        }

    def link(self, nic: str) -> LinkState | None:
        return next((link for link in self.links if link.nic == nic), None)


def read_network_state(path: str | os.PathLike[str], current: QemuRun) -> NetworkState | None:
    """The supervisor's record for the ``current`` QEMU run, or None."""
    state = read_record(
        path, lambda data, source: NetworkState.read(Fields(data, source, _HINT)), _HINT
    )
    return state if state is not None and state.run.is_current(current) else None


def write_network_state(path: str | os.PathLike[str], state: NetworkState) -> None:
    write_json_atomic(path, state.to_json())
