"""The typed records at qvm's process boundaries: launch.json, state.json, new.json and the
supervisor's protocol. Each round-trips; each corrupt shape is one RecordError naming its
file (or its VM), never a KeyError or a wrong guess."""

from __future__ import annotations

import asyncio
import json
import os
import socket
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from qvm.base.jsonfile import MAX_RECORD_BYTES, write_json_atomic
from qvm.errors import RecordError, VmStateError
from qvm.layout.rundir import RunDir
from qvm.store.launch import (
    Forward,
    Image,
    LaunchRecord,
    SshFacts,
    Topology,
    read_launch,
    write_launch,
)
from qvm.store.new import NewRecord, read_new, write_new_record
from qvm.store.state import ExitRecord, StateRecord, read_state, write_state
from qvm.supervisor import wire
from qvm.supervisor.client import ask_supervisor, clean_stale

# what the launch record and the state record of one VM both say
SAME_VM: dict[str, Any] = {
    "name": "vm1",
    "machine_file": "/m/vm1.toml",
    "accel": "tcg",
    "accel_reason": "no /dev/kvm",
}
LAUNCH = LaunchRecord(
    **SAME_VM,
    argv=("qemu-system-x86_64", "-m", "256M"),
    machine_type="q35",
    cpu_model="qemu64",
    vcpus_boot=1,
    vcpus_max=4,
    topology=Topology(1, 1, 4, 1),
    memory_size=256 * 1024**2,
    memory_max=1024**3,
    memory_slots=2,
    forwards=(Forward("net0", "tcp", "127.0.0.1", 40022, 22),),
    nics=("net0",),
    images=(Image("/i/base.qcow2", False), Image("/r/disk0.qcow2", True)),
    ssh=SshFacts("debian", ("/home/u/.ssh/id_ed25519.pub",), False, None),
    restart="on-failure",
    max_restarts=3,
    restart_delay=0.5,
    created=1700000000.5,
)
EXIT = ExitRecord(
    code=1,
    signal=None,
    reason="QEMU exited with code 1 while starting",
    failed=True,
    at=1700000001.0,
    ran_seconds=0.2,
    ended_by=None,
    stderr_tail=("qemu: bad option",),
)
STATE = StateRecord(
    **SAME_VM,
    supervisor_pid=4321,
    supervisor_start_time=99,
    state="crashed",
    restarts=2,
    exit=EXIT,
    crash_reason="QEMU exited with code 1 while starting",
    qemu_pid=None,
    qemu_start_time=None,
    started_at=1700000000.8,
)
# the keys `qvm status --json`, the tests and scripts read: they stay as they were
STATE_KEYS = {
    "name", "machine_file", "accel", "accel_reason", "supervisor_pid",
    "supervisor_start_time", "state", "restarts", "exit", "crash_reason", "qemu_pid",
    "qemu_start_time", "started_at",
}  # fmt: skip
EXIT_KEYS = {"code", "signal", "reason", "failed", "at", "ran_seconds", "ended_by"}


# --- round trips ---------------------------------------------------------------------


def test_launch_record_round_trips(tmp_path: Path) -> None:
    path = tmp_path / "launch.json"
    write_launch(path, LAUNCH)
    assert read_launch(path) == LAUNCH
    on_disk = json.loads(path.read_text())
    assert on_disk["argv"] == list(LAUNCH.argv)
    assert on_disk["forwards"][0] == {
        "nic": "net0",
        "proto": "tcp",
        "host_addr": "127.0.0.1",
        "host_port": 40022,
        "guest_port": 22,
    }
    assert on_disk["topology"] == {"sockets": 1, "dies": 1, "cores": 4, "threads": 1}


def test_launch_record_attributes_are_the_json_keys() -> None:
    # the device modules read launch.json's keys as attributes of the same names
    assert set(LAUNCH.to_json()) == set(LaunchRecord._fields)


