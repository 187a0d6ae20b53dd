"""A member's supervisor after the guest lost its setup (a reset, the agent's port): the
guest counts as not set up, in ``network-state.json`` too, until the setup ran again."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest

from qvm.layout.runfiles import AGENT_PORT_ID, NETWORK_STATE_FILE, RunFiles
from qvm.store.netlinks import NetNic, NetworkState, read_network_state
from qvm.store.state import QemuRun
from qvm.supervisor.network import NetworkMember

RUN = QemuRun(4242, 17)
NICS = (NetNic("net0", "lab", "52:54:00:12:34:56", "10.70.1.2", 24, 0),)


def member(tmp_path: Path) -> NetworkMember:
    run_dir = tmp_path / "vm1"
    run_dir.mkdir()
    made = NetworkMember(RunFiles(str(run_dir)), "vm1")
    made.state = NetworkState(RUN)
    return made


def saved(made: NetworkMember) -> NetworkState:
    state = read_network_state(made.run.file(NETWORK_STATE_FILE), RUN)
    assert state is not None
    return state


def set_up(made: NetworkMember, during: object = None) -> None:
    """One setup of the guest whose agent answers at once (``during`` runs meanwhile)."""

    def run_in_guest(script: str) -> str | None:
        if callable(during):
            during()
        return None

    made._run_in_guest = run_in_guest  # type: ignore[method-assign]
    asyncio.run(made._set_up_guest(NICS))


@pytest.mark.parametrize(
    ("event", "data"),
    [
        ("RESET", {"guest": True, "reason": "guest-reset"}),
        ("VSERPORT_CHANGE", {"id": AGENT_PORT_ID, "open": False}),
        ("VSERPORT_CHANGE", {"id": AGENT_PORT_ID, "open": True}),
    ],
)
def test_a_reset_or_the_agents_port_makes_the_guest_set_up_again(
    tmp_path: Path, event: str, data: dict[str, object]
) -> None:
    made = member(tmp_path)
    set_up(made)
    assert saved(made).guest_configured
    assert made.guest_changed(event, data)
    state = saved(made)
    assert not state.guest_configured and state.guest_error, state
    assert made.applied is None and made.next_agent_try == 0.0
    set_up(made)  # the same script, run again
    assert saved(made).guest_configured and saved(made).guest_error is None


@pytest.mark.parametrize(
    ("event", "data"),
    [
        ("STOP", {}),
        ("VSERPORT_CHANGE", {"id": "console0", "open": False}),
        ("DEVICE_DELETED", {"device": "net1"}),
    ],
)
def test_other_events_leave_the_setup_alone(
    tmp_path: Path, event: str, data: dict[str, object]
) -> None:
    made = member(tmp_path)
    set_up(made)
    assert not made.guest_changed(event, data)
    assert saved(made).guest_configured and made.applied is not None


def test_a_setup_under_way_across_a_reset_does_not_count(tmp_path: Path) -> None:
    made = member(tmp_path)
    set_up(made, during=lambda: made.guest_changed("RESET", {}))
    assert made.applied is None
    assert not saved(made).guest_configured
