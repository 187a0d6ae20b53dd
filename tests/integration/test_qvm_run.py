"""`qvm run` against the real test guest: the program's argv, output and status come
through, and the throwaway VM is gone afterwards on every way out (its end, --timeout,
SIGTERM), no process and no run dir left. One template snapshot serves the runs that
resume from it (``--from``); one run boots cold."""

from __future__ import annotations

import json
import signal
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from framework.harness import GUEST_DIR, Qvm, owned_qvm
from framework.jsonschema_lite import validate
from framework.wait import wait_until

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def vm() -> Iterator[Qvm]:
    """A definition vm1 with a snapshot `ready` (its agent answering), the VM killed."""
    if not (GUEST_DIR / "vmlinuz").exists():
        pytest.fail(f"no test guest in {GUEST_DIR} (run scripts/build-test-guest)")
    with owned_qvm() as harness:
        harness.guest_machine("vm1", max=1)
        harness("up", "vm1")
        harness("wait", "vm1", "--for", "agent", "--timeout", "120")
        harness("snapshot", "save", "vm1", "ready")
        harness("kill", "vm1")
        yield harness


def throwaways(qvm: Qvm) -> list[str]:
    """The run dirs of throwaway VMs left in the state dir."""
    return sorted(p.name for p in qvm.state_dir.iterdir() if "-run-" in p.name)


def assert_gone(qvm: Qvm) -> None:
    assert throwaways(qvm) == []
    assert not [cmd for _, cmd in qvm.processes() if "-run-" in cmd]


def test_a_cold_run_passes_argv_output_and_status_through(vm: Qvm) -> None:
    script = 'printf "%s|" "$@"; echo; echo to-stderr >&2; exit 3'
    done = vm.run_bytes("run", "vm1", "--", "sh", "-c", script, "sh", "a b", "it's", '"q"', "")
    assert done.returncode == 3, done.stderr
    assert done.stdout == b'a b|it\'s|"q"||\n'
    assert done.stderr == b"to-stderr\n"
    assert_gone(vm)


def test_runs_from_a_snapshot_at_once_each_in_its_own_vm(vm: Qvm) -> None:
    with (
        vm.background("run", "vm1", "--from", "vm1@ready", "--json", "--", "hostname") as one,
        vm.background("run", "vm1", "--from", "vm1@ready", "--json", "--", "false") as two,
    ):
        outputs = [p.communicate(timeout=120) for p in (one, two)]
    results: list[dict[str, Any]] = [json.loads(out) for out, _ in outputs]
    for result in results:
        validate(result, "run.json")
        assert result["from"] == "vm1@ready"
        assert result["state"] == "exited"
        assert set(result["phases"]) == {"restore", "agent_ready", "command", "teardown"}
    assert (one.returncode, two.returncode) == (0, 1)
    assert [r["exit_code"] for r in results] == [0, 1]
    assert results[0]["name"] != results[1]["name"]
    # the guest resumed the template's memory: it calls itself what the template did
    assert results[0]["stdout"].strip()
    assert_gone(vm)


def test_a_timeout_ends_the_run_with_124_and_no_vm(vm: Qvm) -> None:
    result_file = vm.root / "timeout.json"
    done = vm(
        "run", "vm1", "--from", "vm1@ready", "--timeout", "4", "--result", str(result_file),
        "--", "sleep", "60", check=False,
    )  # fmt: skip
    assert done.returncode == 124, done.stderr
    result = json.loads(result_file.read_text())
    assert (result["state"], result["status"], result["exit_code"]) == ("timeout", 124, None)
    assert_gone(vm)


def test_sigterm_mid_run_cancels_it_and_destroys_the_vm(vm: Qvm) -> None:
    result_file = vm.root / "cancelled.json"
    marker = "qvm-run-test-sleeping"
    with vm.background(
        "run", "vm1", "--from", "vm1@ready", "--result", str(result_file),
        "--", "sh", "-c", f"echo {marker} > /dev/ttyS0; sleep 60",
    ) as running:  # fmt: skip
        # the guest itself says the command runs: its line on the throwaway's console
        wait_until(lambda: _console_says(vm, marker), 60, "the command to run in the guest")
        running.send_signal(signal.SIGTERM)
        _, stderr = running.communicate(timeout=60)
    assert running.returncode == 143, stderr
    assert "cancelled by SIGTERM" in stderr
    result = json.loads(result_file.read_text())
    validate(result, "run.json")
    assert result["state"] == "cancelled"
    assert result["phases"]["teardown"] is not None
    assert_gone(vm)


def _console_says(vm: Qvm, text: str) -> bool:
    for name in throwaways(vm):
        log = Path(vm.state_dir / name / "serial.log")
        if log.exists() and text in log.read_text(errors="replace"):
            return True
    return False


def test_a_program_the_guest_does_not_have_is_127(vm: Qvm) -> None:
    done = vm("run", "vm1", "--from", "vm1@ready", "--", "no-such-program", check=False)
    assert done.returncode == 127, done.stderr
    assert_gone(vm)
