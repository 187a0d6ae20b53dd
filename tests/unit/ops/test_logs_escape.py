"""`qvm logs` on a terminal (issue 12): what the guest wrote cannot drive the user's
terminal. The neutraliser (qvm.ops.files.TerminalSafe) is pure; piped output and --raw
keep the bytes, checked through the real CLI."""

from __future__ import annotations

import contextlib
import shutil
from collections.abc import Iterator

from framework.harness import Qvm, short_tmpdir
from hypothesis import given
from hypothesis import strategies as st

from qvm.ops.files import TerminalSafe


def shown(*chunks: bytes) -> bytes:
    safe = TerminalSafe()
    return b"".join(safe.feed(c) for c in chunks) + safe.flush()


def test_escape_sequences_are_shown_not_obeyed() -> None:
    assert (
        shown(b"qvm-guest:/# \x1b[6nQVM-GUEST-READY\r\n") == b"qvm-guest:/# ^[[6nQVM-GUEST-READY\n"
    )
    assert shown(b"\x1b]0;title\x07") == b"^[]0;title^G"  # OSC: set the window title
    assert shown(b"\xc2\x9b6n") == b"\\x9b6n"  # C1 CSI, UTF-8 encoded
    assert shown(b"\x9b6n\xff") == b"\\x9b6n\\xff"  # bytes that are not UTF-8
    assert shown(b"bar\rfoo\x7f\x00") == b"bar^Mfoo^?^@"
    assert shown("grüße ✓\tok\n".encode()) == "grüße ✓\tok\n".encode()


def test_a_sequence_split_between_reads_is_the_same() -> None:
    data = "a\r\nü\x1b[6n\r".encode()
    whole = shown(data)
    for cut in range(len(data) + 1):
        assert shown(data[:cut], data[cut:]) == whole
    assert whole == "a\nü^[[6n^M".encode()


@given(st.lists(st.binary(max_size=64), max_size=6))
def test_nothing_but_newline_and_tab_survives_below_0x20_and_all_is_printable(
    chunks: list[bytes],
) -> None:
    out = shown(*chunks)
    assert not any(b < 0x20 and b not in (0x0A, 0x09) for b in out)
    text = out.decode("utf-8")  # valid UTF-8, whatever came in
    assert all(c.isprintable() or c in "\n\t" for c in text)
    assert "\x7f" not in text


@given(st.text(st.characters(min_codepoint=0x20, max_codepoint=0x7E) | st.sampled_from("\n\t")))
def test_plain_text_passes_unchanged(text: str) -> None:
    assert shown(text.encode()) == text.encode()


@contextlib.contextmanager
def stopped_vm_with_serial_log(data: bytes) -> Iterator[Qvm]:
    """A state dir (removed at the end) where the stopped vm1's serial log holds ``data``."""
    root = short_tmpdir()
    try:
        qvm = Qvm(root)
        qvm.guest_machine("vm1")
        run = qvm.run_dir("vm1")
        run.mkdir(parents=True, mode=0o700)
        qvm.state_dir.chmod(0o700)
        (run / "serial.log").write_bytes(data)
        yield qvm
    finally:
        shutil.rmtree(root, ignore_errors=True)


def test_piped_and_raw_logs_are_the_guests_bytes() -> None:
    data = b"hello \x1b[6n\r\n\xff"
    with stopped_vm_with_serial_log(data) as qvm:
        for extra in ((), ("--raw",)):
            done = qvm_bytes(qvm, "logs", "vm1", *extra)
            assert done == data


def qvm_bytes(qvm: Qvm, *args: str) -> bytes:
    import subprocess

    from framework.harness import QVM_BIN

    done = subprocess.run(
        [str(QVM_BIN), *args], capture_output=True, env=qvm.env(), cwd=qvm.root, check=True
    )
    return done.stdout


def test_on_a_terminal_logs_are_neutralised() -> None:
    import os
    import pty
    import subprocess

    from framework.harness import QVM_BIN

    with stopped_vm_with_serial_log(b"hello \x1b[6n\r\n") as qvm:
        leader, follower = pty.openpty()
        done = subprocess.run(
            [str(QVM_BIN), "logs", "vm1"], stdout=follower, env=qvm.env(), cwd=qvm.root, check=True
        )
        os.close(follower)
        assert done.returncode == 0
        out = b""
        while True:
            try:
                chunk = os.read(leader, 4096)
            except OSError:  # EIO: the terminal's other end is closed and all was read
                break
            if not chunk:
                break
            out += chunk
        os.close(leader)
        # the terminal's own line discipline turns \n into \r\n: the escape is text now
        assert out.replace(b"\r\n", b"\n") == b"hello ^[[6n\n"