def test_state_record_round_trips_with_the_same_keys_on_disk(tmp_path: Path) -> None:
    path = tmp_path / "state.json"
    write_state(path, STATE)
    assert read_state(path) == STATE
    on_disk = json.loads(path.read_text())
    assert set(on_disk) == STATE_KEYS
    assert set(on_disk["exit"]) == EXIT_KEYS | {"stderr_tail"}
    assert on_disk["exit"]["stderr_tail"] == ["qemu: bad option"]
    waiting = STATE._replace(state="restarting", next_restart_at=1700000002.0)
    write_state(path, waiting)
    assert read_state(path) == waiting
    assert json.loads(path.read_text())["next_restart_at"] == 1700000002.0


def test_an_exit_without_a_start_failure_has_no_stderr_tail() -> None:
    assert set(EXIT._replace(stderr_tail=None).to_json()) == EXIT_KEYS


def test_orphaned_is_never_written() -> None:
    assert "orphaned" not in STATE._replace(orphaned=True).to_json()


def test_new_record_round_trips(tmp_path: Path) -> None:
    path = tmp_path / "new.json"
    record = NewRecord("/m/vm1.toml", "ab" * 32)
    write_new_record(path, record)
    assert read_new(path) == record
    assert json.loads(path.read_text()) == {"machine_file": "/m/vm1.toml", "sha256": "ab" * 32}


def test_a_missing_record_is_none(tmp_path: Path) -> None:
    assert read_launch(tmp_path / "launch.json") is None
    assert read_state(tmp_path / "state.json") is None
    assert read_new(tmp_path / "new.json") is None


# --- corrupt records -----------------------------------------------------------------


def _state(**changes: Any) -> dict[str, Any]:
    data = STATE.to_json()
    data.update(changes)
    return {k: v for k, v in data.items() if v is not ...}


def _launch(**changes: Any) -> dict[str, Any]:
    data = LAUNCH.to_json()
    data.update(changes)
    return {k: v for k, v in data.items() if v is not ...}


STATE_PROBLEMS = [
    (_state(name=..., nmae="vm1"), "name: missing"),
    (_state(state="sleeping"), "state: must be one of starting, running"),
    (_state(restarts="2"), "restarts: must be an integer, got '2'"),
    (_state(qemu_pid="123"), "qemu_pid: must be a process id, got '123'"),
    (_state(supervisor_pid=0), "supervisor_pid: must be a process id, got 0"),
    (_state(supervisor_pid=-5), "supervisor_pid: must be a process id, got -5"),
    (_state(supervisor_pid=True), "supervisor_pid: must be a process id, got True"),
    (_state(exit={"code": 1}), "exit: reason: missing"),
    (_state(exit={**EXIT.to_json(), "failed": "yes"}), "exit: failed: must be true or false"),
    (["not", "an", "object"], "must be a JSON object"),
]


LAUNCH_PROBLEMS = [
    (_launch(argv=...), "argv: missing"),
    (_launch(argv="qemu -m 1G"), "argv: must be a list of strings"),
    (_launch(argv=["qemu", 1]), "argv: must be a list of strings"),
    (_launch(vcpus_max="4"), "vcpus_max: must be an integer, got '4'"),
    (_launch(restart="sometimes"), "restart: must be one of no, on-failure, always"),
    (
        _launch(forwards=[{**LAUNCH.forwards[0].to_json(), "host_port": "40022"}]),
        "forwards[0]: host_port: must be an integer",
    ),
    (_launch(images=[{"file": "/x", "writable": True}]), "images[0]: path: missing"),
    (_launch(topology={"sockets": 1}), "topology: dies: missing"),
    (_launch(ssh={"identities": []}), "ssh: user: missing"),
]


CORRUPT_RECORDS = [
    *((read_state, "state.json", data, problem, None) for data, problem in STATE_PROBLEMS),
    *(
        (read_launch, "launch.json", data, problem, "qvm up writes it anew")
        for data, problem in LAUNCH_PROBLEMS
    ),
]


