"""``job.json`` in a Slurm job's results folder: what `qvm slurm submit` asked for.

`qvm slurm status` and `results` read it to know how many tasks there are and what they
ran after Slurm has forgotten the job (MinJobAge after its end, without accounting).
"""

from __future__ import annotations

import os
from typing import Any

from qvm.base.jsonfile import write_json_atomic
from qvm.base.record import Record
from qvm.store.fields import Fields, read_record

JOB_FILE = "job.json"


class SlurmJobRecord(Record):
    job_id: int
    name: str  # the definition each task runs
    source: str | None  # --from VM@TAG ("from" in JSON)
    tasks: int  # array tasks 0 .. tasks-1
    command: tuple[str, ...]
    cpus: int  # --cpus-per-task
    mem_mib: int  # --mem
    submitted_at: float  # Unix time

    def to_json(self) -> dict[str, Any]:
        # "from", as in `qvm run`'s record and on the command line
        fields = {key: value for key, value in self._asdict().items() if key != "source"}
        return {**fields, "from": self.source, "command": list(self.command)}

    @classmethod
    def read(cls, f: Fields) -> SlurmJobRecord:
        return f.declared(cls, source=f.str("from", None))


def write_slurm_job(folder: str | os.PathLike[str], record: SlurmJobRecord) -> None:
    write_json_atomic(os.path.join(folder, JOB_FILE), record.to_json())


def read_slurm_job(folder: str | os.PathLike[str]) -> SlurmJobRecord | None:
    path = os.path.join(folder, JOB_FILE)
    return read_record(path, lambda data, source: SlurmJobRecord.read(Fields(data, source)))
