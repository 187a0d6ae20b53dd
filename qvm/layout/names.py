"""The one rule for VM names, shared by machine files, the CLI and the run dirs.

A name becomes a folder name under the state root, so it is checked before any path is
built from it: no path separator, no `.` or `..`, no NUL, nothing a shell or a file
system reads specially. ``check_vm_name`` is the gate every command passes.
"""

from __future__ import annotations

from qvm.errors import VmNameError

NAME_PATTERN = r"[a-z0-9][a-z0-9_-]{0,62}"

NAME_RULE = "1 to 63 lowercase letters, digits, '_' or '-', starting with a letter or digit"

# NAME_PATTERN as sets: every command checks a name, and compiling the pattern would
# cost it ~0.3 ms (tests/unit/layout/test_layout.py holds the two to the same answers)
_FIRST = frozenset("abcdefghijklmnopqrstuvwxyz0123456789")
_LATER = _FIRST | {"_", "-"}
_SHOWN = 40  # characters of a bad name quoted back


def shown(text: str, limit: int = _SHOWN) -> str:
    """``text`` quoted for a message, cut to ``limit`` characters: a 10 MB argument must
    not come back whole in an error line."""
    quoted = repr(text)
    return quoted if len(quoted) <= limit else quoted[: limit - 4] + "...'"


def is_vm_name(text: str) -> bool:
    return 0 < len(text) <= 63 and text[0] in _FIRST and _LATER.issuperset(text)


def check_vm_name(text: str) -> str:
    """``text`` if it is a VM name; otherwise VmNameError saying the rule."""
    if not is_vm_name(text):
        raise VmNameError(f"{shown(text)} is not a VM name: it must be {NAME_RULE}")
    return text