@pytest.mark.parametrize(("reader", "file", "data", "problem", "hint"), CORRUPT_RECORDS)
def test_a_corrupt_record_names_the_file(
    tmp_path: Path,
    reader: Callable[[Path], object],
    file: str,
    data: Any,
    problem: str,
    hint: str | None,
) -> None:
    path = tmp_path / file
    path.write_text(json.dumps(data))
    with pytest.raises(RecordError) as error:
        reader(path)
    message = str(error.value)
    assert message.startswith(f"{path}: ")
    assert problem in message
    assert "\n" not in message
    assert hint is None or hint in message


@pytest.mark.parametrize(
    ("data", "problem"),
    [
        ({"machine_file": "/m/vm1.toml"}, "sha256: missing"),
        ({"machine_file": "/m/vm1.toml", "sha256": "xyz"}, "sha256: must be 64 lowercase hex"),
        ({"machine": "/m/vm1.toml", "sha256": "ab" * 32}, "machine_file: missing"),
    ],
)
def test_a_corrupt_new_record_names_the_file(tmp_path: Path, data: Any, problem: str) -> None:
    path = tmp_path / "new.json"
    path.write_text(json.dumps(data))
    with pytest.raises(RecordError, match=f"^{path}: .*{problem}"):
        read_new(path)


READERS: list[tuple[str, Callable[[Path], Any]]] = [
    ("state.json", read_state),
    ("launch.json", read_launch),
    ("new.json", read_new),
]


@pytest.mark.parametrize(("name", "read"), READERS)
def test_bad_json_names_the_file(tmp_path: Path, name: str, read: Callable[[Path], Any]) -> None:
    path = tmp_path / name
    path.write_text('{"name": "vm1", ')
    with pytest.raises(RecordError, match=f"^{path}: not valid JSON"):
        read(path)


@pytest.mark.parametrize(("name", "read"), READERS)
def test_a_huge_file_is_refused_unread(
    tmp_path: Path, name: str, read: Callable[[Path], Any]
) -> None:
    path = tmp_path / name
    with open(path, "wb") as handle:
        handle.write(b'{"pad": "' + b"x" * MAX_RECORD_BYTES + b'"}')
    with pytest.raises(RecordError, match=f"^{path}: larger than any record qvm writes"):
        read(path)


def test_an_unreadable_file_names_the_file(tmp_path: Path) -> None:
    path = tmp_path / "state.json"
    path.mkdir()  # reading a folder fails like an unreadable file does
    with pytest.raises(RecordError, match=f"^{path}: cannot read"):
        read_state(path)


def test_status_of_a_vm_with_a_corrupt_state_record_says_so(tmp_path: Path) -> None:
    from qvm.ops.status import vm_status

    run = RunDir(tmp_path / "vm1")
    run.create()
    write_json_atomic(run.state_file, _state(qemu_pid="123"))
    status = vm_status(run)
    assert status.state == "stopped"  # nothing of it runs (tests/unit/ops/test_status.py)
    assert status.error.startswith(f"{run.state_file}: qemu_pid: must be a process id")


def test_clean_stale_of_a_corrupt_record_is_a_record_error(tmp_path: Path) -> None:
    run = RunDir(tmp_path / "vm1")
    run.create()
    run.state_file.write_text("{")
    with pytest.raises(RecordError, match=f"^{run.state_file}: not valid JSON"):
        clean_stale(run)


# --- the supervisor's protocol -------------------------------------------------------


@pytest.mark.parametrize(
    "request_",
    [
        wire.StatusRequest(),
        wire.StopRequest(timeout=12.5, force=True),
        wire.StopRequest(),
        wire.KillRequest(),
        wire.ControlRequest(),
    ],
)
def test_requests_round_trip(request_: Any) -> None:
    assert wire.decode_request(wire.encode(request_.to_json())) == request_


def test_requests_keep_their_wire_format() -> None:
    # a supervisor started by an earlier qvm still reads them
    assert json.loads(wire.encode(wire.StopRequest(30.0, False).to_json())) == {
        "op": "stop",
        "timeout": 30.0,
        "force": False,
    }
    assert wire.KillRequest().to_json() == {"op": "kill"}
    assert wire.ControlRequest().to_json() == {"op": "control"}


