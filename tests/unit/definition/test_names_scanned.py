"""Names that `qvm status`, `list` and `up` read on every run, scanned by hand rather than
with regular expressions (compiling each cost those commands ~0.2 ms): held here to what
the expressions they replaced said, on any text."""

from __future__ import annotations

import json
import re
import tempfile
from pathlib import Path

from hypothesis import given, settings
from hypothesis import strategies as st

from qvm.definition.discovery import _toml_names
from qvm.definition.naming import generated_id_kind, kind_of_prefix
from qvm.definition.reader import _render_key

_GENERATED_ID = "(" + "|".join(map(re.escape, kind_of_prefix())) + ")[0-9]+"
_BARE_KEY = r"[A-Za-z0-9_-]+"

# the prefixes themselves, digits (ASCII and not), and what is near them
ID_TEXT = st.lists(
    st.sampled_from([*kind_of_prefix(), "0", "7", "٣", "x", "-", "_", " ", "c", "d"]), max_size=5
).map("".join)


@settings(max_examples=1000, deadline=None)
@given(st.one_of(ID_TEXT, st.text(max_size=8)))
def test_generated_id_kind_reads_as_the_pattern_did(dev_id: str) -> None:
    match = re.fullmatch(_GENERATED_ID, dev_id)
    assert generated_id_kind(dev_id) == (None if match is None else kind_of_prefix()[match[1]])


@settings(max_examples=1000, deadline=None)
@given(st.one_of(st.text(alphabet='aZ09_-. é"', max_size=6), st.text(max_size=6)))
def test_a_key_renders_as_the_pattern_said(key: str) -> None:
    bare = re.fullmatch(_BARE_KEY, key) is not None
    assert _render_key(key) == (key if bare else json.dumps(key, ensure_ascii=False))


def _toml_entries(folder: Path) -> list[Path]:
    return [folder / name for name in _toml_names(str(folder))]


@settings(max_examples=50, deadline=None)
@given(
    st.lists(
        st.text(alphabet="ab.tomlT\n*?[]- ", min_size=1, max_size=8).filter(
            lambda n: n not in (".", "..") and "/" not in n
        ),
        max_size=6,
        unique=True,
    )
)
def test_the_toml_entries_are_what_glob_gave(names: list[str]) -> None:
    with tempfile.TemporaryDirectory() as where:
        folder = Path(where)
        for index, name in enumerate(names):  # files, and a folder now and then
            if index % 3 == 2:
                (folder / name).mkdir()
            else:
                (folder / name).write_text("")
        (folder / "link.toml").symlink_to(folder / "nowhere")
        assert sorted(_toml_entries(folder)) == sorted(folder.glob("*.toml"))
    assert _toml_entries(folder) == list(folder.glob("*.toml")) == []  # gone


def test_an_unreadable_folder_lists_nothing_as_glob_did(tmp_path: Path) -> None:
    (tmp_path / "a.toml").write_text("")
    tmp_path.chmod(0o300)  # root reads anyway: then both list it
    try:
        assert _toml_entries(tmp_path) == list(tmp_path.glob("*.toml"))
    finally:
        tmp_path.chmod(0o700)
