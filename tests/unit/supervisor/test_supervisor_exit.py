"""How the supervisor names the end of a QEMU run (``qvm.supervisor.exits``), and which
ends are failures: one row per way a run ends."""

from __future__ import annotations

from pathlib import Path

import pytest
from framework.fake_qmp import launch_record

from qvm.layout.rundir import RunDir
from qvm.store.fields import Fields
from qvm.store.state import ExitRecord
from qvm.supervisor.exits import ExitFacts, ExitVerdict, classify_exit
from qvm.supervisor.facts import qemu_log_tail
from qvm.supervisor.process import Supervisor

GUEST_OFF = "guest-shutdown"
OFF = "the guest powered off"
STOP = {"intent": "stop"}
TCG_ABORT = "the guest powered off; QEMU 7.2 then aborted on exit (a TCG bug after a vCPU unplug)"
AFTER_UNPLUG = {"vcpu_unplugged": True, "tcg": True}

# (QEMU's wait status, the facts besides it) -> (failed, reason, state, ended_by, signal)
TABLE: list[tuple[int, dict[str, object], tuple[bool, str, str, str | None, str | None]]] = [
    # the guest ended it
    (0, {"shutdown_reason": GUEST_OFF}, (False, OFF, "stopped", None, None)),
    (0, {"shutdown_reason": "guest-panic"}, (True, "guest panic", "crashed", None, None)),
    (
        0,
        {"shutdown_reason": "guest-reset"},
        (False, "QEMU exited (guest-reset)", "stopped", None, None),
    ),
    (1, {"crash_reason": "guest panic"}, (True, "guest panic", "crashed", None, None)),
    # a qvm command ended it: down (power button, agent, quit, SIGKILL), kill
    (0, {**STOP, "shutdown_reason": GUEST_OFF}, (False, OFF, "stopped", "acpi", None)),
    (
        0,
        {**STOP, "shutdown_reason": GUEST_OFF, "agent_shutdown_sent": True},
        (
            False,
            "the guest powered off after guest-shutdown (guest agent)",
            "stopped",
            "agent",
            None,
        ),
    ),
    (
        0,
        {**STOP, "shutdown_reason": "host-qmp-quit"},
        (False, "quit over QMP", "stopped", "quit", None),
    ),
    (-9, {"intent": "stop"}, (False, "killed by SIGKILL (qvm stop)", "stopped", "kill", "SIGKILL")),
    (-9, {"intent": "kill"}, (False, "killed by SIGKILL (qvm kill)", "stopped", "kill", "SIGKILL")),
    (1, {"intent": "stop"}, (False, "QEMU exited with code 1", "stopped", None, None)),
    # someone else ended it
    (0, {"shutdown_reason": "host-qmp-quit"}, (False, "quit over QMP", "stopped", None, None)),
    (
        0,
        {"shutdown_reason": "host-signal"},
        (False, "QEMU stopped by a signal", "stopped", None, None),
    ),
    (0, {}, (False, "QEMU exited", "stopped", None, None)),
    (-9, {}, (True, "killed by SIGKILL", "crashed", None, "SIGKILL")),
    (-15, {}, (True, "killed by SIGTERM", "crashed", None, "SIGTERM")),
    (1, {}, (True, "QEMU exited with code 1", "crashed", None, None)),
    (
        1,
        {"reached_qmp": False},
        (True, "QEMU exited with code 1 while starting", "crashed", None, None),
    ),
    (
        -9,
        {"crash_reason": "KVM internal error (see qvm logs --qemu)"},
        (True, "KVM internal error (see qvm logs --qemu)", "crashed", None, "SIGKILL"),
    ),
    # QEMU crashed by itself
    (-6, {}, (True, "killed by SIGABRT", "crashed", None, "SIGABRT")),
    (-6, AFTER_UNPLUG, (True, "killed by SIGABRT", "crashed", None, "SIGABRT")),
    (
        -11,
        {"shutdown_reason": "host-qmp-quit"},
        (True, "killed by SIGSEGV", "crashed", None, "SIGSEGV"),
    ),
    # QEMU 7.2 aborting at exit after the guest powered off (qemu-facts.md): the guest's
    # end is what happened, and ended_by says how it was asked to
    (
        -6,
        {"shutdown_reason": GUEST_OFF, **AFTER_UNPLUG},
        (False, TCG_ABORT, "stopped", None, "SIGABRT"),
    ),
    (
        -6,
        {**STOP, "shutdown_reason": GUEST_OFF, **AFTER_UNPLUG},
        (False, TCG_ABORT, "stopped", "acpi", "SIGABRT"),
    ),
    (
        -6,
        {**STOP, "shutdown_reason": GUEST_OFF, "agent_shutdown_sent": True, **AFTER_UNPLUG},
        (
            False,
            "the guest powered off after guest-shutdown (guest agent); QEMU 7.2 then aborted "
            "on exit (a TCG bug after a vCPU unplug)",
            "stopped",
            "agent",
            "SIGABRT",
        ),
    ),
    # the same abort without a vCPU unplug, or under KVM: not blamed on that bug
    (
        -6,
        {"shutdown_reason": GUEST_OFF},
        (False, OFF + "; QEMU then died of SIGABRT on exit", "stopped", None, "SIGABRT"),
    ),
    (
        -6,
        {**STOP, "shutdown_reason": GUEST_OFF, "vcpu_unplugged": True},
        (False, OFF + "; QEMU then died of SIGABRT on exit", "stopped", "acpi", "SIGABRT"),
    ),
    (
        -11,
        {"shutdown_reason": GUEST_OFF, **AFTER_UNPLUG},
        (
            False,
            OFF + "; QEMU 7.2 then died of SIGSEGV on exit (likely the TCG bug after a vCPU "
            "unplug)",
            "stopped",
            None,
            "SIGSEGV",
        ),
    ),
    (
        -11,
        {"shutdown_reason": GUEST_OFF},
        (False, OFF + "; QEMU then died of SIGSEGV on exit", "stopped", None, "SIGSEGV"),
    ),
    # the same abort as measured: QEMU's SHUTDOWN event is lost, the power button was
    # pressed (POWERDOWN) after a vCPU unplug under TCG
    (
        -6,
        {**STOP, "power_button": True, **AFTER_UNPLUG},
        (False, TCG_ABORT, "stopped", "acpi", "SIGABRT"),
    ),
    (-6, {"power_button": True, **AFTER_UNPLUG}, (False, TCG_ABORT, "stopped", None, "SIGABRT")),
    # ... but not without the unplug, under KVM, or before the button
    (
        -6,
        {**STOP, "power_button": True},
        (False, "killed by SIGABRT (qvm stop)", "stopped", None, "SIGABRT"),
    ),
    (
        -6,
        {"power_button": True, "vcpu_unplugged": True},
        (True, "killed by SIGABRT", "crashed", None, "SIGABRT"),
    ),
    (
        -6,
        {**STOP, **AFTER_UNPLUG},
        (False, "killed by SIGABRT (qvm stop)", "stopped", None, "SIGABRT"),
    ),
    (
        -9,
        {**STOP, "power_button": True, **AFTER_UNPLUG},
        (False, "killed by SIGKILL (qvm stop)", "stopped", "kill", "SIGKILL"),
    ),
    # SIGKILL after the guest's power-off is someone's kill, not a crash on exit
    (
        -9,
        {"intent": "kill", "shutdown_reason": GUEST_OFF},
        (False, "killed by SIGKILL (qvm kill)", "stopped", "kill", "SIGKILL"),
    ),
]


