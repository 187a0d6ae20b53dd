"""A member's life on its private networks as the use cases see it: waiting until the
VM's supervisor has set the guest up (``qvm.supervisor.network``), a clone's links held
down until then, and a throwaway's addresses given back when it is destroyed.

A clone resumes its template's memory: its guest has the template's MAC and address, and
the template (or another clone) may be on the switch with them. Joined as it is, it would
announce them (QEMU's announcement after an incoming migration, the guest's gratuitous
ARP when its MAC changes) and take the template's frames. So its network NICs' links are
cut (QMP ``set_link``: QEMU drops their frames both ways) before the guest runs, and put
back once the guest has its own MAC and address.
"""

from __future__ import annotations

import time

from qvm.control.qmp_session import QmpSession
from qvm.control.session import ControlSession
from qvm.errors import QvmError
from qvm.layout.rundir import RunDir
from qvm.store.netlinks import read_netnics, read_network_state
from qvm.store.state import current_qemu_run

SETUP_WAIT = 60.0  # seconds for the supervisor to set a guest up once its agent answers
POLL = 0.05


def network_nics(run: RunDir) -> tuple[str, ...]:
    """The ids of the VM's NICs on networks (``networks.json``, written at its start)."""
    if not run.networks_file.exists():
        return ()
    return tuple(nic.nic for nic in read_netnics(run.networks_file))


def set_links(session: QmpSession, nics: tuple[str, ...], up: bool) -> None:
    for nic in nics:
        session.execute("set_link", {"name": nic, "up": up})


def guest_set_up(run: RunDir) -> tuple[bool, str | None]:
    """Whether the supervisor has set the running guest up, and why not (None: not known
    yet). Corrupt or missing records: not set up."""
    try:
        current = current_qemu_run(run.state_file)
        state = read_network_state(run.network_state_file, current)
    except QvmError as error:
        return False, str(error)
    if state is None:
        return False, None
    return state.guest_configured, state.guest_error


def wait_guest_set_up(run: RunDir, timeout: float = SETUP_WAIT) -> str | None:
    """Block until the guest of a VM on networks is set up; None once it is (or the VM
    is on none), else why not when ``timeout`` ran out."""
    if not network_nics(run):
        return None
    deadline = time.monotonic() + timeout
    while True:
        done, why = guest_set_up(run)
        if done:
            return None
        if time.monotonic() >= deadline:
            return why or "the supervisor has not set the guest up"
        time.sleep(POLL)


def release_links(run: RunDir, nics: tuple[str, ...], timeout: float = SETUP_WAIT) -> str | None:
    """A resumed clone's links, cut by ``set_links``, back up once its guest is set up
    with its own MAC and address; None then, else why they stay cut."""
    if not nics:
        return None
    problem = wait_guest_set_up(run, timeout)
    if problem is not None:
        return f"network links {', '.join(nics)} left down: the guest was not set up: {problem}"
    with ControlSession(run) as session:
        set_links(session, nics, True)
    return None
