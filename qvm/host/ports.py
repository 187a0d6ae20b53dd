"""Host ports for forwards: is a fixed one free, who holds it (psutil: the only portable
way to map a socket to its process). qvm picks no port itself: host port 0 goes to QEMU,
which binds a port the kernel picks (``qvm.host.usernet`` reads it back), so two ``up``s
at once cannot race between a probe and QEMU's bind.

A bind that fails for another reason than a taken port (an address this host does not
have, a privileged port) is a HostError saying so, not "in use" and not a traceback.
"""

from __future__ import annotations

import errno

from qvm.definition.host_checks import ADDRESS_HINT, address_problem
from qvm.errors import HostError


def check_address(host_addr: str, protocol: str) -> None:
    """A forward with host port 0, which QEMU binds: HostError, before QEMU is asked, if
    this host has no such address (QEMU would only say "Could not set up host forwarding
    rule"). Binds port 0 for a moment, which takes no port for good."""
    problem = address_problem(host_addr, protocol)
    if problem is not None:
        raise HostError(f"forward {protocol}:{host_addr}:0: {problem} (hint: {ADDRESS_HINT})")


def port_in_use(host_addr: str, port: int, protocol: str) -> bool:
    """Whether another socket holds ``host_addr:port``; HostError if it cannot be bound
    for another reason."""
    # `qvm up` without fixed ports has no use for socket (2-3 ms)
    import socket  # noqa: PLC0415 -- see the comment above

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
    import psutil  # noqa: PLC0415 -- only on an error: psutil costs ~16 ms

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
