"""The one reader of the test guest's serial lines (scripts/build-test-guest prints them):

    QVM-GUEST-READY                                    once per boot, when it can act
    QVM-STATE cpus=0-1 ncpus=2 mem_kb=.. blk=vda net=eth0,lo   whenever any of it changed
    QVM-GUEST-POWEROFF                                 on the ACPI power button

Every integration test reads them through here, from ``serial.log`` or from the output of
`qvm logs`, so that a change in the guest's format is one change here.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path

from framework.wait import wait_until

READY = "QVM-GUEST-READY"
POWEROFF = "QVM-GUEST-POWEROFF"
STATE = "QVM-STATE"
MARKER = re.compile(f"{READY}|{POWEROFF}|{STATE} ")


@dataclass
class GuestLines:
    """What the guest said, in order: boots (READY lines), states, a power-off."""

    boots: int = 0
    states: list[dict[str, str]] = field(default_factory=list)
    powered_off: bool = False

    @property
    def ready(self) -> bool:
        return self.boots > 0

    @property
    def latest_state(self) -> dict[str, str] | None:
        return self.states[-1] if self.states else None


def parse_guest_lines(text: str) -> GuestLines:
    """The guest's lines in ``text``. Only whole lines count: the last one may still be
    being written (``mem_kb=4181`` of ``mem_kb=418180``). The serial console ends lines
    with CR LF, kernel messages come in between, and a line may start after what an
    earlier boot left on the console (``qvm-guest:/# \\e[6nQVM-GUEST-READY``, seen after
    QEMU was killed and restarted): a marker counts wherever it starts in its line."""
    found = GuestLines()
    for line in text.split("\n")[:-1]:  # after the last newline: a partial line, or nothing
        marker = MARKER.search(line)
        if marker is None:
            continue
        if marker[0] == READY:
            found.boots += 1
        elif marker[0] == POWEROFF:
            found.powered_off = True
        else:
            fields = line[marker.end() :].split()
            found.states.append(dict(f.split("=", 1) for f in fields if "=" in f))
    return found


@dataclass
class Serial:
    """The guest's own view, read from its serial console log."""

    path: Path

    def text(self) -> str:
        try:
            return self.path.read_text(errors="replace")
        except FileNotFoundError:
            return ""

    def guest(self) -> GuestLines:
        return parse_guest_lines(self.text())

    def wait_for(self, pattern: str, timeout: float = 60) -> re.Match[str]:
        """Anything else the guest prints (a kernel panic, a console echo), by regex."""
        regex = re.compile(pattern, re.M)
        return wait_until(lambda: regex.search(self.text()), timeout, f"/{pattern}/ in {self.path}")

    def latest_state(self) -> dict[str, str] | None:
        return self.guest().latest_state

    def wait_state(self, timeout: float = 60, **expected: str | int) -> dict[str, str]:
        """The guest's latest QVM-STATE, once it shows every one of ``expected``."""

        def matches() -> dict[str, str] | None:
            state = self.latest_state()
            if state and all(state.get(k) == str(v) for k, v in expected.items()):
                return state
            return None

        try:
            return wait_until(matches, timeout, f"guest state {expected}")
        except AssertionError as error:
            raise AssertionError(f"{error}; latest: {self.latest_state()}") from None

    def wait_boots(self, count: int, timeout: float = 90) -> GuestLines:
        """Until the guest has said READY ``count`` times in this log (a restarted QEMU
        writes on into the same file)."""
        return wait_until(
            lambda: (lines := self.guest()).boots >= count and lines,
            timeout,
            f"{READY} #{count} in {self.path}",
        )

    def wait_ready(self, timeout: float = 90) -> dict[str, str]:
        """The guest's first state, once it is ready."""
        self.wait_boots(1, timeout)
        return wait_until(self.latest_state, 10, f"the first {STATE} line")
