"""Port forwards of a running VM: list, add and remove them with QEMU's HMP
``hostfwd_add``/``hostfwd_remove`` (through QMP ``human-monitor-command``).

The forwards QEMU started with are in ``launch.json``; a change at run time writes the
whole current list to ``forwards.json``, stamped with the QEMU run (pid, start time) it
is about, so a restarted QEMU (which has only its argv's forwards) is never described
by a stale list.
"""

from __future__ import annotations

import re
from typing import TYPE_CHECKING, Any

from qvm.base.jsonfile import read_json
from qvm.errors import ControlError, HostError, NotRunningError, QvmError
from qvm.layout.rundir import RunDir

if TYPE_CHECKING:
    from qvm.control.session import ControlSession
    from qvm.definition.schema import PortForward

from qvm.store.forwards import current_forwards, record_forwards, save

_SHORT_FORM = re.compile(r"(?:(tcp|udp):)?(?:([0-9]{1,3}(?:\.[0-9]{1,3}){3}):)?([0-9]{1,5})")


def _nic_for(run: RunDir, nic: str | None) -> str:
    nics = (read_json(run.launch_file) or {}).get("nics") or []
    if nic is not None:
        return nic
    if not nics:
        raise HostError(
            f"{run.name}: has no user-mode NIC to forward ports to "
            "(hint: add a [[nic]] table to its machine file and restart it)"
        )
    return str(nics[0])


def _hmp(session: ControlSession, command_line: str) -> str:
    return str(session.execute("human-monitor-command", {"command-line": command_line}))


def _session(run: RunDir) -> ControlSession:
    """The control session, held across the HMP command and the forwards.json update so
    that two `qvm port` commands at once cannot lose each other's record."""
    from qvm.control.session import ControlSession

    return ControlSession(run)


def _require_running(run: RunDir) -> None:
    from qvm.supervisor.client import supervisor_alive

    if not supervisor_alive(run):
        raise NotRunningError(run.name)


def add_forward(run: RunDir, text: str, nic: str | None = None) -> dict[str, Any]:
    """Add ``PROTO:[HOSTADDR:]HOSTPORT:GUESTPORT`` (host port 0 or "auto": a free one)."""
    _require_running(run)
    fwd = parse_spec(text)
    netdev = _nic_for(run, nic)
    with _session(run) as session:
        entry = resolve_forward(run, fwd, netdev)
        rule = hostfwd_rule(entry)
        reply = _hmp(session, f"hostfwd_add {netdev} {rule}").strip()
        if reply:  # HMP says nothing on success
            raise ControlError(f"{run.name}: hostfwd_add {netdev} {rule}: {reply}")
        record_forwards(run, [entry])
    return entry


def resolve_forward(
    run: RunDir, fwd: PortForward, nic: str, action: str | None = None
) -> dict[str, Any]:
    """The forward as recorded, with its host port: 0 gets a free one; a port in use is
    refused before QEMU is asked, naming who holds it (the qvm VM, when it is one)."""
    from qvm.host.ports import pick_free_port, port_in_use

    if fwd.host_port == 0:
        port = pick_free_port(fwd.host_addr, fwd.protocol)
    elif port_in_use(fwd.host_addr, fwd.host_port, fwd.protocol):
        doing = f"{action}: " if action else ""
        raise HostError(
            f"{run.name}: {doing}{fwd.protocol} port {fwd.host_addr}:{fwd.host_port} is already "
            f"in use{_held_by(run, fwd.host_port)} (hint: pick another host port, or 0 for any "
            "free one)"
        )
    else:
        port = fwd.host_port
    return {
        "nic": nic,
        "proto": fwd.protocol,
        "host_addr": fwd.host_addr,
        "host_port": port,
        "guest_port": fwd.guest_port,
    }


def _held_by(run: RunDir, port: int) -> str:
    from qvm.host.holders import vm_of_qemu_pid
    from qvm.host.ports import port_holder

    holder = port_holder(port)
    if holder is None:
        return ""
    pid = re.match(r"pid ([0-9]+)", holder)
    vm = vm_of_qemu_pid(run.path.parent, int(pid[1])) if pid else None
    return f" by VM {vm} ({holder})" if vm else f" by {holder}"


def hostfwd_rule(forward: dict[str, Any]) -> str:
    """QEMU's rule for a forward: ``tcp:127.0.0.1:2222-:22``."""
    return (
        f"{forward['proto']}:{forward['host_addr']}:{forward['host_port']}-:{forward['guest_port']}"
    )


def parse_spec(text: str) -> PortForward:
    # qvm.definition is imported here, not at the top: `qvm status` reads forwards through
    # this module and should not pay for loading the TOML schema
    from qvm.definition.forwards import ForwardError, parse_forward

    spec = text.replace(":auto:", ":0:")
    try:
        return parse_forward(spec)
    except ForwardError as exc:
        raise QvmError(
            f'{exc} (hint: forwards look like "tcp:2222:22", "tcp:0:22" or "tcp:0.0.0.0:8080:80")'
        ) from None


def remove_forward(run: RunDir, text: str, nic: str | None = None) -> list[dict[str, Any]]:
    """Remove the forwards matching ``text``: a whole spec ("tcp:2222:22"), or a host
    port with optional protocol and address ("2222", "tcp:2222", "tcp:127.0.0.1:2222")."""
    _require_running(run)
    with _session(run) as session:
        matches = [f for f in current_forwards(run) if _matches(f, text, nic)]
        if not matches:
            raise QvmError(
                f"{run.name}: no port forward matches {text!r} (hint: qvm port list {run.name})"
            )
        removed = []
        for forward in matches:
            rule = f"{forward['proto']}:{forward['host_addr']}:{forward['host_port']}"
            reply = _hmp(session, f"hostfwd_remove {forward['nic']} {rule}").strip()
            if not reply.endswith("removed"):
                raise ControlError(f"{run.name}: hostfwd_remove {forward['nic']} {rule}: {reply}")
            removed.append(forward)
            save(run, [f for f in current_forwards(run) if f != forward])
    return removed


def _matches(forward: dict[str, Any], text: str, nic: str | None) -> bool:
    if nic is not None and forward.get("nic") != nic:
        return False
    short = _SHORT_FORM.fullmatch(text)
    if short is not None:
        proto, addr, port = short.groups()
        return (
            int(port) == forward.get("host_port")
            and (proto is None or proto == forward.get("proto"))
            and (addr is None or addr == forward.get("host_addr"))
        )
    fwd = parse_spec(text)
    return (
        fwd.protocol == forward.get("proto")
        and fwd.host_addr == forward.get("host_addr")
        and fwd.host_port == forward.get("host_port")
        and fwd.guest_port == forward.get("guest_port")
    )


def forward_text(forward: dict[str, Any]) -> str:
    return (
        f"{forward['proto']}:{forward['host_addr']}:{forward['host_port']}:{forward['guest_port']}"
    )
