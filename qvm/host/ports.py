"""Host ports for forwards: is one free, pick a free one, who holds it (psutil: the only
portable way to map a socket to its process).
"""

from __future__ import annotations


def pick_free_port(host_addr: str, protocol: str) -> int:
    import socket

    kind = socket.SOCK_STREAM if protocol == "tcp" else socket.SOCK_DGRAM
    with socket.socket(socket.AF_INET, kind) as sock:
        sock.bind((host_addr, 0))
        return int(sock.getsockname()[1])


def port_in_use(host_addr: str, port: int, protocol: str) -> bool:
    import socket

    kind = socket.SOCK_STREAM if protocol == "tcp" else socket.SOCK_DGRAM
    with socket.socket(socket.AF_INET, kind) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind((host_addr, port))
        except OSError:
            return True
    return False


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
