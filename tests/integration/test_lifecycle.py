"""Lifecycle with the real QEMU and the real test guest: what the guest itself reports."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import time
from pathlib import Path

import pytest
from framework.guest import parse_guest_lines
from framework.harness import QVM_BIN, Qvm
from framework.wait import wait_until

pytestmark = pytest.mark.integration


def qmp_call(socket_path: str, command: str) -> dict:
    """One command over a QMP socket with qemu.qmp, as a user's own script would."""
    import asyncio

    from qemu.qmp import QMPClient

    async def run() -> dict:
        client = QMPClient("test")
        await client.connect(socket_path)
        try:
            return await asyncio.wait_for(client.execute(command), 5)
        finally:
            await client.disconnect()

    return asyncio.run(run())


def test_up_status_down_by_acpi(qvm: Qvm) -> None:
    qvm.guest_machine("vm1")
    up = qvm("up", "vm1")
    assert "vm1: running, pid" in up.stdout
    assert "accel       tcg" in up.stdout or "accel       kvm" in up.stdout

    status = qvm.status("vm1")
    for key in ("name", "state", "pid", "qmp_socket", "serial_log", "accel", "vcpus"):
        assert key in status
    assert status["state"] == "running"
    assert status["vcpus"] == {"present": 1, "max": 4, "boot": 1}
    # QMP is ready when `up` returns, on the user's own socket, while qvm manages the VM
    assert qmp_call(status["qmp_socket"], "query-status")["status"] == "running"

    guest = qvm.serial("vm1").wait_ready()
    assert guest["ncpus"] == "1"
    assert 200_000 < int(guest["mem_kb"]) < 262_144

    down = qvm("down", "vm1", "--timeout", "20")
    assert down.stdout.strip() == (
        "vm1: stopped: the guest powered off after the ACPI power button"
    )
    # the guest itself saw the power button and shut down
    assert qvm.serial("vm1").guest().powered_off
    after = qvm.status("vm1")
    assert after["state"] == "stopped"
    assert after["reason"] == "the guest powered off"
    assert after["pid"] is None
    assert not qvm.processes()


def test_up_on_a_running_vm_says_so_and_holds_none_of_the_callers_files(qvm: Qvm) -> None:
    qvm.guest_machine("vm1")
    # a descriptor the caller passed down (`flock LOCK qvm up`, a CI runner's pipe) must
    # not be held by the supervisor for the VM's whole life
    read_end, write_end = os.pipe()
    try:
        first = subprocess.run(
            [str(QVM_BIN), "up", "vm1", "--json"],
            capture_output=True,
            text=True,
            timeout=120,
            env=qvm.env(),
            cwd=qvm.root,
            pass_fds=(write_end,),
            check=True,
        )
        qvm.started.add("vm1")
        os.close(write_end)
        os.set_blocking(read_end, False)
        assert os.read(read_end, 1) == b""  # EOF: nobody holds the write end any more
    finally:
        os.close(read_end)
        with contextlib.suppress(OSError):
            os.close(write_end)
    pid = json.loads(first.stdout)[0]["pid"]
    again = qvm("up", "vm1")
    assert again.stdout.strip() == f"vm1: already running (pid {pid})"
    assert again.returncode == 0


