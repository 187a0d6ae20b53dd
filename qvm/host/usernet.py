"""The host ports QEMU bound for forwards with host port 0, read from HMP ``info usernet``.

A forward with host port 0 goes to QEMU as port 0 (``hostfwd=tcp:127.0.0.1:0-:22``,
``hostfwd_add``): the kernel picks the port when QEMU binds it, so two VMs started at
once cannot both be handed one port, as they could when qvm probed a free port and QEMU
bound it later. The port is then read back from ``info usernet``, which lists each
user-mode netdev's forwards under ``Hub -1 (NETDEV):``, newest first::

    Hub -1 (net0):
      Protocol[State]    FD  Source Address  Port   Dest. Address  Port RecvQ SendQ
      TCP[HOST_FORWARD]  11       127.0.0.1 41753       10.0.2.15    22     0     0
      UDP[HOST_FORWARD]  13               * 40330       10.0.2.15     9     0     0

(``*`` is 0.0.0.0). Pure: the supervisor (at each QEMU start) and ``qvm.control``
(``nic add``, ``port add``) ask QEMU and hand the reply here.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Sequence

from qvm.base.record import Record
from qvm.store.launch import Forward

USERNET_COMMAND = "info usernet"

_NETDEV = re.compile(r"Hub -?[0-9]+ \((?P<netdev>[^)]*)\):")
_FORWARD = re.compile(
    r"\s*(?P<proto>TCP|UDP)\[HOST_FORWARD\]\s+[0-9]+\s+(?P<host_addr>\S+)\s+(?P<host_port>[0-9]+)"
    r"\s+\S+\s+(?P<guest_port>[0-9]+)\b"
)


class BoundForward(Record):
    """One forward as QEMU lists it: the host port it really listens on."""

    netdev: str
    proto: str  # "tcp" or "udp", as qvm spells them
    host_addr: str
    host_port: int
    guest_port: int


def parse_usernet(text: str) -> tuple[BoundForward, ...]:
    """Every host forward in an ``info usernet`` reply, in the order QEMU lists them
    (per netdev, newest first). Lines that are no forward (connections, headers) are
    skipped; a forward before any netdev header has no netdev and is skipped too."""
    bound = []
    netdev: str | None = None
    for line in text.splitlines():
        header = _NETDEV.match(line)
        if header is not None:
            netdev = header["netdev"]
            continue
        row = _FORWARD.match(line)
        if row is None or netdev is None:
            continue
        addr = row["host_addr"]
        bound.append(
            BoundForward(
                netdev=netdev,
                proto=row["proto"].lower(),
                host_addr="0.0.0.0" if addr == "*" else addr,
                host_port=int(row["host_port"]),
                guest_port=int(row["guest_port"]),
            )
        )
    return tuple(bound)


def bind_ports(
    forwards: Sequence[Forward], bound: Iterable[BoundForward], known: Iterable[Forward] = ()
) -> tuple[Forward, ...]:
    """``forwards`` with each host port 0 replaced by the port QEMU bound for it.

    ``known``: forwards QEMU already had before (their ports are not the new ones). A
    listed forward is taken once, by the first forward of the same netdev, protocol,
    host address and guest port; several such forwards are alike, so which port goes to
    which does not matter. A forward QEMU does not list keeps port 0: the caller says so.
    """
    free = list(reversed(tuple(bound)))  # oldest first: the first forward, the first port
    for taken in (*known, *(f for f in forwards if f.host_port)):
        match = _listed(free, taken, taken.host_port)
        if match is not None:
            free.remove(match)
    resolved = []
    for forward in forwards:
        if forward.host_port == 0:
            match = _listed(free, forward, None)
            if match is not None:
                free.remove(match)
                forward = forward._replace(host_port=match.host_port)
        resolved.append(forward)
    return tuple(resolved)


def _listed(free: list[BoundForward], forward: Forward, port: int | None) -> BoundForward | None:
    for entry in free:
        if (entry.netdev, entry.proto, entry.host_addr, entry.guest_port) == (
            forward.nic,
            forward.proto,
            forward.host_addr,
            forward.guest_port,
        ) and (port is None or entry.host_port == port):
            return entry
    return None


def unbound(forwards: Iterable[Forward]) -> tuple[Forward, ...]:
    """The forwards still waiting for the port QEMU binds (host port 0)."""
    return tuple(f for f in forwards if f.host_port == 0)
