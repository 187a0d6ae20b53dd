"""Which lines may go into a guest's ``authorized_keys``: public keys only.

A key file named by mistake (``~/.ssh/id_ed25519`` for ``~/.ssh/id_ed25519.pub``, an easy
slip) would otherwise be copied into the cloud-init seed, and from there into the guest
and every snapshot and clone of it. ``key_line_problem`` and ``key_file_problem`` say
what is wrong with a line or a file, in a few words; `qvm new` and `qvm up` refuse it.

A public key line is ``[OPTIONS] TYPE BASE64 [COMMENT]`` (sshd(8), AUTHORIZED_KEYS FILE
FORMAT). Its BASE64 is the key in SSH's wire format, which starts with the length and
the name of TYPE again: a cut or mangled paste fails that check.
"""

from __future__ import annotations

import base64
import binascii
import re

# ssh-ed25519, ssh-rsa, ecdsa-sha2-nistp256, sk-ssh-ed25519@openssh.com, their -cert-v01s
KEY_TYPE = re.compile(r"(?:ssh|ecdsa|sk)-[A-Za-z0-9@.+-]+")
PRIVATE_KEY_MARKERS = ("-----BEGIN", "PuTTY-User-Key-File-")
NO_PUBLIC_KEY = "no public key in it"


def private_key_problem(name: str = "KEY") -> str:
    return f"this is a private key; pass {name}.pub"


def key_line_problem(line: str) -> str | None:
    """None for a public key line; else what is wrong with it, in a few words."""
    text = line.strip()
    if text.startswith(PRIVATE_KEY_MARKERS):
        return private_key_problem()
    words = text.split()
    # the key type is the first word, or the first after the options (which hold no
    # whitespace outside quotes; a quoted option with a space is rare enough to refuse)
    for index, word in enumerate(words[:2]):
        if KEY_TYPE.fullmatch(word):
            blob = words[index + 1] if index + 1 < len(words) else None
            if blob is None:
                return f"no key after {word} (paste the whole line of the .pub file)"
            if not _blob_is_a(blob, word):
                return f"the key after {word} is cut or mangled (paste the whole .pub line)"
            return None
    return "not a public key line (TYPE BASE64 [COMMENT], as in a .pub file)"


def _blob_is_a(blob: str, key_type: str) -> bool:
    """``blob`` decodes to a key of ``key_type``: its first field names that type, and
    (but for certificates, which hold fixed-size numbers too) its length-prefixed fields
    fill it exactly, so a line cut anywhere fails."""
    try:
        data = base64.b64decode(blob, validate=True)
    except (binascii.Error, ValueError):
        return False
    fields: list[bytes] = []
    at = 0
    while at + 4 <= len(data):
        size = int.from_bytes(data[at : at + 4], "big")
        fields.append(data[at + 4 : at + 4 + size])
        at += 4 + size
    if not fields or fields[0] != key_type.encode():
        return False
    return "-cert-" in key_type or (at == len(data) and len(fields) >= 2)


def key_file_problem(text: str, name: str = "KEY") -> str | None:
    """None when ``text`` (the content of file ``name``) holds public key lines and
    nothing else; else what is wrong, in a few words (the first bad line's, numbered)."""
    if text.lstrip().startswith(PRIVATE_KEY_MARKERS):
        return private_key_problem(name)
    numbered = [
        (number, line.strip())
        for number, line in enumerate(text.splitlines(), 1)
        if line.strip() and not line.strip().startswith("#")
    ]
    if not numbered:
        return NO_PUBLIC_KEY
    for number, line in numbered:
        problem = key_line_problem(line)
        if problem is not None:
            return f"line {number}: {problem}"
    return None
