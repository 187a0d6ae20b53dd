"""``qvm.definition.parsed``: a machine file's parse is reused only for the same text,
whatever the cache holds, and a cache that cannot be used costs time, never a result."""

from __future__ import annotations

import datetime
import math
import os
import tomllib
from pathlib import Path
from typing import Any

import pytest
import tomli_w
from framework.harness import imported_modules
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from qvm.definition import parsed
from qvm.definition.load import load_machine
from qvm.errors import DefinitionError


@pytest.fixture
def cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.setenv("QVM_CACHE_DIR", str(tmp_path / "cache"))
    return tmp_path / "cache" / "definitions"


def refuse_to_parse(monkeypatch: pytest.MonkeyPatch) -> None:
    def parse(text: str) -> dict[str, Any]:
        raise AssertionError("parsed again")

    monkeypatch.setattr(tomllib, "loads", parse)


def same(a: Any, b: Any) -> bool:
    """Equal, with NaN equal to NaN and the types kept (1 is not 1.0, nor True)."""
    if type(a) is not type(b):
        return False
    if isinstance(a, float):
        return (math.isnan(a) and math.isnan(b)) or (a == b and str(a) == str(b))
    if isinstance(a, dict):
        return list(a) == list(b) and all(same(a[k], b[k]) for k in a)
    if isinstance(a, list):
        return len(a) == len(b) and all(same(x, y) for x, y in zip(a, b, strict=True))
    return a == b


keys = st.text(min_size=1, max_size=8)
scalars = (
    st.text(max_size=20)
    | st.integers(min_value=-(2**70), max_value=2**70)
    | st.floats()
    | st.booleans()
)
values = st.recursive(
    scalars,
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(keys, inner, max_size=4),
    max_leaves=12,
)


