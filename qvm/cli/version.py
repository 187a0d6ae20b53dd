"""`qvm --version`: qvm's, QEMU's and Python's versions. QEMU's comes from the capability
cache ``qvm up`` keeps (``qvm.host.qemu``): asked of the binary only when not cached."""

from __future__ import annotations

import sys

QEMU_BINARY = "qemu-system-x86_64"


def version_text() -> str:
    python = ".".join(str(part) for part in sys.version_info[:3])
    return f"qvm {qvm_version()}\n{qemu_version()}\nPython {python} ({sys.executable})"


def qvm_version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("qvm")
    except PackageNotFoundError:
        return "(not installed as a package)"


def qemu_version() -> str:
    """``QEMU 7.2.19 (Debian 1:7.2+dfsg-7+deb12u18), /usr/bin/qemu-system-x86_64``."""
    from qvm.errors import QvmError
    from qvm.host.qemu import qemu_capabilities

    try:
        caps = qemu_capabilities(QEMU_BINARY)
    except QvmError as error:
        return f"QEMU: {error}"
    words = caps.version.split()
    text = caps.version
    if len(words) >= 4 and words[:3] == ["QEMU", "emulator", "version"]:
        text = "QEMU " + " ".join(words[3:])
    return f"{text}, {caps.binary}"
