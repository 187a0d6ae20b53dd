"""The name of every file qvm keeps in a run dir, each named once here, and ``RunFiles``:
the supervisor's view of a run dir, as plain strings.

``qvm.layout.rundir.RunDir`` gives the files as ``Path``s, and says what each is. The
supervisor lives as long as its VM and never imports pathlib: pathlib, with the
urllib.parse and ipaddress it imports, would be 0.67 MiB of its RSS (measured), more than
all of qvm's own modules in it.
"""

from __future__ import annotations

import os

QMP_SOCKET = "qmp.sock"
EVENTS_SOCKET = "events.sock"  # the supervisor's own QMP connection
CONSOLE_SOCKET = "console.sock"
AGENT_CHARDEV_SOCKET = "qga.sock"  # QEMU's end of the guest agent's channel
# the virtio-serial port of that channel in the guest: the name qemu-ga looks for
AGENT_PORT_NAME = "org.qemu.guest_agent.0"
# its QEMU device id: QEMU's VSERPORT_CHANGE events name it when the guest's agent opens
# or closes the port (qvm.supervisor.network)
AGENT_PORT_ID = "qvm.agent"
# the supervisor's, lending its lasting connection to qga.sock to one client at a time:
# it lives and goes with QEMU's sockets
AGENT_SOCKET = "agent.sock"
SUPERVISOR_SOCKET = "supervisor.sock"
QEMU_SOCKETS = (QMP_SOCKET, EVENTS_SOCKET, CONSOLE_SOCKET, AGENT_CHARDEV_SOCKET)

AGENT_LOCK = "agent.lock"
QEMU_LOG = "qemu.log"
STATE_FILE = "state.json"
# what queries show of a running VM, kept by its supervisor (qvm.store.view)
VIEW_FILE = "view.json"
LAUNCH_FILE = "launch.json"
SPACE_RESERVE_FILE = "space.reserve"
SERIAL_LOG = "serial.log"
SUPERVISOR_LOG = "supervisor.log"
SUPERVISOR_LOCK = "supervisor.lock"
CONTROL_LOCK = "control.lock"
PENDING_FILE = "pending.json"
CPU_UNPLUGGED_FILE = "cpu-unplugged.json"
DEVICES_FILE = "devices.json"
SEED_IMAGE = "seed.iso"
USER_DATA = "user-data"
META_DATA = "meta-data"
NETWORK_CONFIG = "network-config"  # the seed's, with a NIC on a private network
VENDOR_DATA = "vendor-data"  # the seed's every-boot part: /etc/hosts lines, share mounts
SNAPSHOTS_FILE = "snapshots.json"
STATE_DISK = "state.qcow2"
CLONE_FILE = "clone.json"
KNOWN_HOSTS = "known_hosts"
FORWARDS_FILE = "forwards.json"
NEW_RECORD = "new.json"
NETWORKS_FILE = "networks.json"  # the NICs on private networks, with their addresses
NETWORK_STATE_FILE = "network-state.json"  # the supervisor's: links and the guest's setup
SHARES_FILE = "shares.json"  # the shares of this QEMU run and their virtiofsd processes
# a frozen copy's (qvm.ops.clone): held while one qvm freezes it, so that clones made at
# once (`qvm run --from` in parallel) freeze it once
FREEZE_LOCK = "freeze.lock"


def share_socket_name(share_id: str) -> str:
    """virtiofsd's vhost-user socket for share ``share_id`` (QEMU connects to it)."""
    return f"share-{share_id}.sock"


class RunFiles:
    """A run dir's files for the supervisor: ``os.path.join(path, NAME)``."""

    __slots__ = ("path",)

    def __init__(self, path: str) -> None:
        self.path = path

    def file(self, name: str) -> str:
        return os.path.join(self.path, name)

    def remove(self, name: str) -> None:
        try:  # noqa: SIM105 - no contextlib on a query's way (0.4 ms)
            os.unlink(self.file(name))
        except FileNotFoundError:
            pass

    def remove_qemu_sockets(self) -> None:
        """QEMU leaves its listening sockets behind when it is killed (and the
        supervisor's agent socket goes with them)."""
        for name in (*QEMU_SOCKETS, AGENT_SOCKET):
            self.remove(name)