@settings(suppress_health_check=[HealthCheck.function_scoped_fixture], max_examples=150)
@given(data=st.dictionaries(keys, values, max_size=6))
def test_a_cached_parse_is_the_parse(
    data: dict[str, Any], cache: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    text = tomli_w.dumps(data)
    expected = tomllib.loads(text)
    first = parsed.parse_toml(text, "machines/vm1.toml")
    with monkeypatch.context() as patch:
        refuse_to_parse(patch)
        again = parsed.parse_toml(text, "machines/vm1.toml")
    assert same(first, expected)
    assert same(again, expected)


def test_a_changed_text_is_parsed_again(cache: Path) -> None:
    assert parsed.parse_toml("[cpu]\nboot = 1\n", "vm1.toml") == {"cpu": {"boot": 1}}
    assert parsed.parse_toml("[cpu]\nboot = 2\n", "vm1.toml") == {"cpu": {"boot": 2}}
    assert parsed.parse_toml("[cpu]\nboot = 2 \n", "vm1.toml") == {"cpu": {"boot": 2}}
    assert len(list(cache.iterdir())) == 1  # one entry per file, not per text


def test_the_entries_written_longest_ago_go(
    cache: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(parsed, "MAX_ENTRIES", 3)
    for number in range(5):
        parsed.parse_toml(f"a = {number}\n", str(tmp_path / f"vm{number}.toml"))
        entry = next(cache.glob(f"vm{number}.toml-*.json"))
        os.utime(entry, ns=(number * 10**9, number * 10**9))  # written in this order
    parsed.parse_toml("a = 5\n", str(tmp_path / "vm5.toml"))
    assert sorted(p.name.split(".")[0] for p in cache.iterdir()) == ["vm3", "vm4", "vm5"]


def test_a_file_name_that_is_not_utf8_has_its_entry(
    cache: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = os.fsdecode(bytes(tmp_path) + b"/vm\xff.toml")  # as Python names such a file
    assert parsed.parse_toml("a = 1\n", path) == {"a": 1}
    refuse_to_parse(monkeypatch)
    assert parsed.parse_toml("a = 1\n", path) == {"a": 1}


def test_two_files_with_one_name_keep_their_own_entries(
    cache: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    parsed.parse_toml("a = 1\n", str(tmp_path / "x" / "vm1.toml"))
    parsed.parse_toml("a = 2\n", str(tmp_path / "y" / "vm1.toml"))
    refuse_to_parse(monkeypatch)
    assert parsed.parse_toml("a = 1\n", str(tmp_path / "x" / "vm1.toml")) == {"a": 1}
    assert parsed.parse_toml("a = 2\n", str(tmp_path / "y" / "vm1.toml")) == {"a": 2}


@pytest.mark.parametrize(
    "entry",
    [
        b"",
        b"\xff\xfe garbage",
        b"{",
        b"[]",
        b'{"text": "a = 1\\n"}',
        b'{"text": "a = 1\\n", "toml": [1]}',
        b'{"text": 1, "toml": {}}',
        b"[" * 100_000,
    ],
)
def test_a_corrupt_entry_is_parsed_over(entry: bytes, cache: Path) -> None:
    parsed.parse_toml("a = 1\n", "vm1.toml")
    (only,) = cache.iterdir()
    only.write_bytes(entry)
    assert parsed.parse_toml("a = 1\n", "vm1.toml") == {"a": 1}
    assert parsed._read(str(only)) == ("a = 1\n", {"a": 1})  # and written again


def test_an_entry_for_another_text_is_not_believed(
    cache: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Only the text decides: an entry whose data does not match its text still answers
    for that text alone (it can only be planted in the user's own cache)."""
    parsed.parse_toml("a = 1\n", "vm1.toml")
    (only,) = cache.iterdir()
    only.write_text('{"text": "a = 1\\n", "toml": {"a": 666}}')
    assert parsed.parse_toml("a = 2\n", "vm1.toml") == {"a": 2}


def test_dates_are_parsed_every_time(cache: Path) -> None:
    text = "when = 2026-12-02\n"
    assert parsed.parse_toml(text, "vm1.toml") == {"when": datetime.date(2026, 12, 2)}
    assert not cache.exists() or not list(cache.iterdir())
    assert parsed.parse_toml(text, "vm1.toml") == {"when": datetime.date(2026, 12, 2)}


def test_a_cache_that_is_a_file_costs_nothing_but_time(cache: Path) -> None:
    cache.parent.mkdir()
    cache.write_text("not a folder")
    assert parsed.parse_toml("a = 1\n", "vm1.toml") == {"a": 1}
    assert cache.read_text() == "not a folder"


def test_no_home_means_no_cache(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    for name in ("QVM_CACHE_DIR", "XDG_CACHE_HOME", "HOME"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setattr(os.path, "expanduser", lambda path: path)
    assert parsed.parse_toml("a = 1\n", "vm1.toml") == {"a": 1}


def test_invalid_toml_is_the_same_error_cached_or_not(cache: Path, tmp_path: Path) -> None:
    machine = tmp_path / "vm1.toml"
    machine.write_text("[cpu\n")
    for _ in range(2):
        with pytest.raises(DefinitionError, match=r"vm1.toml: invalid TOML: .*line 1"):
            load_machine(machine)
    machine.write_text("[cpu]\ncount = 1\nmax = 2\n")
    assert load_machine(machine).cpu.max == 2
    machine.write_text("[cpu]\ncount = 1\nmax = 2\nmax = 3\n")
    with pytest.raises(DefinitionError, match="invalid TOML"):
        load_machine(machine)


def test_a_command_with_a_parsed_definition_imports_no_tomllib(tmp_path: Path) -> None:
    """The point of the cache: ~7 ms of every command that reads a definition."""
    (tmp_path / "machines").mkdir()
    (tmp_path / "machines" / "vm1.toml").write_text("[cpu]\ncount = 1\n")
    env = {"QVM_CACHE_DIR": str(tmp_path / "cache")}
    first = imported_modules(["status", "vm1"], tmp_path, env)
    assert "tomllib" in first
    assert "tomllib" not in imported_modules(["status", "vm1"], tmp_path, env)
    assert "tomllib" not in imported_modules(["list"], tmp_path, env)
