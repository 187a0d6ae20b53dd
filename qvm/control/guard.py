"""The TCG guard: under TCG, after a vCPU unplug, QEMU 7.2 crashes on the next vCPU
``device_add`` (double free, SIGABRT), and usually dies (SIGSEGV) within about 3 s of a
``device_add`` of a DIMM, disk or NIC that it had accepted (9 of 11 tries, pc and q35).
Every ``device_add`` qvm sends goes through ``check_device_add``.
"""

from __future__ import annotations

from collections.abc import Sequence

from qvm.errors import HotplugError
from qvm.layout.rundir import RunDir
from qvm.store.launch import LaunchRecord
from qvm.store.unplugged import cpu_unplugged_this_run, record_cpu_unplug

# --- the TCG guard ---------------------------------------------------------------------


def unplug_requested_this_run(run: RunDir) -> bool:
    """True if a vCPU unplug was requested (by qvm) or seen (by the supervisor, whoever
    asked) in the current QEMU run (see the TCG crash)."""
    return cpu_unplugged_this_run(run)


def record_cpu_unplug_request(run: RunDir, ids: Sequence[str]) -> None:
    """qvm asks for an unplug: recorded before the request, as QEMU may crash at the
    next device_add whether or not the guest lets the vCPU go."""
    record_cpu_unplug(run, ids)


def tcg_unplug_refusal(run: RunDir, launch: LaunchRecord, action: str = "cpu add") -> str | None:
    """Why a ``device_add`` for ``action`` must not be tried now, or None."""
    if launch.accel != "tcg" or not unplug_requested_this_run(run):
        return None
    crash = (
        "crashes (double free) on the next vCPU device_add"
        if action.startswith("cpu ")
        # measured: the device_add returns, then QEMU dies (SIGSEGV) within about 3 s, in 9
        # of 11 tries with a DIMM, disk or NIC on pc and q35
        else "usually crashes soon after the next device_add of any device, not only of a vCPU"
    )
    return (
        f"{run.name}: {action} refused: a vCPU was unplugged earlier in this QEMU run, and "
        f"under TCG QEMU 7.2 {crash} "
        f"(hint: qvm restart {run.name} first, or pass --force to try anyway)"
    )


def check_device_add(run: RunDir, launch: LaunchRecord, action: str, force: bool) -> bool:
    """Raise unless a ``device_add`` is safe (or forced); True when it was forced."""
    refusal = tcg_unplug_refusal(run, launch, action)
    if refusal and not force:
        raise HotplugError(refusal)
    return bool(refusal)
