"""What the guest agent says about the guest for `status`: its OS, host name and
addresses, parsed from the agent's replies (pure). The supervisor keeps them in its query
record (``qvm.store.view``) and `status --live` asks the agent for them
(``qvm.control.guest_agent_facts``): one parse for both.
"""

from __future__ import annotations

from qvm.base.checking import TYPE_CHECKING
from qvm.base.record import Record

if TYPE_CHECKING:
    from typing import Any

# agent states, as `status` says them
ANSWERING = "answering"
NOT_ANSWERING = "not answering"
NOT_CONFIGURED = "not configured"
NOT_RUNNING = "not running"
AGENT_STATES = (ANSWERING, NOT_ANSWERING, NOT_CONFIGURED, NOT_RUNNING)


def not_configured_text(name: str) -> str:
    return (
        f"{name}: guest agent not configured (hint: set [agent] enabled = true in its machine"
        f" file, then qvm restart {name})"
    )


class Address(Record):
    address: str
    prefix: int | None
    family: str  # "ipv4" or "ipv6"


class Interface(Record):
    name: str
    mac: str | None
    addresses: tuple[Address, ...]

    def as_json(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "mac": self.mac,
            "addresses": [a._asdict() for a in self.addresses],
        }


def parse_interfaces(data: Any) -> list[Interface]:
    """``guest-network-get-interfaces`` -> interfaces with their addresses."""
    found = []
    for item in data if isinstance(data, list) else []:
        if not isinstance(item, dict) or not isinstance(item.get("name"), str):
            continue
        addresses = []
        for entry in item.get("ip-addresses") or []:
            if isinstance(entry, dict) and isinstance(entry.get("ip-address"), str):
                prefix = entry.get("prefix")
                addresses.append(
                    Address(
                        entry["ip-address"],
                        prefix if isinstance(prefix, int) else None,
                        str(entry.get("ip-address-type", "")),
                    )
                )
        mac = item.get("hardware-address")
        found.append(
            Interface(item["name"], mac if isinstance(mac, str) else None, tuple(addresses))
        )
    return found


class OsInfo(Record):
    name: str | None
    pretty_name: str | None
    version_id: str | None
    id: str | None
    kernel_release: str | None
    kernel_version: str | None
    machine: str | None

    @classmethod
    def from_reply(cls, data: Any) -> OsInfo:
        data = data if isinstance(data, dict) else {}

        def text(key: str) -> str | None:
            value = data.get(key)
            return value if isinstance(value, str) else None

        return cls(
            text("name"),
            text("pretty-name"),
            text("version-id"),
            text("id"),
            text("kernel-release"),
            text("kernel-version"),
            text("machine"),
        )

    def summary(self) -> str:
        name = self.pretty_name or self.name or self.id or "unknown OS"
        return f"{name}, kernel {self.kernel_release}" if self.kernel_release else name


class GuestFacts(Record):
    """What `status` tells about the guest from its agent."""

    agent: str  # ANSWERING, NOT_ANSWERING, NOT_CONFIGURED or NOT_RUNNING
    detail: str | None = None  # why it is not answering, or what failed
    os: OsInfo | None = None
    hostname: str | None = None
    interfaces: tuple[Interface, ...] = ()

    def as_json(self) -> dict[str, Any]:
        return {
            "state": self.agent,
            "detail": self.detail,
            "os": self.os._asdict() if self.os else None,
            "hostname": self.hostname,
            "interfaces": [i.as_json() for i in self.interfaces],
        }
