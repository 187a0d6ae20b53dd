"""IPv4 subnets and addresses as plain integers, without ``ipaddress`` (the supervisor
reads network records and keeps its imports small): parsing, the stable subnet a
network without a definition gets, and the text forms. Pure and stdlib only.
"""

from __future__ import annotations

from qvm.base.digest import sha256_digest
from qvm.base.record import Record

# Derived subnets lie in 10.64.0.0/10 (16384 /24s): clear of 10.0.x.x, which user-mode
# networking and many home and office networks use.
DERIVED_FIRST = (10 << 24) | (64 << 16)
DERIVED_COUNT = 1 << 14
PRIVATE_RANGES = ((10 << 24, 8), ((172 << 24) | (16 << 16), 12), ((192 << 24) | (168 << 16), 16))
MIN_PREFIX, MAX_PREFIX = 8, 30


class SubnetError(ValueError):
    """Not a private IPv4 subnet qvm can hand addresses out of (the text says why)."""


def ip_text(value: int) -> str:
    return ".".join(str((value >> shift) & 255) for shift in (24, 16, 8, 0))


def _octet(text: str) -> bool:
    return text.isascii() and text.isdigit() and len(text) <= 3 and int(text) < 256


def parse_ip(text: str) -> int:
    parts = text.split(".")
    if len(parts) != 4 or not all(_octet(p) for p in parts):
        raise SubnetError(f"{text!r} is not an IPv4 address like 10.1.2.3")
    value = 0
    for part in parts:
        value = (value << 8) | int(part)
    return value


class Subnet(Record):
    network: int  # the first address, as an integer
    prefix: int

    @property
    def size(self) -> int:
        return 1 << (32 - self.prefix)

    def hosts(self) -> range:
        """The addresses members may have: all but the network and broadcast addresses."""
        return range(self.network + 1, self.network + self.size - 1)

    def __str__(self) -> str:
        return f"{ip_text(self.network)}/{self.prefix}"


def parse_subnet(text: str) -> Subnet:
    """``10.1.2.0/24`` -> Subnet; SubnetError unless it is a private IPv4 subnet
    (10/8, 172.16/12, 192.168/16) of /8../30 whose host bits are zero."""
    address, slash, prefix_text = text.partition("/")
    if not slash or not (prefix_text.isascii() and prefix_text.isdigit()) or len(prefix_text) > 2:
        raise SubnetError(f"{text!r} is not a subnet like 10.1.2.0/24")
    prefix = int(prefix_text)
    if not MIN_PREFIX <= prefix <= MAX_PREFIX:
        raise SubnetError(f"the prefix length must be {MIN_PREFIX}..{MAX_PREFIX}, got /{prefix}")
    network = parse_ip(address)
    if network & ((1 << (32 - prefix)) - 1):
        raise SubnetError(f"{text!r} has host bits set")
    if not any(
        prefix >= bits and network >> (32 - bits) == first >> (32 - bits)
        for first, bits in PRIVATE_RANGES
    ):
        raise SubnetError(f"{text!r} is not private (10/8, 172.16/12 or 192.168/16)")
    return Subnet(network, prefix)


def derived_subnet(name: str, taken: frozenset[int] = frozenset()) -> Subnet:
    """The stable /24 of a network without a definition: from a hash of its name, the
    next one along when another network has it (``taken``: their network addresses)."""
    # not hashlib: every machine file's load imports this module, and hashlib loads
    # OpenSSL (qvm.base.digest)
    digest = sha256_digest(name.encode())
    start = int.from_bytes(digest[:4], "big") % DERIVED_COUNT
    for step in range(DERIVED_COUNT):
        network = DERIVED_FIRST + (((start + step) % DERIVED_COUNT) << 8)
        if network not in taken:
            return Subnet(network, 24)
    raise SubnetError("no free derived /24 is left in 10.64.0.0/10")
