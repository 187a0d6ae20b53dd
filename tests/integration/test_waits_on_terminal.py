"""`qvm down` with stderr on a terminal (a real pty): a wait of over a second shows a
spinner saying what it waits for, and leaves no trace in the output once it ends.

The guest is still booting when `down` presses the power button right after `up` (TCG,
~3 s to boot): the first press is lost and `down` presses again, so it waits seconds.
"""

from __future__ import annotations

import os
import pty
import subprocess
import time

import pytest
from framework.harness import QVM_BIN, Qvm

pytestmark = pytest.mark.integration


def test_down_shows_what_it_waits_for(qvm: Qvm) -> None:
    qvm.guest_machine("spin", memory="128M")
    qvm("up", "spin")
    main, secondary = pty.openpty()
    started = time.monotonic()
    down = subprocess.Popen(
        [str(QVM_BIN), "down", "spin", "--timeout", "30"],
        stdout=subprocess.PIPE,
        stderr=secondary,
        env=qvm.env(),
        cwd=qvm.root,
        text=True,
    )
    os.close(secondary)
    received = b""
    while True:
        try:
            chunk = os.read(main, 4096)
        except OSError:
            break
        if not chunk:
            break
        received += chunk
    os.close(main)
    assert down.wait(60) == 0
    seconds = time.monotonic() - started
    terminal = received.decode()
    assert down.stdout is not None and down.stdout.read().startswith("spin: stopped: ")
    assert seconds > 1.5, "down ended at once: this test needs a wait of over a second"
    assert "spin: waiting for the guest to power off (ACPI button, up to 30s) 1s" in terminal
    assert terminal.endswith("\r\033[K")
    assert qvm.serial("spin").guest().powered_off
