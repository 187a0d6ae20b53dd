"""The idle form's pure parts (qvm.supervisor.idle): the handover record and the lines."""

from __future__ import annotations

import json

import pytest

from qvm.errors import RecordError
from qvm.store.state import StateRecord
from qvm.supervisor.idle import IdleHandover, needs_full_form, read_handover, take_lines
from qvm.supervisor.wire import MAX_LINE


def handover() -> IdleHandover:
    state = StateRecord(
        name="vm",
        machine_file=None,
        accel="tcg",
        accel_reason=None,
        supervisor_pid=1234,
        supervisor_start_time=99,
        state="running",
        restarts=0,
        exit=None,
        crash_reason=None,
        qemu_pid=4321,
        qemu_start_time=100,
    )
    return IdleHandover(
        run_path="/run/vm",
        qemu_pid=4321,
        qemu_pidfd=5,
        events_fd=6,
        listen_fd=7,
        state=state,
        runstate="running",
        client_fd=9,
        unread_events='{"event": "STOP"}\n',
    )


def test_handover_round_trip() -> None:
    sent = handover()
    assert read_handover(json.dumps(sent.to_json()).encode()) == sent


def test_handover_refuses_a_wrong_field() -> None:
    data = handover().to_json()
    data["events_fd"] = "6"
    with pytest.raises(RecordError, match="events_fd"):
        read_handover(json.dumps(data).encode())


def test_handover_refuses_a_missing_state() -> None:
    data = handover().to_json()
    del data["state"]
    with pytest.raises(RecordError, match="state"):
        read_handover(json.dumps(data).encode())


def test_take_lines_keeps_the_partial_line() -> None:
    lines, rest = take_lines(b'{"event": "STOP"}\n\n{"event": "RESU')
    assert lines == [b'{"event": "STOP"}']
    assert rest == b'{"event": "RESU'


def test_take_lines_refuses_an_endless_line() -> None:
    with pytest.raises(ValueError, match="longer than"):
        take_lines(b"x" * (MAX_LINE + 1))


def test_only_record_events_stay_idle() -> None:
    assert not needs_full_form("RESUME")
    assert needs_full_form("DEVICE_DELETED")
    assert needs_full_form("SHUTDOWN")
