"""The record of a `qvm run` (--json, --result FILE): written atomically, read back with
every key checked."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from qvm.errors import RecordError
from qvm.store.run_result import RunResult, read_run_result, write_run_result

RESULT = RunResult(
    name="vm1-run-0a1b2c",
    definition="vm1",
    source="vm1@ready",
    state="exited",
    exit_code=3,
    signal=None,
    status=3,
    stdout="a b\n",
    stderr="",
    phases={"restore": 0.4, "agent_ready": 0.2, "command": 0.05, "teardown": 0.1},
    started_at=1.5,
    ended_at=2.5,
    error=None,
    command=("sh", "-c", "exit 3"),
)


def test_a_result_round_trips_through_its_file(tmp_path: Path) -> None:
    path = tmp_path / "r.json"
    write_run_result(path, RESULT)
    data = json.loads(path.read_text())
    assert data["from"] == "vm1@ready" and "source" not in data
    assert read_run_result(path) == RESULT
    assert [p.name for p in tmp_path.iterdir()] == ["r.json"]  # no temporary file left


@pytest.mark.parametrize(
    ("key", "value", "problem"),
    [
        ("state", "done", "state"),
        ("exit_code", "3", "exit_code"),
        ("phases", {"boot": "fast"}, "boot"),
        ("phases", {"nap": 1.0}, "nap"),
        ("stdout", None, "stdout"),
    ],
)
def test_a_bad_key_is_one_record_error_naming_it(
    tmp_path: Path, key: str, value: object, problem: str
) -> None:
    path = tmp_path / "r.json"
    data = RESULT.to_json()
    data[key] = value
    path.write_text(json.dumps(data))
    with pytest.raises(RecordError, match=problem):
        read_run_result(path)


def test_no_file_is_no_result(tmp_path: Path) -> None:
    assert read_run_result(tmp_path / "none.json") is None
