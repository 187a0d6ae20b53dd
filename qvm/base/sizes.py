"""Byte sizes as people write them: "512M", "2G", "1.5GiB".

Every unit is a power of 1024, whether it is written K, KiB or KB. QEMU reads
``-m 512M`` as 512 MiB and users copy sizes from QEMU command lines, so "MB" meaning
10**6 bytes would silently give them a slightly smaller machine than they asked for.
"""

from __future__ import annotations

_MULTIPLIERS: dict[str, int] = {"": 1, "b": 1} | {
    letter + suffix: 1024**power
    for power, letter in enumerate("kmgt", start=1)
    for suffix in ("", "b", "ib")
}

# Largest first, so format_size picks the shortest exact form.
_UNITS = (("T", 1024**4), ("G", 1024**3), ("M", 1024**2), ("K", 1024))

_DIGITS = frozenset("0123456789")
_UNIT_LETTERS = frozenset("ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz")


class SizeError(ValueError):
    """A size that cannot be read; ``reason`` is the message without the value."""

    def __init__(self, value: str | int, reason: str) -> None:
        self.value = value
        self.reason = reason
        shown = f'"{value}"' if isinstance(value, str) else str(value)
        super().__init__(f"invalid size {shown}: {reason}")


def parse_size(text: str | int) -> int:
    """Return the number of bytes ``text`` stands for.

    Accepts an int (bytes) or a string: a number, an optional space and an optional
    unit, case-insensitive. K, M, G and T mean powers of 1024 however they are spelled
    ("M", "MiB" and "MB" are all 1024**2), as in QEMU's ``-m 512M``. "B" or no unit
    means bytes. Decimals are allowed when the result is a whole number of bytes
    ("1.5G", not "0.3K").

    Raises SizeError (a ValueError) for an empty, negative or malformed size, an
    unknown unit or a fractional number of bytes.
    """
    if isinstance(text, bool) or not isinstance(text, int | str):
        raise SizeError(str(text), 'must be a number of bytes or a string like "512M"')
    if isinstance(text, int):
        if text < 0:
            raise SizeError(text, "must not be negative")
        return text
    return _parse_size_text(text)


def _parse_size_text(text: str) -> int:
    stripped = text.strip()
    if not stripped:
        raise SizeError(text, "must not be empty")
    if stripped.startswith("-"):
        raise SizeError(text, "must not be negative")
    split = _number_and_unit(stripped)
    if split is None:
        raise SizeError(text, "must be a number with an optional unit")
    number, unit = split
    multiplier = _MULTIPLIERS.get(unit.lower())
    if multiplier is None:
        raise SizeError(text, f'unknown unit "{unit}"')
    if number.isdigit():
        return int(number) * multiplier
    # exact decimals ("1.5G") without float rounding; fractions costs ~2 ms at start-up
    from fractions import Fraction  # noqa: PLC0415 -- only a size with a decimal point

    size = Fraction(number) * multiplier
    if size.denominator != 1:
        raise SizeError(text, "must be a whole number of bytes")
    return int(size)


def _number_and_unit(text: str) -> tuple[str, str] | None:
    """``text`` as its number (digits, a point and digits: "512", "1.5", "2.", ".5") and
    its unit (letters, after optional whitespace), or None. Scanned by hand rather than
    with a regular expression: compiling one would cost every command that loads a
    machine file ~0.2 ms (``tests/unit/base/test_sizes.py`` holds the two to agreeing)."""
    end = _skip_digits(text, 0)
    whole = end > 0
    if text[end : end + 1] == ".":
        fraction_end = _skip_digits(text, end + 1)
        if not whole and fraction_end == end + 1:
            return None  # "." alone
        end = fraction_end
    elif not whole:
        return None
    unit = text[end:].lstrip()
    if not _UNIT_LETTERS.issuperset(unit):
        return None
    return text[:end], unit


def _skip_digits(text: str, start: int) -> int:
    end = start
    while end < len(text) and text[end] in _DIGITS:
        end += 1
    return end


def format_size(n: int) -> str:
    """Return the shortest exact way to write ``n`` bytes: "256M", "2G", "1536M", "1000"."""
    if isinstance(n, bool) or not isinstance(n, int):
        raise TypeError(f"format_size needs an int, got {type(n).__name__}")
    if n < 0:
        raise ValueError(f"cannot format a negative size: {n}")
    for letter, multiplier in _UNITS:
        if n and n % multiplier == 0:
            return f"{n // multiplier}{letter}"
    return str(n)


def human_size(n: int) -> str:
    """``n`` bytes for people: "512 B", "256 MiB", "1.5 GiB" (one decimal at most)."""
    value = float(n)
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(value) < 1024 or unit == "TiB":
            if unit == "B":
                return f"{n} B"
            return f"{value:.1f} {unit}".replace(".0 ", " ")
        value /= 1024
    return f"{n} B"
