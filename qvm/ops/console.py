"""Serial console access: attach a terminal to the console socket, follow a log file."""

from __future__ import annotations

import os
import select
import socket
import termios
import time
import tty
from collections.abc import Callable, Iterator
from pathlib import Path

ESCAPE = b"\x1d"  # Ctrl-], as telnet and virsh console
ESCAPE_NAME = "Ctrl-]"


def attach(console_socket: Path, in_fd: int, out_fd: int) -> None:
    """Relay bytes between a terminal and the guest's serial port until Ctrl-] or EOF.

    The terminal is put in raw mode so that keys such as Ctrl-C reach the guest.
    """
    saved = termios.tcgetattr(in_fd) if os.isatty(in_fd) else None
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        sock.connect(str(console_socket))
        try:
            if saved is not None:
                tty.setraw(in_fd)
            _relay(sock, in_fd, out_fd)
        finally:
            if saved is not None:
                termios.tcsetattr(in_fd, termios.TCSADRAIN, saved)


def _relay(sock: socket.socket, in_fd: int, out_fd: int) -> None:
    stdin_open = True
    while True:
        watched = [sock, in_fd] if stdin_open else [sock]
        readable, _, _ = select.select(watched, [], [])
        if sock in readable:
            data = sock.recv(65536)
            if not data:
                return
            os.write(out_fd, data)
        if in_fd in readable:
            data = os.read(in_fd, 4096)
            if not data:
                stdin_open = False  # piped input ended; keep showing output until the guest closes
                continue
            if ESCAPE in data:
                sock.sendall(data.split(ESCAPE, 1)[0])
                return
            sock.sendall(data)


def read_tail(path: Path, lines: int) -> bytes:
    data = path.read_bytes()
    if lines <= 0:
        return data
    return b"".join(data.splitlines(keepends=True)[-lines:])


def follow_file(
    path: Path, keep_going: Callable[[], bool], interval: float = 0.2
) -> Iterator[bytes]:
    """Yield what is appended to ``path`` until ``keep_going()`` is false and nothing is left."""
    with open(path, "rb") as handle:
        handle.seek(0, os.SEEK_END)
        while True:
            chunk = handle.read()
            if chunk:
                yield chunk
                continue
            if not keep_going():
                return
            time.sleep(interval)
