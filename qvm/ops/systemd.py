"""`qvm systemd NAME`: a systemd unit for a long-running VM, made as text (pure).

The service is `qvm up --foreground` (``qvm.supervisor.foreground``): ``Type=notify``
(it sends ``READY=1`` once QMP answers), SIGTERM to the supervisor alone
(``KillMode=mixed``: with the default, systemd would signal QEMU too, which quits at once
instead of the guest powering off), and a ``TimeoutStopSec`` above the stop budget, so
systemd's SIGKILL never cuts the guest's power-off short.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

from qvm.base.record import Record

# beyond the stop budget, before systemd's SIGKILL: the supervisor's last record
STOP_MARGIN = 10
START_TIMEOUT = 90  # seconds to READY=1: a first start may download a base image


class Unit(Record):
    name: str  # the unit's file name, qvm-NAME.service
    text: str
    exec_start: tuple[str, ...]


def systemd_word(word: str, command: bool = True) -> str:
    """One word of a command line (``ExecStart=``, or with ``command`` False an
    ``Environment=`` assignment) as systemd reads it: double-quoted when it has a space,
    a quote or a backslash; ``%`` (specifiers) doubled, and in a command ``$`` too
    (variables)."""
    word = word.replace("%", "%%")
    if command:
        word = word.replace("$", "$$")
    if word and not any(c in word for c in " \t\"'\\;"):
        return word
    escaped = word.replace("\\", "\\\\").replace('"', '\\"')
    return f'"{escaped}"'


def unit_for(
    vm: str,
    qvm_argv: Sequence[str],
    machine_file: str,
    state_dir: str,
    stop_timeout: float,
    user: bool,
) -> Unit:
    """The unit of VM ``vm``: ``qvm_argv`` runs qvm (absolute), ``machine_file`` and
    ``state_dir`` are absolute, so the unit means the same VM whatever systemd's
    environment (a system unit has no ``XDG_STATE_HOME``); ``user``: a user unit."""
    budget = f"{stop_timeout:g}"
    argv = (*qvm_argv, "up", "--foreground", machine_file, "--stop-timeout", budget)
    lines = [
        "# made by `qvm systemd " + vm + "`",
        "[Unit]",
        f"Description=qvm VM {vm} ({machine_file})",
        "After=network.target",
        "",
        "[Service]",
        "Type=notify",
        "ExecStart=" + " ".join(systemd_word(word) for word in argv),
        f"Environment={systemd_word('QVM_STATE_DIR=' + state_dir, command=False)}",
        "# SIGTERM to qvm alone, which powers the guest off; SIGKILL to all only after",
        "KillMode=mixed",
        f"TimeoutStartSec={START_TIMEOUT}",
        f"TimeoutStopSec={math.ceil(stop_timeout) + STOP_MARGIN}",
        "# qvm exits 0 after a power-off or a stop; 10 crash, 11 panic, 12 killed",
        "Restart=on-failure",
        "RestartSec=5",
        "RestartPreventExitStatus=12",  # `qvm kill` means it
        "",
        "[Install]",
        f"WantedBy={'default.target' if user else 'multi-user.target'}",
        "",
    ]
    return Unit(name=f"qvm-{vm}.service", text="\n".join(lines), exec_start=argv)
