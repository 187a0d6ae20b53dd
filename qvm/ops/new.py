"""`qvm new`, the writing half: the document from ``qvm.definition.new`` becomes a machine
file next to the others, never replacing one (a hard link of a finished temporary file),
loaded back to prove it valid, and noted in the VM's run dir with its checksum, so that
``qvm rm --purge`` removes it only while it is still exactly what qvm wrote.
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path
from typing import Any

from qvm.definition.load import load_machine
from qvm.definition.new import render
from qvm.definition.schema import Machine
from qvm.errors import DefinitionError, QvmError
from qvm.layout.rundir import RunDir
from qvm.store.new import NewRecord, write_new_record


def write_new(doc: dict[str, Any], path: Path, run: RunDir) -> Machine:
    """Write ``path`` (never over an existing file), check it loads, note qvm made it."""
    text = render(doc)
    if path.exists():
        raise QvmError(
            f"{path}: already exists; qvm new never replaces a machine file "
            f"(hint: pick another name, or qvm rm --purge {path.stem})"
        )
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(text)
    try:
        try:
            load_machine(tmp, name=path.stem)
        except DefinitionError as exc:
            raise QvmError(str(exc).replace(str(tmp), str(path))) from None
        try:
            os.link(tmp, path)
        except FileExistsError:
            raise QvmError(
                f"{path}: already exists; qvm new never replaces a machine file"
            ) from None
    finally:
        tmp.unlink(missing_ok=True)
    run.path.mkdir(parents=True, exist_ok=True)
    os.chmod(run.path, 0o700)
    digest = hashlib.sha256(text.encode()).hexdigest()
    write_new_record(run.new_record, NewRecord(str(path.resolve()), digest))
    return load_machine(path)
