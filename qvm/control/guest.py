"""What the guest itself says on its serial console: the test guest's ``QVM-STATE`` lines,
read from the tail of ``serial.log``.
"""

from __future__ import annotations

import os
import re

from qvm.layout.rundir import RunDir

# --- the guest's own report ------------------------------------------------------------

# complete lines only: the last one may still be being written
GUEST_STATE_LINE = re.compile(r"^QVM-STATE (?P<fields>[^\r\n]*\S)[ \t]*\r?\n", re.M)
SERIAL_TAIL = 256 * 1024


def guest_report_from(text: str) -> dict[str, str] | None:
    """The key=value fields of the last ``QVM-STATE`` line in ``text``."""
    matches = list(GUEST_STATE_LINE.finditer(text))
    if not matches:
        return None
    fields = {}
    for part in matches[-1]["fields"].split():
        key, sep, value = part.partition("=")
        if sep:
            fields[key] = value
    return fields


def guest_report(run: RunDir) -> dict[str, str] | None:
    """What the guest last said about itself on its serial console, if it says it the
    way qvm's test guest does (``QVM-STATE cpus=0 ncpus=1 mem_kb=.. blk=vda net=eth0,lo``)."""
    try:
        with open(run.serial_log, "rb") as handle:
            handle.seek(0, os.SEEK_END)
            handle.seek(max(handle.tell() - SERIAL_TAIL, 0))
            text = handle.read().decode(errors="replace")
    except OSError:
        return None
    return guest_report_from(text)
