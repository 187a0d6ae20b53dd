"""NIC hotplug commands: nic list, add, del."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from qvm.cli import device_options, resolve
from qvm.cli.output import emit_json, ms, say
from qvm.cli.parsing import declare
from qvm.cli.parsing.declare import AS_JSON, MACHINE, Argument, Commands, Option, persist_option
from qvm.layout.rundir import RunDir

if TYPE_CHECKING:
    from qvm.control.nic import NicInfo
    from qvm.control.transaction import Removal

commands = Commands(help="List, add and remove NICs of a running VM.")


@commands.command("list")
def list_cmd(name: str = MACHINE, as_json: bool = AS_JSON) -> None:
    """Every NIC (boot, added by qvm, other) with its MAC and port forwards, free PCI
    places, and the guest's interfaces.

    JSON: schemas/nic-list.json
    """
    from qvm.control.nic import list_nics

    device_options.show_listing(
        name,
        list_nics(resolve.run_dir_of(name)),
        as_json,
        ["ID", "ORIGIN", "MODEL", "MAC", "FORWARDS", "BUS", "STATE"],
        _nic_row,
        "interfaces",
    )


def _nic_row(n: NicInfo) -> list[Any]:
    return [n.id, n.origin, n.model, n.mac, " ".join(n.forwards_text()) or None, n.bus, n.state]


@commands.command("add")
def add(
    name: str = MACHINE,
    forward: list[str] | None = Option(
        None,
        "--forward",
        metavar="PROTO:[HOSTADDR:]HOSTPORT:GUESTPORT",
        help="Forward a host port to the guest, e.g. tcp:2222:22 (HOSTADDR defaults to "
        "127.0.0.1; HOSTPORT 0 picks a free one). Repeatable.",
    ),
    model: str = Option(
        "virtio-net-pci", "--model", help="virtio-net-pci, e1000, e1000e or rtl8139."
    ),
    mac: str | None = Option(
        None, "--mac", help="MAC address (default: stable, from the VM's name and NIC index)."
    ),
    dev_id: str | None = Option(None, "--id", help="Device id (default: netN)."),
    network: str | None = Option(
        None,
        "--network",
        metavar="NETWORK",
        help="Put the NIC on this private network (started if need be) instead of "
        "user-mode networking; the guest gets its address and every member's name.",
    ),
    force: bool = declare.FORCE,
    persist: bool = persist_option(
        "add a [[nic]] for it (its MAC and forwards as given) to the machine's TOML"
    ),
    as_json: bool = AS_JSON,
) -> None:
    """Hotplug a user-mode NIC (netdev_add user + device_add; undone if a step fails). A
    host port already in use is refused before anything changes, naming who holds it.

    JSON: schemas/nic-add.json
    """
    from qvm.cli.progress import run_waiting
    from qvm.control.nic import add_nic

    run = resolve.run_dir_of(name)
    address = None
    if network is not None:
        from qvm.errors import UsageError
        from qvm.ops.net import add_network_nic

        if forward:
            raise UsageError(
                f"{name}: nic add: --forward needs user-mode networking, not --network"
            )
        joined = run_waiting(
            f"{name}: adding the NIC", add_network_nic, run, network, model, mac, dev_id, force
        )
        result, address = joined.added, f"{joined.member.address}/{joined.member.prefix}"
    else:
        result = run_waiting(
            f"{name}: adding the NIC", add_nic, run, list(forward or []), model, mac, dev_id, force
        )
    persisted = None
    if persist:
        from qvm.control.nic import nic_entry
        from qvm.definition.persist import persist_entry

        path = device_options.machine_file(run)
        entry = nic_entry(result.nic, result.forwards_asked, with_id=True)  # net1 stays net1
        if network is not None:
            entry["network"] = network
        persisted = device_options.persisted_json(run, persist_entry(path, "nic", entry))
    if as_json:
        joined_json = {"network": network, "address": address} if network else None
        emit_json({**result.as_json(), "persisted": persisted, "network": joined_json})
        return
    nic = result.nic
    where = f" on {nic.bus}" if nic.bus else ""
    say(f"{name}: added {nic.id} ({nic.model}, mac {nic.mac}){where}")
    if network is not None:
        say(f"{name}: {nic.id} is on network {network}, address {address} (the guest is set up")
        say("  through its agent: qvm status shows when)")
    for text in nic.forwards_text():
        proto, addr, port, guest = text.split(":")
        say(f"{name}: {proto} {addr}:{port} -> guest port {guest}")
    device_options.say_plugged(name, result, "added", nic.id, persisted)


@commands.command("del")
def delete(
    name: str = MACHINE,
    dev_id: str = Argument(..., metavar="ID", help="The NIC's id (see qvm nic list)."),
    timeout: float = declare.UNPLUG_TIMEOUT,
    persist: bool = persist_option("remove its [[nic]] (same MAC) from the TOML"),
    as_json: bool = AS_JSON,
) -> None:
    """Unplug a NIC qvm added (device_del, wait for DEVICE_DELETED, netdev_del, which ends
    its port forwards). Pending: exit status 3.

    JSON: schemas/nic-del.json
    """
    from qvm.control.nic import remove_nic

    unpersist = _unpersist if persist else None
    device_options.remove_device(
        name, dev_id, timeout, remove_nic, unpersist, as_json, "NIC", _removed_text
    )


def _removed_text(result: Removal[NicInfo]) -> str:
    seconds = ms(result.unplug.seconds)
    return f"removed {result.unplug.id} in {seconds}; its netdev and forwards are gone"


def _unpersist(run: RunDir, nic: NicInfo) -> dict[str, Any]:
    from qvm.control.nic import nic_entry_matches
    from qvm.definition.persist import unpersist_entry

    done = unpersist_entry(
        device_options.machine_file(run), "nic", lambda e: nic_entry_matches(e, nic)
    )
    return device_options.persisted_json(run, done)
