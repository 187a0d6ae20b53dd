"""``Fields.declared``: a record read field by field as its annotations declare."""

from __future__ import annotations

import pytest

from qvm.base.record import Record
from qvm.errors import RecordError
from qvm.store.fields import Fields


class _Sample(Record):
    name: str
    count: int
    note: str | None  # no default, but may be absent or null
    ids: tuple[str, ...] = ()
    ratio: float | None = None
    on: bool = False
    extra: dict[str, str] | None = None  # no reader for its type: the caller gives it


def _read(data: object) -> _Sample:
    return Fields(data, "sample.json").declared(_Sample, extra=None)


def test_each_field_is_read_by_its_declared_type_with_its_default() -> None:
    assert _read({"name": "a", "count": 2}) == _Sample("a", 2, None)
    full = {"name": "a", "count": 2, "note": "n", "ids": ["x"], "ratio": 1, "on": True}
    assert _read(full) == _Sample("a", 2, "n", ("x",), 1.0, True)
    assert _read({"name": "a", "count": 2, "note": None}).note is None


@pytest.mark.parametrize(
    ("data", "problem"),
    [
        ({"count": 2}, "name: missing"),
        ({"name": "a", "count": True}, "count: must be an integer, got True"),
        ({"name": "a", "count": 2, "ids": "x"}, "ids: must be a list of strings, got 'x'"),
        ({"name": "a", "count": 2, "on": 1}, "on: must be true or false, got 1"),
    ],
)
def test_a_bad_field_is_a_record_error_naming_it(data: object, problem: str) -> None:
    with pytest.raises(RecordError) as error:
        _read(data)
    assert str(error.value) == f"sample.json: {problem}"


def test_a_field_of_a_type_without_a_reader_must_be_given() -> None:
    with pytest.raises(TypeError, match=r"_Sample\.extra"):
        Fields({"name": "a", "count": 2}, "sample.json").declared(_Sample)


def test_a_mapping_is_a_dict_of_its_own_or_the_default() -> None:
    data = {"shape": {"machine": "q35"}, "none": None, "bad": [1]}
    f = Fields(data, "sample.json")
    shape = f.mapping("shape")
    assert shape == {"machine": "q35"}
    shape["machine"] = "pc"  # a copy: the record read never changes what was read
    assert data["shape"] == {"machine": "q35"}
    assert f.mapping("none", {}) == {}
    assert f.mapping("absent", None) is None
    with pytest.raises(RecordError, match=r"^sample\.json: absent: missing"):
        f.mapping("absent")
    with pytest.raises(RecordError, match=r"^sample\.json: bad: "):
        f.mapping("bad", None)
