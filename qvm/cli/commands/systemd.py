"""qvm systemd: a systemd unit for a long-running VM (qvm.ops.systemd)."""

from __future__ import annotations

import os
import sys

from qvm.cli import resolve
from qvm.cli.output import emit_json
from qvm.cli.parsing.declare import AS_JSON, MACHINE, Commands, Option

commands = Commands()


@commands.command("systemd")
def systemd(
    name: str = MACHINE,
    stop_timeout: float = Option(
        20.0,
        "--stop-timeout",
        help="Seconds the service's stop may take (qvm up --foreground --stop-timeout).",
    ),
    as_json: bool = AS_JSON,
) -> None:
    """Print a systemd unit that runs the VM as a service (qvm up --foreground).

    Save it as /etc/systemd/system/qvm-NAME.service (a user's:
    ~/.config/systemd/user/), then systemctl daemon-reload and systemctl enable --now
    qvm-NAME. The unit names the machine file, the state dir and this qvm by absolute
    paths.

    JSON: schemas/systemd.json
    """
    from qvm.ops.systemd import unit_for

    stop_timeout = resolve.timeout_seconds(stop_timeout, "--stop-timeout")
    machine = resolve.load(name)
    unit = unit_for(
        machine.name,
        _this_qvm(),
        str(machine.path),
        str(resolve.state_root().absolute()),
        stop_timeout,
        user=os.geteuid() != 0,
    )
    if as_json:
        emit_json({"name": machine.name, "unit": unit.name, "text": unit.text,
                   "exec_start": list(unit.exec_start)})  # fmt: skip
        return
    sys.stdout.write(unit.text)


def _this_qvm() -> tuple[str, ...]:
    """How the unit runs this very qvm: its console script, or the interpreter with -m."""
    script = os.path.abspath(sys.argv[0])
    if os.path.basename(script) == "qvm" and os.access(script, os.X_OK):
        return (script,)
    return (sys.executable, "-m", "qvm.cli")
