"""job.json (qvm.store.slurm_job): written and read back; a renamed key or a wrong type
is one RecordError naming the file and the key."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from qvm.errors import RecordError
from qvm.store.slurm_job import SlurmJobRecord, read_slurm_job, write_slurm_job

RECORD = SlurmJobRecord(
    job_id=12,
    name="vm1",
    source="vm1@booted",
    tasks=4,
    command=("sh", "-c", "echo $SLURM_ARRAY_TASK_ID"),
    cpus=1,
    mem_mib=512,
    submitted_at=1.5,
)


def test_round_trip(tmp_path: Path) -> None:
    write_slurm_job(tmp_path, RECORD)
    assert json.loads((tmp_path / "job.json").read_text())["from"] == "vm1@booted"
    assert read_slurm_job(tmp_path) == RECORD
    assert read_slurm_job(tmp_path / "none") is None


@pytest.mark.parametrize(
    "change,key",
    [({"tasks": "4"}, "tasks"), ({"command": "sh"}, "command"), ({"job_id": None}, "job_id")],
)
def test_a_bad_key_is_named(tmp_path: Path, change: dict[str, object], key: str) -> None:
    (tmp_path / "job.json").write_text(json.dumps({**RECORD.to_json(), **change}))
    with pytest.raises(RecordError) as caught:
        read_slurm_job(tmp_path)
    assert caught.value.key == key and caught.value.file == str(tmp_path / "job.json")
