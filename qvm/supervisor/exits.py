"""How a QEMU run ended, in words: a pure function of what the supervisor saw.

``classify_exit(ExitFacts) -> ExitVerdict``: QEMU's wait status, what the guest did (the
``SHUTDOWN`` event's reason, a panic), what a qvm command asked (``qvm down``/``kill``),
whether the guest agent was asked to power off and whether a vCPU left this run. The
verdict is whether it failed, the reason ``status`` shows, the state word and
``ended_by`` (``qvm.store.state.ending``'s vocabulary). No I/O, no clock: a table test
(``tests/unit/supervisor/test_supervisor_exit.py``) holds every row.
"""

from __future__ import annotations

import signal

from qvm.base.record import Record
from qvm.store.state import INTENTS, ending

GUEST_POWER_OFF = "the guest powered off"
AGENT_POWER_OFF = "the guest powered off after guest-shutdown (guest agent)"
# signals QEMU dies of by itself (a bug, not someone's request)
CRASH_SIGNALS = ("SIGABRT", "SIGSEGV", "SIGBUS", "SIGFPE", "SIGILL", "SIGTRAP")
# QEMU 7.2 under TCG, after a vCPU unplug: glibc's "double free or corruption" as it
# exits (see docs/qemu-facts or ../shared/qemu-facts.md); the guest had powered off
TCG_UNPLUG_ABORT = "QEMU 7.2 then aborted on exit (a TCG bug after a vCPU unplug)"


class ExitFacts(Record):
    """What the supervisor knows when QEMU has ended."""

    returncode: int  # os.waitstatus_to_exitcode: negative for a signal
    reached_qmp: bool  # QMP answered: QEMU had started
    intent: str | None = None  # what a qvm command asked: "stop", "kill" (INTENTS)
    shutdown_reason: str | None = None  # QEMU's SHUTDOWN event, e.g. "guest-shutdown"
    crash_reason: str | None = None  # a guest panic, an internal error, QMP silent
    agent_shutdown_sent: bool = False  # `qvm down` asked the guest agent to power off
    vcpu_unplugged: bool = False  # a vCPU left during this run
    power_button: bool = False  # QEMU's POWERDOWN event: the ACPI power button was pressed
    tcg: bool = False  # the run used TCG, not KVM


class ExitVerdict(Record):
    failed: bool  # a crash, not an end someone (the guest, a qvm command) asked for
    reason: str
    state: str  # "stopped" or "crashed" (the restart policy may make it "restarting")
    ended_by: str | None  # acpi, agent, quit, kill; None when no qvm command ended it
    code: int | None  # QEMU's exit code; None when a signal ended it
    signal: str | None  # e.g. "SIGABRT"


def signal_name(number: int) -> str:
    try:
        return signal.Signals(number).name
    except ValueError:
        return f"signal {number}"


def classify_exit(facts: ExitFacts) -> ExitVerdict:
    failed, reason = _failed_and_reason(facts)
    code = facts.returncode if facts.returncode >= 0 else None
    sig = signal_name(-facts.returncode) if facts.returncode < 0 else None
    noted = "agent" if reason.startswith(AGENT_POWER_OFF) else facts.intent
    return ExitVerdict(
        failed=failed,
        reason=reason,
        state="crashed" if failed else "stopped",
        ended_by=ending(noted, sig, reason),
        code=code,
        signal=sig,
    )


def _guest_power_off(facts: ExitFacts) -> str:
    return AGENT_POWER_OFF if facts.agent_shutdown_sent else GUEST_POWER_OFF


def _failed_and_reason(facts: ExitFacts) -> tuple[bool, str]:
    deliberate = facts.intent in INTENTS
    if facts.crash_reason:
        return True, facts.crash_reason
    if facts.returncode < 0:
        name = signal_name(-facts.returncode)
        if facts.shutdown_reason == "guest-shutdown" and name in CRASH_SIGNALS:
            # the guest had ended cleanly (its SHUTDOWN came first): say so, and what QEMU
            # did after; not a failure of the VM, so no restart "on-failure" either
            if facts.vcpu_unplugged and facts.tcg:
                if name == "SIGABRT":
                    return False, f"{_guest_power_off(facts)}; {TCG_UNPLUG_ABORT}"
                # seen as SIGSEGV when the guest's power-off pauses QEMU (set-action)
                return False, (
                    f"{_guest_power_off(facts)}; QEMU 7.2 then died of {name} on exit "
                    "(likely the TCG bug after a vCPU unplug)"
                )
            return False, f"{_guest_power_off(facts)}; QEMU then died of {name} on exit"
        if name == "SIGABRT" and facts.power_button and facts.vcpu_unplugged and facts.tcg:
            # measured (3 of 6 downs after cpu add + cpu del): the guest powers off after
            # the button, and QEMU aborts before its SHUTDOWN event reaches any monitor
            return False, f"{GUEST_POWER_OFF}; {TCG_UNPLUG_ABORT}"
        if deliberate:
            return False, f"killed by {name} (qvm {facts.intent})"
        return True, f"killed by {name}"
    if facts.returncode > 0:
        if not facts.reached_qmp:
            return True, f"QEMU exited with code {facts.returncode} while starting"
        return (not deliberate), f"QEMU exited with code {facts.returncode}"
    reason = facts.shutdown_reason
    if reason == "guest-shutdown":
        return False, _guest_power_off(facts)
    if reason == "host-qmp-quit":
        return False, "quit over QMP"
    if reason == "host-signal":
        return False, "QEMU stopped by a signal"
    if reason == "guest-panic":
        return True, "guest panic"
    return False, f"QEMU exited ({reason})" if reason else "QEMU exited"
