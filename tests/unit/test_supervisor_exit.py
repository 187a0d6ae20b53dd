"""How the supervisor names the end of a QEMU run, and which ends are failures."""

from __future__ import annotations

from pathlib import Path

import pytest

from qvm.layout.rundir import RunDir
from qvm.store.launch import LaunchRecord
from qvm.supervisor.facts import qemu_log_tail
from qvm.supervisor.process import Supervisor


def supervisor(tmp_path: Path) -> Supervisor:
    launch = LaunchRecord.from_json({"name": "vm1", "argv": ["qemu"]}, "launch.json")
    return Supervisor(RunDir(tmp_path), launch, ready_fd=None)


@pytest.mark.parametrize(
    ("returncode", "intent", "shutdown", "crash", "expected"),
    [
        (0, None, {"reason": "guest-shutdown"}, None, (False, "the guest powered off")),
        (0, "stop", {"reason": "host-qmp-quit"}, None, (False, "quit over QMP")),
        (0, None, {"reason": "host-signal"}, None, (False, "QEMU stopped by a signal")),
        (-9, None, None, None, (True, "killed by SIGKILL")),
        (-9, "kill", None, None, (False, "killed by SIGKILL (qvm kill)")),
        (-6, None, None, None, (True, "killed by SIGABRT")),
        (1, None, None, None, (True, "QEMU exited with code 1")),
        (1, None, None, "guest panic", (True, "guest panic")),
        (0, None, None, None, (False, "QEMU exited")),
    ],
)
def test_classify_exit(
    tmp_path: Path,
    returncode: int,
    intent: str | None,
    shutdown: dict | None,
    crash: str | None,
    expected: tuple[bool, str],
) -> None:
    sup = supervisor(tmp_path)
    sup.intent, sup.shutdown_event, sup.crash_reason = intent, shutdown, crash
    assert sup._classify_exit(returncode, reached_qmp=True) == expected


def test_dying_before_qmp_is_a_start_failure(tmp_path: Path) -> None:
    assert supervisor(tmp_path)._classify_exit(1, reached_qmp=False) == (
        True,
        "QEMU exited with code 1 while starting",
    )


def test_log_tail_is_only_the_latest_run(tmp_path: Path) -> None:
    log = tmp_path / "qemu.log"
    log.write_text(
        "=== qvm: QEMU start at 2026-01-01 00:00:00 ===\nold error\n"
        "=== qvm: QEMU start at 2026-01-01 00:01:00 ===\nnew warning\nnew error\n"
    )
    assert qemu_log_tail(log) == ["new warning", "new error"]