@pytest.mark.parametrize(
    ("line", "problem"),
    [
        (b'{"op": "events"}\n', "op: must be one of status, stop, kill, control"),
        (b'{"op": "stop", "timeout": "soon"}\n', "timeout: must be a number"),
        (b'{"op": "stop", "timeout": -1}\n', "timeout: must not be negative"),
        (b"[1, 2]\n", "must be a JSON object"),
        (b"stop\n", "not valid JSON"),
        (b"", "empty"),
    ],
)
def test_a_bad_request_is_a_record_error(line: bytes, problem: str) -> None:
    with pytest.raises(RecordError, match=f"^supervisor request: .*{problem}"):
        wire.decode_request(line)


@pytest.mark.parametrize(
    ("request_", "reply"),
    [
        (wire.StatusRequest(), wire.StatusReply(STATE)),
        (
            wire.StatusRequest(),
            wire.StatusReply(
                STATE._replace(state="running", qemu_pid=77, qemu_start_time=5),
                runstate="running",
                vcpus_present=2,
                memory_bytes=512 * 1024**2,
                rss_bytes=100 * 1024**2,
                cpu_percent=12.5,
            ),
        ),
        (wire.StatusRequest(), wire.StatusReply(STATE, qmp_error="QEMU did not answer")),
        (wire.StopRequest(), wire.EndReply("acpi")),
        (wire.StopRequest(), wire.EndReply(None, "QEMU was not running")),
        (wire.KillRequest(), wire.EndReply("kill")),
        (wire.ControlRequest(), wire.ControlReady()),
        (wire.KillRequest(), wire.ErrorReply("unknown op")),
    ],
)
def test_replies_round_trip(request_: Any, reply: Any) -> None:
    line = wire.encode(reply.to_json())
    assert wire.decode_reply(request_, line, "vm1: supervisor reply") == reply


def test_a_status_reply_is_state_json_with_the_live_facts() -> None:
    reply = wire.StatusReply(STATE, vcpus_present=2).to_json()
    assert set(reply) == STATE_KEYS | {"vcpus_present"}


@pytest.mark.parametrize(
    ("request_", "line", "problem"),
    [
        (wire.StopRequest(), b'{"ended_by": "magic"}\n', "ended_by: must be one of acpi"),
        (wire.StatusRequest(), b'{"state": "running"}\n', "supervisor_pid: missing"),
        (wire.ControlRequest(), b'{"ready": false}\n', "ready: must be true"),
        (wire.ControlRequest(), b"{}\n", "ready: missing"),
        (wire.KillRequest(), b"ok\n", "not valid JSON"),
    ],
)
def test_a_malformed_reply_names_the_vm(request_: Any, line: bytes, problem: str) -> None:
    with pytest.raises(RecordError, match=f"^vm1: supervisor reply: .*{problem}"):
        wire.decode_reply(request_, line, "vm1: supervisor reply")


def _serve_once(run: RunDir, answer: bytes) -> threading.Thread:
    """A stand-in supervisor that reads one request and writes ``answer``."""
    server = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    server.bind(str(run.supervisor_socket))
    server.listen(1)

    def serve() -> None:
        with server:
            connection, _ = server.accept()
            with connection:
                wire.LineReader(connection).line()
                connection.sendall(answer)

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    return thread


@pytest.fixture
def short_run() -> Any:
    # unix socket paths are short: pytest's tmp_path may be too long for them
    import tempfile

    with tempfile.TemporaryDirectory(prefix="qvm-") as folder:
        run = RunDir(Path(folder) / "vm1")
        run.create()
        yield run


def test_ask_supervisor_turns_a_malformed_reply_into_a_record_error(short_run: RunDir) -> None:
    thread = _serve_once(short_run, b'{"ended_by": 3}\n')
    with pytest.raises(RecordError, match=r"^vm1: supervisor reply: ended_by: must be one of"):
        ask_supervisor(short_run, wire.KillRequest(), timeout=5)
    thread.join(5)


