"""qvm run's pure parts: the throwaway's name and definition, the cancellation shield,
and the record of a run that ended before its VM was made."""

from __future__ import annotations

import os
import signal
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from qvm.definition.schema import DiskSpec, Machine, NicSpec, PortForward, SupervisorSpec
from qvm.errors import NotRunningError
from qvm.layout.names import NAME_PATTERN, is_vm_name
from qvm.layout.rundir import job_state_dir
from qvm.ops.run import (
    Cancellation,
    RunCancelled,
    drop_empty_job_dir,
    not_run,
    throwaway_machine,
    throwaway_name,
)


@given(st.from_regex(NAME_PATTERN, fullmatch=True))
def test_a_throwaway_name_is_a_vm_name_and_names_its_definition(name: str) -> None:
    made = throwaway_name(name)
    assert is_vm_name(made)
    assert made.startswith(name[:20])
    assert throwaway_name(name) != made  # its own each time


def test_the_throwaway_writes_only_its_own_overlays_and_binds_no_fixed_port() -> None:
    machine = Machine(
        name="vm1",
        path=Path("/m/vm1.toml"),
        disks=(
            DiskSpec(file=Path("/img/rw.qcow2")),
            DiskSpec(file=Path("/img/ro.raw"), readonly=True),
            DiskSpec(base=Path("/img/base.qcow2")),
        ),
        nics=(NicSpec(forwards=(PortForward("tcp", "127.0.0.1", 2222, 22),)),),
        supervisor=SupervisorSpec(restart="always"),
    )
    made = throwaway_machine(machine, "vm1-run-abc123")
    assert made.name == "vm1-run-abc123"
    assert made.path == machine.path
    rw, ro, base = made.disks
    assert (rw.file, rw.base) == (None, Path("/img/rw.qcow2"))  # an overlay on it
    assert ro == machine.disks[1]  # read only: shared as it is
    assert base == machine.disks[2]
    assert made.nics[0].forwards[0].host_port == 0
    assert made.nics[0].forwards[0].guest_port == 22
    assert made.supervisor.restart == "no"


def test_a_throwaway_on_a_network_has_its_own_mac_and_address() -> None:
    """Its source may run beside it on the switch: a fixed MAC or a pinned address of the
    definition is not taken over (a user-mode NIC keeps its MAC: nobody else sees it)."""
    machine = Machine(
        name="vm1",
        path=Path("/m/vm1.toml"),
        nics=(
            NicSpec(mac="52:54:00:00:00:01", network="lab", address="10.1.2.3"),
            NicSpec(mac="52:54:00:00:00:02"),
        ),
    )
    on_lab, user = throwaway_machine(machine, "vm1-run-abc123").nics
    assert (on_lab.network, on_lab.mac, on_lab.address) == ("lab", None, None)
    assert user.mac == "52:54:00:00:00:02"


def test_a_signal_outside_a_shield_cancels_at_once() -> None:
    cancellation = Cancellation()
    with pytest.raises(RunCancelled) as raised:
        cancellation.cancel(signal.SIGTERM)
    assert raised.value.signum == signal.SIGTERM


def test_a_signal_inside_a_shield_cancels_when_it_ends() -> None:
    cancellation = Cancellation()
    done = []
    with pytest.raises(RunCancelled) as raised, cancellation.shield():
        cancellation.cancel(signal.SIGINT)
        cancellation.cancel(signal.SIGTERM)  # a second one changes nothing
        done.append("the start went on to its end")
    assert done
    assert raised.value.signum == signal.SIGINT


def test_a_signal_during_the_teardown_never_interrupts_it() -> None:
    cancellation = Cancellation()
    cancellation.tearing_down = True
    cancellation.cancel(signal.SIGTERM)
    with cancellation.shield():
        pass
    assert cancellation.signum == signal.SIGTERM


def test_a_run_that_never_made_its_vm_has_a_record_too() -> None:
    failed = not_run("vm1", None, ["true"], NotRunningError("vm1"), 1.0)
    assert (failed.state, failed.status, failed.name) == ("failed", 1, "")
    assert failed.error is not None and "vm1" in failed.error
    cancelled = not_run("vm1", "vm1@t", ["true"], RunCancelled(signal.SIGTERM), 1.0)
    assert (cancelled.state, cancelled.status) == ("cancelled", 143)
    assert cancelled.error == "cancelled by SIGTERM"
    assert cancelled.to_json()["from"] == "vm1@t"


def test_a_slurm_tasks_empty_state_folder_goes_with_its_throwaway(tmp_path: Path) -> None:
    job = {"SLURM_JOB_ID": "987654321", "SLURM_ARRAY_TASK_ID": str(os.getpid())}
    folder = job_state_dir(job)
    assert folder is not None
    folder.mkdir(parents=True)
    try:
        drop_empty_job_dir(folder, {**job, "QVM_STATE_DIR": str(folder)})  # the user's own
        assert folder.is_dir()
        drop_empty_job_dir(tmp_path, job)  # not the task's folder
        assert tmp_path.is_dir()
        (folder / "other-vm").mkdir()  # something else of the job's is kept, and its folder
        drop_empty_job_dir(folder, job)
        assert folder.is_dir()
        (folder / "other-vm").rmdir()
        drop_empty_job_dir(folder, job)
        assert not folder.exists()
    finally:
        if folder.exists():
            for child in folder.iterdir():
                child.rmdir()
            folder.rmdir()