@pytest.mark.parametrize(("returncode", "facts", "expected"), TABLE)
def test_classify_exit(
    returncode: int,
    facts: dict[str, object],
    expected: tuple[bool, str, str, str | None, str | None],
) -> None:
    given = {"reached_qmp": True, **facts}
    verdict = classify_exit(ExitFacts(returncode, **given))
    failed, reason, state, ended_by, sig = expected
    code = returncode if returncode >= 0 else None
    assert verdict == ExitVerdict(failed, reason, state, ended_by, code, sig)


def test_ended_by_reads_back_the_same_from_the_exit_record() -> None:
    """The verdict's ended_by is the word status reads from state.json, not the intent."""
    facts = ExitFacts(-6, True, "stop", GUEST_OFF, vcpu_unplugged=True, tcg=True)
    verdict = classify_exit(facts)
    record = ExitRecord(None, verdict.signal, verdict.reason, verdict.failed, 1.0, None, "stop")
    read = ExitRecord.read(Fields(record.to_json(), "state.json: exit"))
    assert read.ended_by == verdict.ended_by == "acpi"


def test_the_supervisor_hands_what_it_saw_to_the_classification(tmp_path: Path) -> None:
    sup = Supervisor(RunDir(tmp_path), launch_record(accel="tcg"), ready_fd=None)
    sup.intent, sup.shutdown_event, sup.vcpu_unplugged = "stop", {"reason": GUEST_OFF}, True
    sup.power_button = True
    assert sup.exit_facts(-6, reached_qmp=True) == ExitFacts(
        -6, True, "stop", GUEST_OFF, vcpu_unplugged=True, power_button=True, tcg=True
    )


def test_log_tail_is_only_the_latest_run(tmp_path: Path) -> None:
    log = tmp_path / "qemu.log"
    log.write_text(
        "=== qvm: QEMU start at 2026-01-01 00:00:00 ===\nold error\n"
        "=== qvm: QEMU start at 2026-01-01 00:01:00 ===\nnew warning\nnew error\n"
    )
    assert qemu_log_tail(log) == ["new warning", "new error"]
