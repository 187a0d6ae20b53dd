"""Where a private network lives: the one rule for network names, and every file of a
network's folder, each named once, as plain strings (the supervisor, which rejoins and
restarts switches, never imports pathlib: see ``qvm.layout.runfiles``).

A network's folder is ``$STATE/_networks/NAME/`` (``_`` starts no VM name, so no run dir
can be it). It holds the switch's socket folder, which ``vde_switch`` makes 0700, inside a
folder qvm makes 0700: only the owner's QEMUs can join.
"""

from __future__ import annotations

import os

from qvm.errors import UsageError
from qvm.layout.names import shown

NETWORKS_DIR = "_networks"  # under the state root
NETWORK_NAME_RULE = (
    "1 to 32 lowercase letters, digits or '-', starting with a letter and not ending with '-'"
)
_FIRST = frozenset("abcdefghijklmnopqrstuvwxyz")
_LATER = _FIRST | frozenset("0123456789-")
MAX_NETWORK_NAME = 32

NET_LOCK = "lock"  # flock: joins, leaves, switch starts and allocations take turns
SWITCH_DIR = "switch"  # vde_switch -s: its ctl socket and the ports' data sockets
MGMT_SOCKET = "mgmt.sock"  # vde_switch -M
SWITCH_PID = "switch.pid"  # vde_switch -p
SWITCH_FILE = "switch.json"  # the switch qvm started: pid, start time, restarts
NETWORK_FILE = "network.json"  # the subnet and every member's address


def is_network_name(text: str) -> bool:
    return (
        0 < len(text) <= MAX_NETWORK_NAME
        and text[0] in _FIRST
        and _LATER.issuperset(text)
        and not text.endswith("-")
    )


def network_name_problem(text: object) -> str | None:
    """Why ``text`` is not a network name, or None if it is one."""
    if isinstance(text, str) and is_network_name(text):
        return None
    return f"must be a network name: {NETWORK_NAME_RULE}"


def check_network_name(text: str) -> str:
    """``text`` if it names a network; otherwise UsageError (exit 2) saying the rule."""
    if not is_network_name(text):
        raise UsageError(f"{shown(text)} is not a network name: it must be {NETWORK_NAME_RULE}")
    return text


class NetFiles:
    """One network's folder and its files, as ``os.path`` strings."""

    __slots__ = ("name", "path")

    def __init__(self, state_root: str | os.PathLike[str], name: str) -> None:
        self.name = check_network_name(name)
        self.path = os.path.join(os.fspath(state_root), NETWORKS_DIR, name)

    def file(self, name: str) -> str:
        return os.path.join(self.path, name)

    @property
    def switch_dir(self) -> str:
        return self.file(SWITCH_DIR)

    @property
    def lock(self) -> str:
        return self.file(NET_LOCK)

    @property
    def network_file(self) -> str:
        return self.file(NETWORK_FILE)

    @property
    def switch_file(self) -> str:
        return self.file(SWITCH_FILE)


def networks_root(state_root: str | os.PathLike[str]) -> str:
    return os.path.join(os.fspath(state_root), NETWORKS_DIR)


def network_names(state_root: str | os.PathLike[str]) -> list[str]:
    """Every network with a folder under the state root, by name."""
    try:
        entries = sorted(os.listdir(networks_root(state_root)))
    except OSError:
        return []
    return [e for e in entries if is_network_name(e)]
