"""What a guest on private networks is given, as one ``sh`` script run through its agent
(``guest-exec``): each network NIC, found by its MAC, gets its address and is brought up,
and ``/etc/hosts`` gets one line per member VM between qvm's own marker lines (the rest of
the file is kept). Run again, it changes nothing that is right already: an address is
flushed and set only when the NIC does not have it. Busybox's ``sh``, ``ip``, ``sed`` and
Debian's alike. ``hosts_script`` is the ``/etc/hosts`` part alone, which a cloud image's
seed runs at every boot (``qvm.host.cloudinit``): both write the same marked lines.

Pure: the script is a function of the NICs and the hosts lines.
"""

from __future__ import annotations

import re
from collections.abc import Iterable

from qvm.store.netlinks import NetNic

BEGIN = "# qvm networks: begin (qvm rewrites these lines)"
END = "# qvm networks: end"
_SAFE = re.compile(r"[0-9a-z.:/_-]+")


def _safe(text: str) -> str:
    """Every value in the script comes from qvm's own records; refuse anything else."""
    if not _SAFE.fullmatch(text):
        raise ValueError(f"not a safe word for the guest's shell: {text!r}")
    return text


def setup_script(nics: Iterable[NetNic], hosts: Iterable[tuple[str, str]]) -> str:
    lines = ["set -e", "export PATH=/usr/sbin:/usr/bin:/sbin:/bin"]
    for nic in nics:
        mac, cidr = _safe(nic.mac), f"{_safe(nic.address)}/{nic.prefix}"
        lines += [
            "dev=",
            "for d in /sys/class/net/*; do",
            f'  read -r a <"$d/address" && [ "$a" = {mac} ] && dev=${{d##*/}}',
            "done",
            f'[ -n "$dev" ] || {{ echo "no interface with MAC {mac}" >&2; exit 3; }}',
            f'if ! ip -o addr show dev "$dev" | grep -q " {cidr} "; then',
            '  ip addr flush dev "$dev"',
            f'  ip addr add {cidr} dev "$dev"',
            "fi",
            'ip link set "$dev" up',
        ]
    return "\n".join(lines + hosts_commands(hosts)) + "\n"


def hosts_script(hosts: Iterable[tuple[str, str]]) -> str:
    """Only the ``/etc/hosts`` part: what a cloud image's seed runs at every boot."""
    return "\n".join(hosts_commands(hosts)) + "\n"


def hosts_commands(hosts: Iterable[tuple[str, str]]) -> list[str]:
    entries = "".join(f"{_safe(address)} {_safe(name)}\\n" for address, name in hosts)
    return [
        "touch /etc/hosts",
        f"sed '/^{BEGIN}$/,/^{END}$/d' /etc/hosts >/etc/hosts.qvm",
        f"printf '%s\\n{entries}%s\\n' '{BEGIN}' '{END}' >>/etc/hosts.qvm",
        "cat /etc/hosts.qvm >/etc/hosts",  # in place: /etc/hosts may be a bind mount
        "rm -f /etc/hosts.qvm",
    ]
