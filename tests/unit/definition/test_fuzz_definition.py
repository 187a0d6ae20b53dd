"""Property-based fuzz of the definition loader: whatever a machine file holds, only
qvm's own error (a DefinitionError) leaves ``load_machine``, and every line of its
message is bounded, so the CLI prints one short line per problem, never a traceback.

Documents come three ways: random TOML values under the real keys (``schema.KEYS``),
random text, and random bytes. The example counts add up to a few thousand documents and
the file runs in seconds.
"""

from __future__ import annotations

import os
import shutil
import string
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest
import tomli_w
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from qvm.definition.load import load_machine
from qvm.definition.schema import KEYS
from qvm.errors import DefinitionError

# A problem line: the file, a key path (cut at 120), the problem, "got" (cut at 80) and
# a hint. The file name here is short, so 1,000 characters is a generous bound.
MAX_LINE = 1000

FUZZ = settings(
    max_examples=1500,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)

# one file for every example (hypothesis does not mix with function-scoped tmp_path),
# in a folder made when the module's tests run: made at import, it stayed behind whenever
# the module was collected and not run
_FOLDER = Path(tempfile.gettempdir()) / f"qvm-fuzz-{os.getpid()}"
_FILE = _FOLDER / "fuzz.toml"


@pytest.fixture(scope="module", autouse=True)
def _folder() -> Iterator[None]:
    _FOLDER.mkdir(mode=0o700)  # never an existing one, nor a link planted in its place
    yield
    shutil.rmtree(_FOLDER, ignore_errors=True)


# Values a user might write, and the ones that broke qvm: huge and negative integers,
# NaN, a NUL, "~nosuchuser", long strings.
_TEXT = st.one_of(
    st.text(max_size=20),
    st.sampled_from(
        [
            "",
            "q35",
            "512M",
            "2G",
            "-1",
            "1.5G",
            "tcp:2222:22",
            "tcp:10.99.99.99:2222:22",
            "~nosuchuser/x",
            "~/x",
            "a\x00b",
            "../../etc/passwd",
            "http://example.com/x.qcow2",
            "52:54:00:12:34:56",
            "virtio",
            "cidata",
            "hp0",
            "x" * 5000,
        ]
    ),
)
_SCALAR = st.one_of(
    _TEXT,
    st.booleans(),
    st.integers(),
    st.sampled_from([0, 1, -1, 2**63, -(2**63), 10**400, 1024, 1025, 16 * 1024**2]),
    st.floats(allow_nan=True, allow_infinity=True),
)
_VALUE = st.recursive(
    _SCALAR,
    lambda inner: st.one_of(
        st.lists(inner, max_size=4),
        st.dictionaries(st.text(string.ascii_lowercase + "_", max_size=8), inner, max_size=4),
    ),
    max_leaves=12,
)
_ARRAYS = ("disk", "nic")  # [[disk]] and [[nic]]


def _table(section: str) -> st.SearchStrategy[dict]:
    keys = list(KEYS[section])
    known = st.dictionaries(st.sampled_from(keys), _VALUE, max_size=len(keys))
    unknown = st.dictionaries(st.text(max_size=6), _VALUE, max_size=2)
    return st.builds(lambda a, b: {**b, **a}, known, unknown)


def _section_value(section: str) -> st.SearchStrategy:
    if section in _ARRAYS:
        return st.one_of(st.lists(_table(section), max_size=3), _table(section), _VALUE)
    return st.one_of(_table(section), _VALUE)


_DOCUMENT = st.fixed_dictionaries(
    {},
    optional={
        **{key: _VALUE for key in KEYS[""]},
        **{section: _section_value(section) for section in KEYS if section},
    },
)


def _check(data: bytes) -> None:
    _FILE.write_bytes(data)
    try:
        load_machine(_FILE)
    except DefinitionError as error:
        lines = str(error).splitlines()
        assert lines, "an error without a message"
        for line in lines:
            assert len(line) <= MAX_LINE, line[:200]
            assert line.startswith(str(_FILE)), line[:200]
            assert line.isprintable(), repr(line[:200])


@FUZZ
@given(_DOCUMENT)
def test_random_values_under_the_real_keys(document: dict) -> None:
    try:
        data = tomli_w.dumps(document).encode()
    except (TypeError, ValueError):  # NaN and friends tomli_w refuses: write them by hand
        return
    _check(data)


_TOML_BITS = st.sampled_from(
    [
        "[cpu]\n",
        "[[disk]]\n",
        "[[nic]]\n",
        "[memory]\n",
        "count = ",
        "size = ",
        "file = ",
        "forwards = [",
        "]\n",
        "{",
        "}",
        '"',
        "'''",
        "nan",
        "inf",
        "-0",
        "9" * 500,
        "\n",
        "=",
        "1979-05-27T07:32:00Z",
        "\\u0000",
        "~nosuchuser/x",
        "[" * 50,
    ]
)


@settings(FUZZ, max_examples=700)
@given(st.lists(st.one_of(_TOML_BITS, st.text(max_size=10)), max_size=30).map("".join))
def test_random_text(text: str) -> None:
    _check(text.encode("utf-8", "surrogatepass"))


@settings(FUZZ, max_examples=300)
@given(st.binary(max_size=200))
def test_random_bytes(data: bytes) -> None:
    _check(data)


def test_deep_nesting_and_long_numbers() -> None:
    """The documents the generators are unlikely to reach: each a one-line error."""
    for text in (
        "x = " + "[" * 3000 + "]" * 3000,
        "x = " + "{a = " * 3000 + "1" + "}" * 3000,
        "[cpu]\ncount = " + "9" * 400,
        "[cpu]\ncount = " + "9" * 5000,
        "[supervisor]\nrestart_delay = " + "9" * 400,
        '[machine]\ntype = "' + "x" * 10_000_000 + '"',
        '"' + "k" * 100_000 + '" = 1',
        "[[nic]]\nforwards = [" + ", ".join(['"tcp:1:1"'] * 2000) + "]",
    ):
        _check(text.encode())
