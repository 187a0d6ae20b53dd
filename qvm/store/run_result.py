"""The result of one `qvm run`: what `--json` prints and `--result FILE` holds.

It crosses a process boundary (a batch job writes it, `qvm slurm results` or a script
reads it), so it is a typed record, read back with every key checked.
"""

from __future__ import annotations

import os
from typing import Any

from qvm.base.jsonfile import write_json_atomic
from qvm.base.record import Record
from qvm.store.fields import Fields, read_record

# how a run ended: CMD ran to its end; --timeout came first; SIGTERM/SIGINT; qvm failed
RUN_STATES = ("exited", "timeout", "cancelled", "failed")
# the phases of a run, in order; a run starts with "boot" or, with --from, "restore"
PHASES = ("boot", "restore", "agent_ready", "command", "teardown")


class RunResult(Record):
    name: str  # the throwaway VM's own name
    definition: str  # the VM whose definition it was made from
    source: str | None  # --from VM@TAG ("from" in JSON), or None for a cold boot
    state: str  # one of RUN_STATES
    exit_code: int | None  # CMD's, or None (a signal ended it, or it never ended)
    signal: int | None  # the signal that ended CMD, or None
    status: int  # qvm run's exit status (docs/cluster.md)
    stdout: str
    stderr: str
    phases: dict[str, float | None]  # PHASES that apply -> seconds (None: not reached)
    started_at: float  # Unix time
    ended_at: float
    error: str | None  # the one-line reason of a failed, cancelled or timed-out run
    command: tuple[str, ...] = ()
    kept: bool = False  # --keep: the VM still runs

    def to_json(self) -> dict[str, Any]:
        data = self._asdict()
        data["from"] = data.pop("source")
        data["command"] = list(self.command)
        return data

    @classmethod
    def read(cls, f: Fields) -> RunResult:
        phases = f.object("phases")
        for key, value in phases.data.items():
            if key not in PHASES or not (value is None or isinstance(value, int | float)):
                raise phases.fail(key, "must be a phase's seconds or null")
        return f.declared(
            cls,
            state=f.one_of("state", RUN_STATES),
            phases=dict(phases.data),
            source=f.str("from", None),
        )


def write_run_result(path: str | os.PathLike[str], result: RunResult) -> None:
    """Atomically: a reader (a job's epilog, `qvm slurm results`) sees all of it or none."""
    write_json_atomic(path, result.to_json())


def read_run_result(path: str | os.PathLike[str]) -> RunResult | None:
    return read_record(path, lambda data, source: RunResult.read(Fields(data, source)))
