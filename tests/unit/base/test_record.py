"""qvm.base.record.Record behaves as typing.NamedTuple does, for everything qvm uses."""

from __future__ import annotations

import subprocess
import sys
import textwrap
from pathlib import Path
from typing import NamedTuple

import pytest
from hypothesis import given
from hypothesis import strategies as st

from qvm.base.record import Record


class Fast(Record):
    name: str
    count: int = 1
    tags: tuple[str, ...] = ()

    @property
    def label(self) -> str:
        return f"{self.name}x{self.count}"


class Slow(NamedTuple):
    name: str
    count: int = 1
    tags: tuple[str, ...] = ()


values = st.tuples(st.text(max_size=5), st.integers(), st.tuples(st.text(max_size=3)))


@given(values=values, changed=st.integers())
def test_a_record_is_the_named_tuple_it_stands_for(
    values: tuple[str, int, tuple[str, ...]], changed: int
) -> None:
    fast, slow = Fast(*values), Slow(*values)
    assert tuple(fast) == tuple(slow) and fast == slow
    assert repr(fast) == repr(slow).replace("Slow", "Fast")
    assert fast._asdict() == slow._asdict()
    assert tuple(fast._replace(count=changed)) == tuple(slow._replace(count=changed))
    assert Fast(name=values[0], tags=values[2], count=values[1]) == fast
    assert (fast.name, fast.count, fast.tags) == values
    assert hash(fast) == hash(slow)


def test_fields_defaults_methods_and_mistakes() -> None:
    assert Fast._fields == Slow._fields == ("name", "count", "tags")
    assert Fast._field_defaults == Slow._field_defaults == {"count": 1, "tags": ()}
    assert Fast("a").label == "ax1"
    name, count, tags = Fast("b", 2)
    assert (name, count, tags) == ("b", 2, ())
    with pytest.raises(TypeError, match="missing field 'name'"):
        Fast()
    with pytest.raises(TypeError, match="no field 'colour'"):
        Fast("a", colour=1)
    with pytest.raises(TypeError, match="no field 'colour'"):
        Fast("a")._replace(colour=1)
    with pytest.raises(TypeError, match="4 values for 3 fields"):
        Fast("a", 1, (), 4)
    with pytest.raises(AttributeError):
        Fast("a").name = "b"  # type: ignore[misc]
    with pytest.raises(TypeError, match="follows one with"):

        class Wrong(Record):
            a: int = 1
            b: int


CHECKED = """
from qvm.base.record import Record

class Point(Record):
    name: str
    size: int = 1

Point(1)
Point()
Point("a", colour=2)
Point("a").name = "b"
name, size = Point("a", 2)
reveal_type(Point("a")._replace(size=2))
reveal_type(Point("a").size)
"""


def test_the_type_checker_checks_each_construction(tmp_path: Path) -> None:
    """Record is a dataclass_transform: mypy checks a construction against the fields (a
    wrong type, a missing or unknown field), keeps them read-only, and sees a tuple.
    Without it, the catch-all runtime ``__new__`` would let every construction pass."""
    uses = tmp_path / "uses.py"
    uses.write_text(textwrap.dedent(CHECKED))
    repo = Path(__file__).resolve().parents[3]
    done = subprocess.run(
        [str(Path(sys.executable).parent / "mypy"), "--no-incremental", str(uses)],
        cwd=repo,
        capture_output=True,
        text=True,
        timeout=120,
    )
    lines = [line.split(": ", 1)[1] for line in done.stdout.splitlines() if ": " in line]
    assert lines == [
        'error: Argument 1 to "Point" has incompatible type "int"; expected "str"  [arg-type]',
        'error: Missing positional argument "name" in call to "Point"  [call-arg]',
        'error: Unexpected keyword argument "colour" for "Point"  [call-arg]',
        'error: Property "name" defined in "Point" is read-only  [misc]',
        'note: Revealed type is "uses.Point"',
        'note: Revealed type is "int"',
    ], done.stdout
