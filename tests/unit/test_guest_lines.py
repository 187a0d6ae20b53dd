"""The integration tests' reader of the test guest's serial lines (tests/framework/guest.py)."""

from __future__ import annotations

from framework.guest import parse_guest_lines


def test_ready_states_and_power_off_in_order() -> None:
    text = (
        "[    0.000000] Linux version 6.1.0\r\n"
        "QVM-GUEST-READY\r\n"
        "QVM-STATE cpus=0 ncpus=1 mem_kb=156036 blk=- net=lo\r\n"
        "qvm-guest:/# \r\n"
        "QVM-STATE cpus=0-1 ncpus=2 mem_kb=418180 blk=vda net=eth0,lo\r\n"
        "qvm-guest:/# \x1b[6nQVM-GUEST-READY\r\n"  # a restarted QEMU, after the prompt
        "\r\nQVM-GUEST-POWEROFF\r\n"
    )
    guest = parse_guest_lines(text)
    assert guest.boots == 2 and guest.ready and guest.powered_off
    assert guest.latest_state == {
        "cpus": "0-1",
        "ncpus": "2",
        "mem_kb": "418180",
        "blk": "vda",
        "net": "eth0,lo",
    }
    assert len(guest.states) == 2


def test_a_line_still_being_written_does_not_count() -> None:
    text = (
        "QVM-GUEST-READY\n"
        "QVM-STATE cpus=0 ncpus=1 mem_kb=1 blk=- net=lo\n"
        "QVM-STATE cpus=0 ncpus=2 mem"  # a line still being written
    )
    guest = parse_guest_lines(text)
    assert guest.latest_state is not None and guest.latest_state["ncpus"] == "1"
    assert not parse_guest_lines("QVM-GUEST-READY").ready


def test_nothing_said() -> None:
    guest = parse_guest_lines("")
    assert not guest.ready and not guest.powered_off and guest.latest_state is None