def test_concurrent_up_starts_exactly_one_qemu_and_each_prints_its_pid(qvm: Qvm) -> None:
    qvm.guest_machine("vm1")
    qvm.started.add("vm1")
    # half of them in JSON, half in text: both forms must name the QEMU that runs
    procs = [
        subprocess.Popen(
            [str(QVM_BIN), "up", "vm1", *(["--json"] if i % 2 else [])],
            env=qvm.env(),
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for i in range(6)
    ]
    outputs = [p.communicate(timeout=60) for p in procs]
    assert [p.returncode for p in procs] == [0] * 6, outputs
    qemus = [(pid, cmd) for pid, cmd in qvm.processes() if "qemu-system" in cmd]
    assert len(qemus) == 1, qemus
    qemu_pid = qemus[0][0]
    assert qvm.status("vm1")["pid"] == qemu_pid
    results = [json.loads(out)[0] for out, _ in outputs[1::2]]
    assert {r["pid"] for r in results} == {qemu_pid}
    texts = [out.splitlines()[0] for out, _ in outputs[0::2]]
    started = [r for r in results if not r["already_running"]]
    started += [t for t in texts if t.startswith("vm1: running")]
    assert len(started) == 1, outputs
    for line in texts:
        assert line in (f"vm1: running, pid {qemu_pid}", f"vm1: already running (pid {qemu_pid})")


def test_qemu_killed_with_sigkill_is_reported_as_crashed(qvm: Qvm) -> None:
    qvm.guest_machine("vm1")
    qvm("up", "vm1")
    pid = qvm.status("vm1")["pid"]
    os.kill(pid, signal.SIGKILL)
    status = qvm.wait_state("vm1", "crashed", 10)
    assert status["reason"] == "killed by SIGKILL"
    assert status["last_exit"]["signal"] == "SIGKILL"
    assert status["pid"] is None
    assert "crashed (killed by SIGKILL)" in qvm("status", "vm1").stdout


def test_on_failure_restarts_a_killed_qemu_with_a_new_one(qvm: Qvm) -> None:
    qvm.guest_machine("vm1", extra='[supervisor]\nrestart = "on-failure"\nrestart_delay = 0.2\n')
    qvm("up", "vm1")
    qvm.serial("vm1").wait_ready()
    first_pid = qvm.status("vm1")["pid"]
    os.kill(first_pid, signal.SIGKILL)

    def restarted() -> dict | None:
        s = qvm.status("vm1")
        return s if s["state"] == "running" and s["pid"] not in (None, first_pid) else None

    status = wait_until(restarted, 20, "a new QEMU")
    assert status["restarts"] == 1
    assert status["last_exit"]["reason"] == "killed by SIGKILL"
    # the new QEMU booted the guest again: its serial log starts fresh... in the same file
    qvm.serial("vm1").wait_boots(2, 60)


def test_guest_power_off_is_not_a_failure_for_on_failure(qvm: Qvm) -> None:
    qvm.guest_machine("vm1", extra='[supervisor]\nrestart = "on-failure"\nrestart_delay = 0.2\n')
    qvm("up", "vm1")
    qvm.serial("vm1").wait_ready()
    # the guest is told to power off from outside qvm, through the user's QMP socket
    qmp_call(str(qvm.run_dir("vm1") / "qmp.sock"), "system_powerdown")
    status = qvm.wait_state("vm1", "stopped", 20)
    assert status["reason"] == "the guest powered off"
    time.sleep(1)  # longer than the restart delay: no new QEMU came
    assert qvm.status("vm1")["state"] == "stopped"
    assert not qvm.processes()


def test_killed_supervisor_leaves_state_that_the_next_up_cleans(qvm: Qvm) -> None:
    qvm.guest_machine("vm1")
    qvm("up", "vm1")
    before = qvm.status("vm1")
    os.kill(before["supervisor_pid"], signal.SIGKILL)
    # QEMU follows its supervisor (parent-death signal), and status says what happened
    status = qvm.wait_state("vm1", "crashed", 15)
    assert status["reason"] == (
        f"supervisor (pid {before['supervisor_pid']}) ended without its last record "
        "(killed, or the state dir refused the write; see supervisor.log)"
    )
    wait_until(lambda: not qvm.processes(), 10, "QEMU to follow its supervisor")
    assert not (qvm.run_dir("vm1") / "qmp.sock").exists()  # stale sockets were cleaned
    qvm("up", "vm1")
    assert qvm.status("vm1")["state"] == "running"


def refused_before_start(qvm: Qvm, old: str, new: str) -> tuple[Path, str]:
    """`qvm up vm1` of the test guest's machine file, ``old`` in it replaced by ``new``,
    fails and leaves no process and no state behind: the file, and what `up` said."""
    path = qvm.guest_machine("vm1")
    path.write_text(path.read_text().replace(old, new))
    result = qvm("up", "vm1", check=False)
    assert result.returncode == 2  # a broken definition, as its JSON error says
    assert not qvm.processes()
    assert not (qvm.run_dir("vm1") / "state.json").exists()
    return path, result.stderr


def test_down_while_the_guest_boots_presses_the_power_button_again(qvm: Qvm) -> None:
    """The test guest only handles the power button once its acpid runs (about 3 s into
    its boot under TCG): a single press at once would be lost, and `down` would end QEMU
    by `quit` after its timeout."""
    qvm.guest_machine("vm1")
    qvm("up", "vm1")
    assert not qvm.serial("vm1").guest().ready
    down = qvm("down", "vm1", "--timeout", "40")
    assert down.stdout.strip() == (
        "vm1: stopped: the guest powered off after the ACPI power button"
    )
    assert qvm.serial("vm1").guest().powered_off


def test_unknown_cpu_model_is_refused_before_anything_starts(qvm: Qvm) -> None:
    path, stderr = refused_before_start(qvm, "[cpu]", '[cpu]\nmodel = "IvyBrige"')
    assert stderr == (
        f'qvm: {path}: cpu.model: unknown to qemu-system-x86_64, got "IvyBrige" '
        "(hint: did you mean 'IvyBridge', 'IvyBridge-v2', 'IvyBridge-v1'? "
        "'qemu-system-x86_64 -cpu help' lists them)\n"
    )


def test_qemu_dying_at_start_reports_exit_code_and_stderr(qvm: Qvm) -> None:
    qvm.guest_machine("vm1", extra='[qemu]\nextra_args = ["-device", "no-such-device"]\n')
    result = qvm("up", "vm1", check=False)
    assert result.returncode == 1
    lines = result.stderr.splitlines()
    assert lines[0] == "qvm: vm1: QEMU failed to start: QEMU exited with code 1 while starting"
    assert any("'no-such-device' is not a valid device model name" in line for line in lines)
    assert "Traceback" not in result.stderr
    assert not qvm.processes()
    status = qvm.status("vm1")
    assert status["state"] == "crashed"


def test_status_of_a_sigstopped_qemu_answers_quickly(qvm: Qvm) -> None:
    qvm.guest_machine("vm1")
    qvm("up", "vm1")
    pid = qvm.status("vm1")["pid"]
    os.kill(pid, signal.SIGSTOP)
    try:
        wait_until(lambda: Path(f"/proc/{pid}/stat").read_text().split()[2] == "T", 5, "T")
        started = time.monotonic()
        status = qvm.status("vm1")  # from the records and /proc: at once
        elapsed = time.monotonic() - started
        live = qvm.json("status", "vm1", "--live")  # asked: QMP's timeout
    finally:
        os.kill(pid, signal.SIGCONT)
    assert elapsed < 1
    assert status["state"] == live["state"] == "running"
    assert status["error"] == (
        f"vm1: QEMU (pid {pid}) is stopped, e.g. by SIGSTOP: it answers nothing until "
        f"'kill -CONT {pid}' resumes it"
    )
    assert live["error"] == (
        f"QEMU did not answer QMP within 2 s (its process {pid} is stopped, "
        f"e.g. by SIGSTOP: 'kill -CONT {pid}' resumes it)"
    )


def test_list_shows_every_machine_and_survives_a_broken_one(qvm: Qvm) -> None:
    qvm.guest_machine("good")
    qvm.machine("broken", "[cpu]\ncount = 'two'\n")
    qvm.machine("idle", "[cpu]\ncount = 1\n")
    qvm("up", "good")
    records = {r["name"]: r for r in qvm.json("list")}
    assert records["good"]["state"] == "running"
    assert records["idle"]["state"] == "stopped"
    assert records["broken"]["state"] == "invalid"
    assert 'cpu.count: must be an integer, got "two"' in records["broken"]["error"]
    table = qvm("list").stdout
    assert table.splitlines()[0].split() == [
        "NAME", "STATE", "PID", "ACCEL", "VCPUS", "MEMORY", "UPTIME", "NOTE",
    ]  # fmt: skip


def test_console_and_logs(qvm: Qvm) -> None:
    qvm.guest_machine("vm1")
    qvm("up", "vm1")
    qvm.serial("vm1").wait_ready()
    # piped input: the command reaches the guest's shell, its answer comes back
    console = subprocess.Popen(
        [str(QVM_BIN), "console", "vm1"],
        env=qvm.env(),
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    assert console.stdin is not None
    console.stdin.write(b"echo qvm-$((6*7))-console\n")
    console.stdin.flush()
    qvm.serial("vm1").wait_for(r"qvm-42-console", 20)
    console.stdin.write(b"\x1d")  # Ctrl-]: detach
    console.stdin.close()
    console.wait(timeout=10)
    assert console.returncode == 0
    assert "qvm-42-console" in qvm("logs", "vm1").stdout
    assert "=== qvm: QEMU start at" in qvm("logs", "vm1", "--qemu").stdout
    assert qvm.status("vm1")["state"] == "running"


def test_kill_and_restart(qvm: Qvm) -> None:
    forward = '[[nic]]\nmode = "user"\nforwards = ["tcp:0:22"]\n'
    qvm.guest_machine("vm1", extra=f'[supervisor]\nrestart = "always"\n\n{forward}')
    qvm("up", "vm1")
    first = qvm.status("vm1")["pid"]
    said = qvm("restart", "vm1", "--timeout", "20").stdout
    second = qvm.status("vm1")
    assert second["state"] == "running" and second["pid"] != first
    # what `up` says, above all the host port QEMU picked anew for port 0
    port = second["forwards"][0]["host_port"]
    assert f"  forward     tcp:127.0.0.1:{port} -> guest port 22 (net0)\n" in said, said
    assert "  serial log  " in said, said
    killed = qvm("kill", "vm1")
    assert killed.stdout.strip() == "vm1: killed: QEMU was killed (SIGKILL)"
    status = qvm.status("vm1")
    # a kill asked for is not a failure, so "always" does not bring it back
    assert status["state"] == "stopped"
    assert status["reason"] == "killed by SIGKILL (qvm kill)"
    assert not qvm.processes()
    result = qvm("down", "vm1", check=False)
    assert result.returncode == 1
    assert result.stderr == "qvm: vm1: not running (hint: start it with 'qvm up vm1')\n"


def test_restart_policy_gives_up_after_max_restarts(qvm: Qvm) -> None:
    qvm.guest_machine(
        "vm1",
        extra='[supervisor]\nrestart = "on-failure"\nmax_restarts = 2\nrestart_delay = 0.1\n',
    )
    qvm("up", "vm1")
    pids = []
    for expected_restarts in (1, 2):
        pid = qvm.status("vm1")["pid"]
        pids.append(pid)
        os.kill(pid, signal.SIGKILL)

        def restarted(n: int = expected_restarts) -> dict | None:
            s = qvm.status("vm1")
            return s if s["state"] == "running" and s["restarts"] == n else None

        wait_until(restarted, 20, f"restart number {expected_restarts}")
    os.kill(qvm.status("vm1")["pid"], signal.SIGKILL)
    status = qvm.wait_state("vm1", "crashed", 20)
    assert status["reason"] == "killed by SIGKILL; not restarted: 2 restarts in a row"
    assert status["restarts"] == 2
    # the supervisor writes its last record, then cleans up and exits
    wait_until(lambda: not qvm.processes(), 5, "the supervisor to exit")


def test_logs_follow_ends_with_the_vm(qvm: Qvm) -> None:
    qvm.guest_machine("vm1")
    qvm("up", "vm1")
    qvm.serial("vm1").wait_ready()
    follower = subprocess.Popen(
        [str(QVM_BIN), "logs", "vm1", "--follow"],
        env=qvm.env(),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    qvm("down", "vm1")
    out, _ = follower.communicate(timeout=15)
    assert follower.returncode == 0
    guest = parse_guest_lines(out)
    assert guest.ready
    assert guest.powered_off  # printed after `logs -f` started: it followed


def test_microvm_boots_the_test_guest(qvm: Qvm) -> None:
    # microvm's stock-kernel boot under TCG can hang in timer calibration; telling the
    # kernel the TSC frequency avoids it (see docs/machines.md, machine types)
    with open("/proc/cpuinfo") as cpuinfo:
        mhz = next(float(line.split(":")[1]) for line in cpuinfo if line.startswith("cpu MHz"))
    qvm.machine(
        "micro",
        f"""
[machine]
type = "microvm"

[memory]
size = "256M"

[boot]
kernel = "{{guest}}/vmlinuz"
initrd = "{{guest}}/initrd.img"
append = "console=ttyS0 quiet tsc_early_khz={int(mhz * 1000)}"
""",
    )
    qvm("up", "micro")
    assert qvm.serial("micro").wait_ready()["ncpus"] == "1"
    assert qvm.status("micro")["vcpus"] == {"present": 1, "max": 1, "boot": 1}
    down = qvm("down", "micro", "--timeout", "20")
    assert "the guest powered off after the ACPI power button" in down.stdout


def test_guest_panic_is_a_crash_that_on_failure_restarts(qvm: Qvm) -> None:
    qvm.guest_machine("vm1", extra='[supervisor]\nrestart = "on-failure"\nrestart_delay = 0.2\n')
    qvm("up", "vm1")
    qvm.serial("vm1").wait_ready()
    first_pid = qvm.status("vm1")["pid"]
    # the guest panics itself; its pvpanic driver tells QEMU (GUEST_PANICKED). The console
    # stays attached until then: the guest's UART takes input only as fast as it reads it
    console = subprocess.Popen(
        [str(QVM_BIN), "console", "vm1"], env=qvm.env(), stdin=subprocess.PIPE,
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )  # fmt: skip
    assert console.stdin is not None
    console.stdin.write(b"echo c > /proc/sysrq-trigger\n")
    console.stdin.flush()
    qvm.serial("vm1").wait_for(r"Kernel panic", 30)
    console.stdin.close()
    console.wait(timeout=20)

    def restarted() -> dict | None:
        s = qvm.status("vm1")
        return s if s["restarts"] == 1 and s["pid"] not in (None, first_pid) else None

    status = wait_until(restarted, 30, "a restart after the panic")
    assert status["last_exit"]["reason"] == "guest panic"
    assert status["last_exit"]["failed"] is True


KVM_USABLE = os.access("/dev/kvm", os.R_OK | os.W_OK)


def emulation_failure_bios(path: os.PathLike[str]) -> None:
    """A 64 KiB BIOS whose first instructions make KVM give up: ``fld1``, which kvm_pvm's
    instruction emulator (it emulates real mode) cannot decode, then a far jump to
    A000:0000, where nothing is mapped (``-nodefaults``): an instruction fetch from
    unassigned memory is an emulation failure for hardware KVM too (untested here)."""
    image = bytearray(b"\xf4" * 0x10000)  # hlt everywhere else
    image[0xFFF0:0xFFF7] = bytes([0xD9, 0xE8, 0xEA, 0x00, 0x00, 0x00, 0xA0])
    with open(path, "wb") as handle:
        handle.write(image)


@pytest.mark.skipif(not KVM_USABLE, reason="needs a /dev/kvm this user can open")
def test_kvm_internal_error_is_a_crash_that_on_failure_restarts(qvm: Qvm, tmp_path) -> None:
    bios = tmp_path / "emulation-failure.bin"
    emulation_failure_bios(bios)
    qvm.machine(
        "kvmerr",
        f"""
[machine]
type = "pc"
accel = "kvm"
[cpu]
model = "qemu64"
[memory]
size = "16M"
[supervisor]
restart = "on-failure"
max_restarts = 1
restart_delay = 0.2
[qemu]
extra_args = ["-bios", "{bios}"]
""",
    )
    up = qvm("up", "kvmerr", check=False)
    # QEMU may reach internal-error before or after QMP answers: both are this crash
    assert "Traceback" not in up.stderr

    def given_up() -> dict | None:
        s = qvm.status("kvmerr")
        return s if s["state"] == "crashed" and s["restarts"] == 1 else None

    status = wait_until(given_up, 30, "the internal error, one restart, and the cap")
    assert status["accel"] == "kvm"
    assert status["last_exit"]["failed"] is True
    assert status["last_exit"]["reason"] == (
        "KVM internal error (see qvm logs --qemu); not restarted: 1 restarts in a row"
    )
    assert "KVM internal error" in qvm("logs", "kvmerr", "--qemu").stdout


@pytest.mark.skipif(
    not (KVM_USABLE and os.path.exists("/sys/module/kvm_pvm")), reason="needs kvm_pvm"
)
def test_cpu_models_that_abort_under_kvm_pvm_are_refused_before_anything_starts(
    qvm: Qvm,
) -> None:
    path, stderr = refused_before_start(qvm, 'accel = "auto"', 'accel = "kvm"')
    assert stderr == (
        f'qvm: {path}: cpu.model (unset: defaults to "host"): "host" makes QEMU abort under '
        'kvm_pvm (failed to set MSR 0x10a) (hint: set a named model such as "qemu64")\n'
    )
