"""Image URLs and the checksums that must come with them."""

from __future__ import annotations

DIGESTS = {"sha256": 64, "sha512": 128}  # algorithm -> hex length


def is_url(text: str) -> bool:
    return text.startswith(("http://", "https://"))
