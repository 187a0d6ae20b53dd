"""Port forwards of a running VM: qvm port list/add/del."""

from __future__ import annotations

from qvm.cli import resolve
from qvm.cli.output import emit_json, say, table
from qvm.cli.parsing.declare import AS_JSON, MACHINE, Argument, Commands, Option

commands = Commands(help="List, add and remove port forwards of a running VM.")


@commands.command("list")
def list_cmd(name: str = MACHINE, as_json: bool = AS_JSON) -> None:
    """The VM's port forwards: from its machine file and added at run time.

    JSON: schemas/port-list.json
    """
    from qvm.store.forwards import read_forwards

    forwards = read_forwards(resolve.run_dir_of(name))
    if as_json:
        emit_json([f.to_json() for f in forwards])
        return
    rows = [[f.nic, f.proto, f"{f.host_addr}:{f.host_port}", f.guest_port] for f in forwards]
    say(table(["NIC", "PROTO", "HOST", "GUEST PORT"], rows))


@commands.command("add")
def add(
    name: str = MACHINE,
    spec: str = Argument(
        ...,
        metavar="PROTO:[HOSTADDR:]HOSTPORT:GUESTPORT",
        help="e.g. tcp:8080:80; host port 0 (or auto) picks a free one; HOSTADDR "
        "defaults to 127.0.0.1. PORT or PROTO:PORT: that port on both sides (8080 is "
        "tcp:8080:8080).",
    ),
    nic: str | None = Option(None, "--nic", help="NIC id (default: the first NIC)."),
    as_json: bool = AS_JSON,
) -> None:
    """Forward a host port to the running guest (HMP hostfwd_add).

    JSON: schemas/port-add.json
    """
    from qvm.control.forwards import add_forward, forward_text
    from qvm.definition.forwards import expand_shorthand

    entry = add_forward(resolve.run_dir_of(name), expand_shorthand(spec), nic)
    if as_json:
        emit_json(entry.to_json())
        return
    say(f"{name}: forwarding {forward_text(entry)} ({entry.nic})")


@commands.command("del")
def delete(
    name: str = MACHINE,
    spec: str = Argument(
        ...,
        metavar="FORWARD|HOSTPORT",
        help="A forward as listed (tcp:127.0.0.1:2222:22, tcp:2222:22) or a host port "
        "(2222, tcp:2222).",
    ),
    nic: str | None = Option(None, "--nic", help="Only this NIC's forwards."),
    as_json: bool = AS_JSON,
) -> None:
    """Remove port forwards from the running guest (HMP hostfwd_remove).

    JSON: schemas/port-del.json
    """
    from qvm.control.forwards import forward_text, remove_forward

    removed = remove_forward(resolve.run_dir_of(name), spec, nic)
    if as_json:
        emit_json([entry.to_json() for entry in removed])
        return
    for entry in removed:
        say(f"{name}: removed {forward_text(entry)} ({entry.nic})")
