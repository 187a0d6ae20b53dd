"""The port-forward grammar ``PROTO:[HOSTADDR:]HOSTPORT:GUESTPORT``, shared by machine
files, ``qvm new --forward``, ``nic add --forward`` and ``port add``.
"""

from __future__ import annotations

import re

from qvm.definition.schema import DEFAULT_HOST_ADDR, FORWARD_PROTOCOLS, PortForward

_PORT = r"[0-9]{1,5}"
_FORWARD_FORM = "PROTO:[HOSTADDR:]HOSTPORT:GUESTPORT"
FORWARD_HINT = 'forwards look like "tcp:2222:22" or "udp:0.0.0.0:5353:53"'


# --- public API -------------------------------------------------------------------


class ForwardError(ValueError):
    """A port forward that cannot be read; ``reason`` is the message without the text."""

    def __init__(self, text: str, reason: str) -> None:
        self.text = text
        self.reason = reason
        # the text is the user's argument: a 10 MB one is not echoed whole
        quoted = text if len(text) <= 80 else f"{text[:60]}... ({len(text)} characters)"
        super().__init__(f'invalid port forward "{quoted}": {reason}')


def parse_forward(text: str) -> PortForward:
    """Read ``PROTO:[HOSTADDR:]HOSTPORT:GUESTPORT``, e.g. "tcp:2222:22".

    PROTO is tcp or udp; HOSTADDR an IPv4 address, 127.0.0.1 when left out; HOSTPORT
    0..65535, where 0 means a free port picked at start; GUESTPORT 1..65535.
    Raises ForwardError (a ValueError) saying what is wrong.
    """
    parts = text.split(":")
    if len(parts) == 3:
        protocol, host_port, guest_port = parts
        host_addr = DEFAULT_HOST_ADDR
    elif len(parts) == 4:
        protocol, host_addr, host_port, guest_port = parts
        host_addr = _parse_host_addr(text, host_addr)
    else:
        raise ForwardError(text, f"must look like {_FORWARD_FORM}")
    if protocol.lower() not in FORWARD_PROTOCOLS:
        raise ForwardError(text, 'protocol must be "tcp" or "udp"')
    return PortForward(
        protocol=protocol.lower(),
        host_addr=host_addr,
        host_port=_parse_port(text, host_port, "host port", 0),
        guest_port=_parse_port(text, guest_port, "guest port", 1),
    )


def expand_shorthand(text: str) -> str:
    """The command line's shorthands for a forward of one port to the same port:
    ``8080`` is "tcp:8080:8080", ``udp:5353`` is "udp:5353:5353"; anything else as it is
    (machine files spell every forward out)."""
    protocol, colon, port = text.rpartition(":")
    if re.fullmatch(_PORT, port) and (not colon or protocol.lower() in FORWARD_PROTOCOLS):
        return f"{protocol or 'tcp'}:{port}:{port}"
    return text


def _parse_host_addr(text: str, addr: str) -> str:
    try:
        import ipaddress  # noqa: PLC0415 -- only for a forward with a host address

        return str(ipaddress.IPv4Address(addr))
    except ValueError:
        # QEMU's user-mode networking binds IPv4 addresses only.
        raise ForwardError(text, "host address must be an IPv4 address like 127.0.0.1") from None


def _parse_port(text: str, port: str, what: str, lowest: int) -> int:
    if re.fullmatch(_PORT, port) and lowest <= int(port) <= 65535:
        return int(port)
    raise ForwardError(text, f"{what} must be a number between {lowest} and 65535")
