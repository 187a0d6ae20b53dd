"""Port forwards of a running VM: list, add and remove them with QEMU's HMP
``hostfwd_add``/``hostfwd_remove`` (through QMP ``human-monitor-command``).

The forwards QEMU started with are in ``launch.json``; a change at run time writes the
whole current list to ``forwards.json``, stamped with the QEMU run (pid, start time) it
is about, so a restarted QEMU (which has only its argv's forwards) is never described
by a stale list.
"""

from __future__ import annotations

import re
from typing import TYPE_CHECKING

from qvm.definition.forwards import ForwardError, parse_forward
from qvm.errors import ControlError, HostError, NotRunningError, QvmError, UsageError
from qvm.host.ports import check_address, port_holder, port_in_use
from qvm.host.usernet import USERNET_COMMAND, bind_ports, parse_usernet, unbound
from qvm.layout.rundir import RunDir
from qvm.store.forwards import read_forwards, record_forwards, save
from qvm.store.launch import Forward, read_launch
from qvm.supervisor.client import supervisor_alive

if TYPE_CHECKING:
    from collections.abc import Iterable, Sequence

    from qvm.control.qmp_session import QmpSession
    from qvm.control.session import ControlSession
    from qvm.definition.schema import PortForward

_SHORT_FORM = re.compile(r"(?:(tcp|udp):)?(?:([0-9]{1,3}(?:\.[0-9]{1,3}){3}):)?([0-9]{1,5})")


def _nic_for(run: RunDir, nic: str | None) -> str:
    if nic is not None:
        return nic
    launch = read_launch(run.launch_file)
    nics = launch.nics if launch is not None else ()
    if not nics:
        raise HostError(
            f"{run.name}: has no user-mode NIC to forward ports to "
            "(hint: add a [[nic]] table to its machine file and restart it)"
        )
    return str(nics[0])


def _hmp(session: QmpSession, command_line: str) -> str:
    return str(session.execute("human-monitor-command", {"command-line": command_line}))


def _session(run: RunDir) -> ControlSession:
    """The control session, held across the HMP command and the forwards.json update so
    that two `qvm port` commands at once cannot lose each other's record."""
    # completion imports this module for forward_text: the relay client (~4 ms) only here
    from qvm.control.session import ControlSession  # noqa: PLC0415 -- see the comment above

    return ControlSession(run)


def _require_running(run: RunDir) -> None:
    if not supervisor_alive(run):
        raise NotRunningError(run.name)


def add_forward(run: RunDir, text: str, nic: str | None = None) -> Forward:
    """Add ``PROTO:[HOSTADDR:]HOSTPORT:GUESTPORT`` (host port 0 or "auto": QEMU binds a
    port the kernel picks, read back from ``info usernet``)."""
    fwd = parse_spec(text)  # a mistake is said first, running or not
    _require_running(run)
    netdev = _nic_for(run, nic)
    with _session(run) as session:
        entry = resolve_forward(run, fwd, netdev)
        rule = hostfwd_rule(entry)
        reply = _hmp(session, f"hostfwd_add {netdev} {rule}").strip()
        if reply:  # HMP says nothing on success
            raise ControlError(f"{run.name}: hostfwd_add {netdev} {rule}: {reply}")
        (entry,) = read_back_ports(session, run, [entry], known=read_forwards(run))
        record_forwards(run, [entry])
    return entry


def resolve_forward(run: RunDir, fwd: PortForward, nic: str, action: str | None = None) -> Forward:
    """The forward as QEMU is asked for it. A fixed port in use is refused before QEMU is
    asked, naming who holds it (the qvm VM, when it is one); port 0 is QEMU's to bind,
    with no probe before (``read_back_ports`` tells which port it got)."""
    if fwd.host_port == 0:
        check_address(fwd.host_addr, fwd.protocol)
    elif port_in_use(fwd.host_addr, fwd.host_port, fwd.protocol):
        doing = f"{action}: " if action else ""
        raise HostError(
            f"{run.name}: {doing}{fwd.protocol} port {fwd.host_addr}:{fwd.host_port} is already "
            f"in use{_held_by(run, fwd.host_port)} (hint: pick another host port, or 0 for any "
            "free one)"
        )
    return Forward(nic, fwd.protocol, fwd.host_addr, fwd.host_port, fwd.guest_port)


