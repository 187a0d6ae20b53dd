"""A piped `qvm console` detaches at the end of its input once the guest has read it
(issue 12). The guest's side is a real socket here: what qvm relies on is the kernel's
count of bytes the other end has not read yet (qvm.ops.console.unread_bytes)."""

from __future__ import annotations

import os
import socket
import threading
import time

import pytest

from qvm.ops import console


def test_unread_bytes_counts_what_the_peer_has_not_read() -> None:
    ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    with ours, theirs:
        assert console.unread_bytes(ours) == 0
        ours.sendall(b"echo hi\n")
        assert console.unread_bytes(ours) > 0
        assert theirs.recv(3) == b"ech"
        assert console.unread_bytes(ours) > 0  # a part read is not all read
        assert theirs.recv(100) == b"o hi\n"
        assert console.unread_bytes(ours) == 0


def test_piped_input_detaches_once_the_slow_guest_read_it_and_answered() -> None:
    ours, guest = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    stdin_read, stdin_write = os.pipe()
    stdout_read, stdout_write = os.pipe()
    got = bytearray()

    def slow_guest() -> None:
        time.sleep(1.5)  # busy: it reads nothing for longer than qvm's quiet time
        while not got.endswith(b"\n"):
            got.extend(guest.recv(1))  # one byte at a time, as a UART
            time.sleep(0.01)
        time.sleep(0.3)
        guest.sendall(b"hi\r\n")

    thread = threading.Thread(target=slow_guest)
    thread.start()
    os.write(stdin_write, b"echo hi\n")
    os.close(stdin_write)
    started = time.monotonic()
    with ours, guest:
        unread = console._relay(ours, stdin_read, stdout_write)
        took = time.monotonic() - started
    thread.join()
    os.close(stdout_write)
    assert unread == 0
    assert bytes(got) == b"echo hi\n"
    assert os.read(stdout_read, 100) == b"hi\r\n"  # the answer came before qvm detached
    assert 1.8 < took < 1.5 + 0.3 + 0.2 + console.QUIET_SECONDS + 1.5
    os.close(stdin_read)
    os.close(stdout_read)


def test_a_guest_that_never_reads_is_given_up_on(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(console, "DRAIN_TIMEOUT", 0.5)
    ours, guest = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    stdin_read, stdin_write = os.pipe()
    os.write(stdin_write, b"ls\n")
    os.close(stdin_write)
    out = os.open(os.devnull, os.O_WRONLY)
    with ours, guest:
        assert console._relay(ours, stdin_read, out) > 0
    os.close(stdin_read)
    os.close(out)
