"""The spinner: drawn on stderr only when it is a terminal (a real pty here), only once a
wait has lasted a second, saying what it waits for, and its line cleared at the end."""

from __future__ import annotations

import os
import pty
import subprocess
import sys
import time

WAIT = """
import sys, time
from qvm.cli.progress import run_waiting
seconds = float(sys.argv[1])
print(run_waiting("vm1: waiting for the guest to power off", lambda: time.sleep(seconds) or "ok"))
"""
FAIL = """
from qvm.cli.progress import run_waiting
def broken():
    import time
    time.sleep(1.5)
    raise KeyError("x")
try:
    run_waiting("vm1: waiting", broken)
except KeyError:
    print("raised")
"""


def run_with_stderr_on_a_pty(code: str, *args: str) -> tuple[str, str]:
    """(stdout, what the terminal on stderr received)."""
    main, secondary = pty.openpty()
    child = subprocess.Popen(
        [sys.executable, "-c", code, *args], stdout=subprocess.PIPE, stderr=secondary, text=True
    )
    os.close(secondary)
    received = b""
    while True:
        try:
            chunk = os.read(main, 4096)
        except OSError:  # EIO: the child closed the terminal
            break
        if not chunk:
            break
        received += chunk
    os.close(main)
    out = child.stdout.read() if child.stdout else ""
    assert child.wait(10) == 0
    return out, received.decode()


def test_a_long_wait_spins_and_clears_its_line() -> None:
    out, terminal = run_with_stderr_on_a_pty(WAIT, "1.6")
    assert out == "ok\n"
    assert "vm1: waiting for the guest to power off 1s" in terminal
    assert terminal.endswith("\r\033[K")


def test_a_short_wait_draws_nothing() -> None:
    out, terminal = run_with_stderr_on_a_pty(WAIT, "0.4")
    assert out == "ok\n"
    assert terminal == ""


def test_no_spinner_when_stderr_is_not_a_terminal() -> None:
    started = time.monotonic()
    done = subprocess.run(
        [sys.executable, "-c", WAIT, "1.3"], capture_output=True, text=True, timeout=30
    )
    assert time.monotonic() - started >= 1.3
    assert done.stdout == "ok\n"
    assert done.stderr == ""


def test_the_line_is_cleared_when_the_wait_fails() -> None:
    out, terminal = run_with_stderr_on_a_pty(FAIL)
    assert out == "raised\n"
    assert "vm1: waiting" in terminal
    assert terminal.endswith("\r\033[K")
