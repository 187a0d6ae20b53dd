"""Serial console access: attach a terminal to the console socket, follow a log file."""

from __future__ import annotations

import array
import fcntl
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


# piped input: once the guest has taken all of it, qvm detaches after this much silence
# from the guest (its answer to the last line is printed first)
QUIET_SECONDS = 1.0
# ... and gives up on a guest that does not read its serial port for this long
DRAIN_TIMEOUT = 60.0
POLL_SECONDS = 0.05


def attach(console_socket: Path, in_fd: int, out_fd: int) -> int:
    """Relay bytes between a terminal and the guest's serial port until Ctrl-] or, for
    piped input, the end of it once the guest has read it all and gone quiet. Returns the
    bytes of input the guest had not read when qvm gave up waiting (0: it read them all).

    The terminal is put in raw mode so that keys such as Ctrl-C reach the guest.
    """
    saved = termios.tcgetattr(in_fd) if os.isatty(in_fd) else None
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        sock.connect(str(console_socket))
        try:
            if saved is not None:
                tty.setraw(in_fd)
            return _relay(sock, in_fd, out_fd)
        finally:
            if saved is not None:
                termios.tcsetattr(in_fd, termios.TCSADRAIN, saved)


def unread_bytes(sock: socket.socket) -> int:
    """What the other end (QEMU) has not read yet of what was sent on ``sock``: on a
    Unix stream socket, Linux charges sent data to the sender until the receiver reads it
    (SIOCOUTQ). QEMU reads from the console socket only as the guest's UART takes bytes,
    so 0 means the guest has been given all of the input."""
    pending = array.array("i", [0])
    fcntl.ioctl(sock.fileno(), termios.TIOCOUTQ, pending, True)
    return pending[0]


def _relay(sock: socket.socket, in_fd: int, out_fd: int) -> int:
    stdin_open = True
    input_ended = last_output = drained_at = 0.0
    while True:
        watched: list[socket.socket | int] = [sock, in_fd] if stdin_open else [sock]
        readable, _, _ = select.select(watched, [], [], None if stdin_open else POLL_SECONDS)
        now = time.monotonic()
        if sock in readable:
            data = sock.recv(65536)
            if not data:
                return 0
            os.write(out_fd, data)
            last_output = now
        if in_fd in readable:
            data = os.read(in_fd, 4096)
            if not data:
                stdin_open = False  # piped input ended: detach once the guest has read it
                input_ended = now
                continue
            if ESCAPE in data:
                sock.sendall(data.split(ESCAPE, 1)[0])
                return 0
            sock.sendall(data)
        if stdin_open:
            continue
        unread = unread_bytes(sock)
        if unread:
            drained_at = 0.0
            if now - input_ended > DRAIN_TIMEOUT:
                return unread
            continue
        drained_at = drained_at or now
        if now - max(drained_at, last_output) >= QUIET_SECONDS:
            return 0


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
