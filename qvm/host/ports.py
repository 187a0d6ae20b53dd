"""Host ports for forwards: is one free, pick a free one, who holds it (psutil: the only
portable way to map a socket to its process).

A bind that fails for another reason than a taken port (an address this host does not
have, a privileged port) is a HostError saying so, not "in use" and not a traceback.
"""

from __future__ import annotations

import errno
from collections.abc import Iterable
from typing import TYPE_CHECKING

from qvm.definition.host_checks import ADDRESS_HINT
from qvm.errors import HostError

if TYPE_CHECKING:  # socket is imported where a port is bound: `qvm up` without forwards
    import socket  # has no use for it (2-3 ms)


class PortPicker:
    """Picks free host ports that stay distinct: each stays bound until the picker closes,
    so the kernel cannot hand the same port to two forwards of one launch (it did, and
    QEMU refused the second rule). Ports in ``avoid`` (the definition's fixed ones) are
    never returned."""

    def __init__(self, avoid: Iterable[int] = ()) -> None:
        self._held: list[socket.socket] = []
        self._avoid = set(avoid)

    def pick(self, host_addr: str, protocol: str) -> int:
        import socket

        kind = socket.SOCK_STREAM if protocol == "tcp" else socket.SOCK_DGRAM
        for _ in range(_PICK_TRIES):
            sock = socket.socket(socket.AF_INET, kind)
            self._held.append(sock)
            try:
                sock.bind((host_addr, 0))
            except OSError as error:
                raise _bind_error(host_addr, 0, protocol, error) from None
            port = int(sock.getsockname()[1])
            if port not in self._avoid:
                self._avoid.add(port)
                return port
        raise HostError(
            f"forward {protocol}:{host_addr}:0: no free port found in {_PICK_TRIES} tries "
            "(hint: name a host port)"
        )

    def close(self) -> None:
        for sock in self._held:
            sock.close()
        self._held.clear()

    def __enter__(self) -> PortPicker:
        return self

    def __exit__(self, *_exc: object) -> None:
        self.close()


_PICK_TRIES = 50


def pick_free_port(host_addr: str, protocol: str) -> int:
    with PortPicker() as picker:
        return picker.pick(host_addr, protocol)


def port_in_use(host_addr: str, port: int, protocol: str) -> bool:
    """Whether another socket holds ``host_addr:port``; HostError if it cannot be bound
    for another reason."""
    import socket

    kind = socket.SOCK_STREAM if protocol == "tcp" else socket.SOCK_DGRAM
    with socket.socket(socket.AF_INET, kind) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind((host_addr, port))
        except OSError as error:
            if error.errno == errno.EADDRINUSE:
                return True
            raise _bind_error(host_addr, port, protocol, error) from None
    return False


def _bind_error(host_addr: str, port: int, protocol: str, error: OSError) -> HostError:
    if error.errno == errno.EADDRNOTAVAIL:
        return HostError(
            f"forward {protocol}:{host_addr}:{port}: host address {host_addr} is not an "
            f"address of this host (hint: {ADDRESS_HINT})"
        )
    return HostError(
        f"forward {protocol}:{host_addr}:{port}: cannot listen there: "
        f"{error.strerror or error} (hint: pick another host address or port)"
    )


def port_holder(port: int) -> str | None:
    """Which process listens on a port, when this user may know (only asked on error)."""
    import psutil

    try:
        for conn in psutil.net_connections(kind="inet"):
            if conn.laddr and conn.laddr.port == port and conn.pid:
                try:
                    return f"pid {conn.pid} ({psutil.Process(conn.pid).name()})"
                except psutil.Error:
                    return f"pid {conn.pid}"
    except (psutil.Error, OSError):
        return None
    return None
