"""The supervisor's protocol, shared by both ends: one JSON line each way on
``supervisor.sock``. Stdlib only: the spawn code reads it before asyncio exists.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import socket




def read_line(sock: socket.socket) -> bytes:
    """One newline-terminated message (or what came before the peer closed)."""
    data = b""
    while not data.endswith(b"\n"):
        chunk = sock.recv(4096)
        if not chunk:
            break
        data += chunk
    return data
