from __future__ import annotations

import re

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from qvm.base.sizes import SizeError, _number_and_unit, format_size, parse_size

KIB, MIB, GIB, TIB = 1024, 1024**2, 1024**3, 1024**4


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        (0, 0),
        (4096, 4096),
        ("0", 0),
        ("1000", 1000),
        ("512B", 512),
        ("1K", KIB),
        ("1k", KIB),
        ("1KiB", KIB),
        ("1KB", KIB),
        ("1kb", KIB),
        ("512M", 512 * MIB),
        ("512MiB", 512 * MIB),
        ("512MB", 512 * MIB),
        ("512 M", 512 * MIB),
        ("  512m  ", 512 * MIB),
        ("2G", 2 * GIB),
        ("2gib", 2 * GIB),
        ("1.5G", 1536 * MIB),
        ("1.5 GiB", 1536 * MIB),
        (".5K", 512),
        ("2.K", 2 * KIB),
        ("1T", TIB),
        ("1TB", TIB),
    ],
)
def test_parse_size_accepts(text: str | int, expected: int) -> None:
    assert parse_size(text) == expected


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("", 'invalid size "": must not be empty'),
        ("   ", 'invalid size "   ": must not be empty'),
        ("-1G", 'invalid size "-1G": must not be negative'),
        (-5, "invalid size -5: must not be negative"),
        ("12X", 'invalid size "12X": unknown unit "X"'),
        ("1Mi", 'invalid size "1Mi": unknown unit "Mi"'),
        ("1.5", 'invalid size "1.5": must be a whole number of bytes'),
        ("0.3K", 'invalid size "0.3K": must be a whole number of bytes'),
        ("lots", 'invalid size "lots": must be a number with an optional unit'),
        ("1e9", 'invalid size "1e9": must be a number with an optional unit'),
        ("1 2M", 'invalid size "1 2M": must be a number with an optional unit'),
        ("M", 'invalid size "M": must be a number with an optional unit'),
        (True, 'invalid size "True": must be a number of bytes or a string like "512M"'),
    ],
)
def test_parse_size_rejects(text: str | int, message: str) -> None:
    with pytest.raises(ValueError) as caught:
        parse_size(text)
    assert str(caught.value) == message


def test_size_error_carries_reason_without_the_value() -> None:
    with pytest.raises(SizeError) as caught:
        parse_size("12X")
    assert caught.value.reason == 'unknown unit "X"'
    assert caught.value.value == "12X"


@pytest.mark.parametrize(
    ("size", "expected"),
    [
        (0, "0"),
        (1000, "1000"),
        (1023, "1023"),
        (KIB, "1K"),
        (1536, "1536"),
        (1536 * KIB, "1536K"),
        (256 * MIB, "256M"),
        (1536 * MIB, "1536M"),
        (2 * GIB, "2G"),
        (1024 * GIB, "1T"),
        (3 * TIB, "3T"),
        (2048 * TIB, "2048T"),
    ],
)
def test_format_size(size: int, expected: str) -> None:
    assert format_size(size) == expected


@pytest.mark.parametrize("size", [0, 1, 1000, KIB, 1536 * MIB, 2 * GIB, 5 * TIB + KIB])
def test_format_size_round_trips(size: int) -> None:
    assert parse_size(format_size(size)) == size


def test_format_size_rejects_negative() -> None:
    with pytest.raises(ValueError, match="negative"):
        format_size(-1)


# what parse_size read sizes with before it scanned them by hand (compiling this cost
# every command that loads a machine file)
_SIZE_PATTERN = re.compile(r"(?P<number>[0-9]+(?:\.[0-9]*)?|\.[0-9]+)\s*(?P<unit>[a-zA-Z]*)")


@settings(max_examples=2000, deadline=None)
@given(st.text(alphabet="0123456789.kKmMgGiIbBtTxZ \t\x1c\xa0\u2003-+٣é", max_size=12))
def test_a_size_splits_as_the_regular_expression_did(text: str) -> None:
    match = _SIZE_PATTERN.fullmatch(text)
    expected = None if match is None else (match["number"], match["unit"])
    assert _number_and_unit(text) == expected


@settings(max_examples=500, deadline=None)
@given(st.text(max_size=12))
def test_any_text_splits_as_the_regular_expression_did(text: str) -> None:
    match = _SIZE_PATTERN.fullmatch(text)
    expected = None if match is None else (match["number"], match["unit"])
    assert _number_and_unit(text) == expected