def read_back_ports(
    session: QmpSession, run: RunDir, entries: Sequence[Forward], known: Iterable[Forward] = ()
) -> tuple[Forward, ...]:
    """``entries``, just given to QEMU, with each host port 0 replaced by the port QEMU
    bound (``info usernet``, one HMP round trip; none when no port is 0). ``known``: the
    forwards QEMU had before, whose ports are not the new ones."""
    if not unbound(entries):
        return tuple(entries)
    resolved = bind_ports(entries, parse_usernet(_hmp(session, USERNET_COMMAND)), known)
    missing = unbound(resolved)
    if missing:
        raise ControlError(
            f"{run.name}: QEMU added {forward_text(missing[0])} on {missing[0].nic} but "
            f"did not list the port it bound (hint: qvm qmp {run.name} "
            "human-monitor-command command-line='info usernet')"
        )
    return resolved


def _held_by(run: RunDir, port: int) -> str:
    from qvm.host.holders import vm_of_qemu_pid  # noqa: PLC0415 -- only when a port is taken

    holder = port_holder(port)
    if holder is None:
        return ""
    pid = re.match(r"pid ([0-9]+)", holder)
    vm = vm_of_qemu_pid(run.path.parent, int(pid[1])) if pid else None
    return f" by VM {vm} ({holder})" if vm else f" by {holder}"


def hostfwd_rule(forward: Forward) -> str:
    """QEMU's rule for a forward: ``tcp:127.0.0.1:2222-:22``."""
    return f"{_host_side(forward)}-:{forward.guest_port}"


def _host_side(forward: Forward) -> str:
    return f"{forward.proto}:{forward.host_addr}:{forward.host_port}"


def parse_spec(text: str) -> PortForward:
    spec = text.replace(":auto:", ":0:")
    try:
        return parse_forward(spec)
    except ForwardError as exc:
        raise UsageError(
            f'{exc} (hint: forwards look like "tcp:2222:22", "tcp:0:22" or "tcp:0.0.0.0:8080:80")'
        ) from None


def remove_forward(run: RunDir, text: str, nic: str | None = None) -> list[Forward]:
    """Remove the forwards matching ``text``: a whole spec ("tcp:2222:22"), or a host
    port with optional protocol and address ("2222", "tcp:2222", "tcp:127.0.0.1:2222")."""
    _require_running(run)
    with _session(run) as session:
        matches = [f for f in read_forwards(run) if _matches(f, text, nic)]
        if not matches:
            raise QvmError(
                f"{run.name}: no port forward matches {text!r} (hint: qvm port list {run.name})"
            )
        removed = []
        for forward in matches:
            command = f"hostfwd_remove {forward.nic} {_host_side(forward)}"
            reply = _hmp(session, command).strip()
            if not reply.endswith("removed"):
                raise ControlError(f"{run.name}: {command}: {reply}")
            removed.append(forward)
            save(run, [f for f in read_forwards(run) if f != forward])
    return removed


def _matches(given: Forward | dict[str, object], text: str, nic: str | None) -> bool:
    """Whether ``text`` (as ``qvm port del`` takes it) names the forward ``given``."""
    # the JSON form too (tests/unit/ops/test_access.py passes it)
    forward: Forward = (
        Forward(**given)  # type: ignore[arg-type,unused-ignore]
        if isinstance(given, dict)
        else given
    )
    if nic is not None and forward.nic != nic:
        return False
    short = _SHORT_FORM.fullmatch(text)
    if short is not None:
        proto, addr, port = short.groups()
        return (
            int(port) == forward.host_port
            and (proto is None or proto == forward.proto)
            and (addr is None or addr == forward.host_addr)
        )
    fwd = parse_spec(text)
    return (fwd.protocol, fwd.host_addr, fwd.host_port, fwd.guest_port) == (
        forward.proto,
        forward.host_addr,
        forward.host_port,
        forward.guest_port,
    )


def forward_text(forward: Forward) -> str:
    return f"{_host_side(forward)}:{forward.guest_port}"