def test_ask_supervisor_says_what_the_supervisor_refused(short_run: RunDir) -> None:
    thread = _serve_once(short_run, b'{"error": "busy"}\n')
    with pytest.raises(VmStateError, match=r"^vm1: supervisor: busy$"):
        ask_supervisor(short_run, wire.StatusRequest(), timeout=5)
    thread.join(5)


def test_ask_supervisor_returns_the_typed_reply(short_run: RunDir) -> None:
    thread = _serve_once(short_run, wire.encode(wire.EndReply("quit").to_json()))
    assert ask_supervisor(short_run, wire.StopRequest(), timeout=5) == wire.EndReply("quit")
    thread.join(5)


def test_an_acceptance_and_the_reply_in_one_segment_are_two_messages(short_run: RunDir) -> None:
    # a stop that ends at once: both lines can reach the client in one recv
    answer = b'{"accepted": true}\n' + wire.encode(wire.EndReply("acpi").to_json())
    thread = _serve_once(short_run, answer)
    reply = ask_supervisor(short_run, wire.StopRequest(), timeout=5, accept_timeout=5)
    assert reply == wire.EndReply("acpi")
    thread.join(5)


@given(
    messages=st.lists(st.binary(max_size=300).map(lambda b: b.replace(b"\n", b"")), max_size=6),
    cuts=st.lists(st.integers(min_value=1, max_value=400), max_size=10),
)
def test_a_line_reader_gives_each_message_whole_however_the_bytes_arrive(
    messages: list[bytes], cuts: list[int]
) -> None:
    stream = b"".join(m + b"\n" for m in messages)
    pieces, at = [], 0
    for cut in cuts:
        pieces.append(stream[at : at + cut])
        at += cut
    pieces.append(stream[at:])

    class Chunks:
        def recv(self, _size: int) -> bytes:
            while pieces:
                piece = pieces.pop(0)
                if piece:
                    return piece
            return b""

    reader = wire.LineReader(Chunks())  # type: ignore[arg-type]
    assert [reader.line() for _ in messages] == [m + b"\n" for m in messages]
    assert reader.line() == b""


class _Writer:
    def __init__(self) -> None:
        self.data = b""

    def write(self, data: bytes) -> None:
        self.data += data

    async def drain(self) -> None:
        pass

    def close(self) -> None:
        pass


class _Reader:
    def __init__(self, line: bytes) -> None:
        self.line = line

    async def readline(self) -> bytes:
        return self.line


def test_the_supervisor_answers_a_bad_request_with_an_error_reply(tmp_path: Path) -> None:
    from qvm.supervisor.process import Supervisor

    supervisor = Supervisor(RunDir(tmp_path), LAUNCH, ready_fd=None)
    writer = _Writer()
    asyncio.run(supervisor._serve_client(_Reader(b'{"op": "reboot"}\n'), writer))
    reply = wire.decode_reply(wire.StatusRequest(), writer.data, "vm1: supervisor reply")
    assert isinstance(reply, wire.ErrorReply)
    assert reply.error.startswith("supervisor request: op: must be one of")


def test_the_first_state_record_comes_from_the_launch() -> None:
    from qvm.supervisor.spawn import initial_state

    state = initial_state(LAUNCH)
    assert (state.name, state.machine_file, state.accel) == ("vm1", "/m/vm1.toml", "tcg")
    assert state.supervisor_pid == os.getpid()
    assert StateRecord.from_json(json.loads(json.dumps(state.to_json())), "s") == state


def test_rm_clears_a_run_dir_whose_state_record_does_not_parse(tmp_path: Path) -> None:
    from qvm.ops.files import remove

    run = RunDir(tmp_path / "vm1")
    run.create()
    run.state_file.write_text("{")
    assert remove(run, purge=False).files == [run.path]


def test_rm_purge_with_a_corrupt_note_removes_nothing(tmp_path: Path) -> None:
    from qvm.ops.files import remove

    run = RunDir(tmp_path / "vm1")
    run.create()
    (run.path / "new.json").write_text('{"machine_file": 7, "sha256": "' + "0" * 64 + '"}')
    with pytest.raises(RecordError, match=r"new.json: machine_file: must be a string"):
        remove(run, purge=True)
    assert run.path.exists()
