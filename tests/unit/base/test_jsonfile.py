"""``qvm.base.jsonfile.loads`` decodes records with json's C scanner, without importing
json: held here to ``json.loads``, value for value and error for error."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from qvm.base import jsonfile
from qvm.base.jsonfile import loads, read_json_strict

JSON_VALUES = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(),
    lambda children: (
        st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=5), children, max_size=4)
    ),
    max_leaves=12,
)


def _outcome(decode: Any, raw: bytes) -> tuple[str, Any]:
    try:
        return "value", decode(raw)
    except Exception as error:  # noqa: BLE001 - the exception is what is compared
        return type(error).__name__, str(error)


def test_the_c_scanner_is_used() -> None:
    assert jsonfile._scan is not None  # CPython: the test below compares something


@given(JSON_VALUES, st.sampled_from(["", " ", "\n", "\t\r\n "]), st.booleans())
def test_a_record_reads_as_json_loads_reads_it(value: Any, space: str, indent: bool) -> None:
    text = json.dumps(value, indent=2 if indent else None, ensure_ascii=not indent)
    raw = (space + text + space).encode()
    assert loads(raw) == json.loads(raw)


@given(
    st.binary(max_size=40)
    | st.text(alphabet='{}[]",:0123456789.eE-+ tfnrul\\a\n', max_size=30).map(str.encode)
)
def test_anything_else_reads_or_fails_as_json_loads_says(raw: bytes) -> None:
    mine, theirs = _outcome(loads, raw), _outcome(json.loads, raw)
    if mine[0] == "value" and isinstance(mine[1], float) and math.isnan(mine[1]):
        assert theirs[0] == "value" and math.isnan(theirs[1])
    else:
        assert mine == theirs


@pytest.mark.parametrize(
    "raw",
    [
        b"",
        b"{",
        b"{not json",
        b"[1,]",
        b"1 2",
        b"\xef\xbb\xbf{}",
        b'"\xff"',
        b"NaN",
        b"-Infinity",
        '{"a": "\u00e9"}'.encode("utf-16"),
        b"[" * 100000,
    ],
)
def test_edges_read_as_json_loads_reads_them(raw: bytes) -> None:
    mine, theirs = _outcome(loads, raw), _outcome(json.loads, raw)
    if raw == b"NaN":
        assert math.isnan(mine[1]) and math.isnan(theirs[1])
    else:
        assert mine == theirs


def test_a_corrupt_record_names_its_file(tmp_path: Any) -> None:
    path = tmp_path / "state.json"
    path.write_text("{not json")
    with pytest.raises(ValueError, match="state.json: not valid JSON .Expecting property name"):
        read_json_strict(path)


def test_a_corrupt_record_read_before_json_is_imported_says_why() -> None:
    """The C scanner raises json's own error only once json.decoder is imported: before
    that, ``loads`` must still end with json.loads' message, not a SystemError."""
    code = (
        "import sys\n"
        "from qvm.base.jsonfile import loads\n"
        "assert 'json' not in sys.modules\n"
        "try:\n    loads(b'{not json')\n"
        "except ValueError as error:\n    print(type(error).__name__, error)\n"
    )
    done = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=60, check=False
    )
    assert done.stdout == (
        "JSONDecodeError Expecting property name enclosed in double quotes: "
        "line 1 column 2 (char 1)\n"
    ), done.stderr
