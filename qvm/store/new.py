"""``new.json``: the machine file ``qvm new`` wrote for a VM, and its sha256, so that
``qvm rm --purge`` removes that file only while it is still exactly what qvm wrote.
"""

from __future__ import annotations

import os
from typing import Any

from qvm.base.jsonfile import write_json_atomic
from qvm.base.record import Record
from qvm.store.fields import Fields, read_record

NEW_HINT = "qvm new wrote it; delete it, and qvm rm --purge keeps the machine file"


class NewRecord(Record):
    machine_file: str  # absolute
    sha256: str  # hex digest of the text qvm new wrote

    @classmethod
    def from_json(cls, data: Any, source: str) -> NewRecord:
        f = Fields(data, source, NEW_HINT)
        digest = f.str("sha256")
        if len(digest) != 64 or not all(c in "0123456789abcdef" for c in digest):
            raise f.fail("sha256", "must be 64 lowercase hex digits")
        return cls(machine_file=f.str("machine_file"), sha256=digest)

    def to_json(self) -> dict[str, Any]:
        return self._asdict()


def read_new(path: str | os.PathLike[str]) -> NewRecord | None:
    """The note at ``path``; None when there is none. Corrupt: RecordError."""
    return read_record(path, NewRecord.from_json, NEW_HINT)


def write_new_record(path: str | os.PathLike[str], record: NewRecord) -> None:
    write_json_atomic(path, record.to_json())
