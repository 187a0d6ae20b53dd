"""qvm qmp's key=value arguments, and the control session's refusal without a VM."""

from __future__ import annotations

from pathlib import Path

import pytest

from qvm.control.session import ControlSession, parse_kv_args
from qvm.errors import NotRunningError


def test_values_are_json_where_they_parse() -> None:
    assert parse_kv_args(
        ["id=cpu1", "core-id=1", "on=true", "x=null", 'o={"a": [1, 2]}', 's="7"', "f=1.5"]
    ) == {
        "id": "cpu1",
        "core-id": 1,
        "on": True,
        "x": None,
        "o": {"a": [1, 2]},
        "s": "7",
        "f": 1.5,
    }


def test_value_may_contain_equals_and_be_empty() -> None:
    assert parse_kv_args(["cmdline=a=b c", "empty="]) == {"cmdline": "a=b c", "empty": ""}


@pytest.mark.parametrize("bad", ["novalue", "=1"])
def test_key_value_required(bad: str) -> None:
    with pytest.raises(ValueError, match="expected key=value"):
        parse_kv_args([bad])


def test_session_on_a_vm_that_is_not_running(tmp_path: Path) -> None:
    from qvm.layout.rundir import RunDir

    run = RunDir(tmp_path / "vm1")
    run.path.mkdir()
    with pytest.raises(NotRunningError, match="vm1: not running"), ControlSession(run):
        pass
