"""What the guest agent says about the guest: its vCPUs, memory blocks, OS, host name and
addresses; read by `status`, `cpu list/add/del` and `mem add`, each through
``agent_link``, which never fails: without an answering agent it says why, and the
caller uses what QEMU (or the serial console) tells instead.

Measured with Debian's qemu-ga 7.2 in the busybox test guest:

- ``guest-get-vcpus`` lists ``/sys/devices/system/cpu/cpuN`` by logical id, with
  ``online`` and ``can-offline`` (false for cpu0); a hotplugged vCPU the guest left
  offline is listed (``online`` false) a moment after its ACPI acknowledgement.
- Linux numbers a hotplugged CPU with the lowest free logical id, not by QEMU's slot;
  what ties the two is the APIC id: QEMU's ``apic-id`` property of the vCPU, and the
  guest's ``apicid`` line in ``/proc/cpuinfo`` (read with ``guest-file-*``; it lists
  online CPUs only).
- ``guest-get-memory-blocks`` lists blocks by ``phys-index``: the block's physical
  address divided by the block size (``guest-get-memory-block-info``: 128 MiB on
  x86-64), so a DIMM at ``addr`` of ``size`` bytes is blocks ``addr/block`` up to
  ``(addr+size)/block``.

Nothing here prints.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterable, Iterator, Sequence

from qvm.base.checking import TYPE_CHECKING
from qvm.base.record import Record
from qvm.errors import (
    AgentCommandError,
    AgentError,
    AgentNotConfigured,
    NotRunningError,
)
from qvm.layout.rundir import RunDir
from qvm.store.guest import (
    ANSWERING,
    NOT_ANSWERING,
    NOT_CONFIGURED,
    NOT_RUNNING,
    GuestFacts,
    OsInfo,
    parse_interfaces,
)

if TYPE_CHECKING:
    from typing import Any, TypeVar

    from qvm.control.agent import AgentClient

    _State = TypeVar("_State", bound=Record)

# where a fact about the guest came from
SOURCE_AGENT = "agent"
SOURCE_SERIAL = "serial console"
SOURCE_QEMU = "QEMU only"
# `status` stays quick for a VM whose guest runs no agent
STATUS_SYNC_TIMEOUT = 0.5
STATUS_COMMAND_TIMEOUT = 2.0
# hotplug commands take seconds anyway: the agent gets a little longer to answer
HOTPLUG_SYNC_TIMEOUT = 1.0
LOCK_TIMEOUT = 2.0
CPUINFO = "/proc/cpuinfo"
MAX_FILE = 1024**2


class AgentLink(Record):
    """An agent connection if one answered; else why not (``state``, ``detail``)."""

    client: AgentClient | None
    state: str
    detail: str | None = None
    # the results of agent_link's ``first`` commands (see AgentClient.execute_batch)
    first: tuple[Any, ...] = ()

    @property
    def source(self) -> str:
        return SOURCE_AGENT if self.client is not None else SOURCE_QEMU

    def why_not(self) -> str:
        """``no guest agent configured`` / ``the guest agent is not answering``."""
        if self.state == NOT_CONFIGURED:
            return "no guest agent configured"
        if self.state == NOT_RUNNING:
            return "the VM is not running"
        return "the guest agent is not answering"


@contextlib.contextmanager
def agent_link(
    run: RunDir,
    sync_timeout: float = HOTPLUG_SYNC_TIMEOUT,
    lock_timeout: float = LOCK_TIMEOUT,
    first: Sequence[tuple[str, dict[str, Any] | None]] = (),
    first_timeout: float | None = None,
) -> Iterator[AgentLink]:
    """The VM's agent, held for the ``with`` block, or an ``AgentLink`` without a client
    that says why there is none. Never raises for an agent that does not answer.
    ``first``: commands sent right behind the resync, in its round trip; their results
    are ``link.first``."""
    # not at the top: `cpu list` matches recorded answers without the agent's client
    from qvm.control.agent import open_agent  # noqa: PLC0415

    with contextlib.ExitStack() as stack:
        link: AgentLink
        try:
            client = stack.enter_context(
                open_agent(run, sync_timeout, lock_timeout, defer_sync=True)
            )
            if first:
                results = tuple(client.execute_batch(first, first_timeout))
            else:
                client.finish_sync()
                results = ()
            link = AgentLink(client, ANSWERING, first=results)
        except AgentNotConfigured as error:
            link = AgentLink(None, NOT_CONFIGURED, str(error))
        except NotRunningError as error:
            link = AgentLink(None, NOT_RUNNING, str(error))
        except AgentError as error:  # not answering, busy, channel closed
            link = AgentLink(None, NOT_ANSWERING, str(error))
        yield link


def unsupported(error: AgentCommandError) -> bool:
    """The agent does not offer the command (unknown, or disabled by its blocklist)."""
    desc = error.agent_desc.lower()
    return error.agent_class == "CommandNotFound" or "disabled" in desc or "not found" in desc


def _online_states(
    data: Any, index_key: str, state: Callable[[int, bool, bool], _State]
) -> dict[int, _State]:
    """The agent's list of vCPUs or memory blocks, each ``online`` and ``can-offline``
    under its number ``index_key``, by that number."""
    found: dict[int, _State] = {}
    for item in data if isinstance(data, list) else []:
        if not isinstance(item, dict):
            continue
        index = item.get(index_key)
        if isinstance(index, int) and not isinstance(index, bool) and index >= 0:
            found[index] = state(
                index, bool(item.get("online")), bool(item.get("can-offline", False))
            )
    return found


# --- vCPUs ---------------------------------------------------------------------------------


class GuestVcpu(Record):
    logical_id: int
    online: bool
    can_offline: bool


def parse_vcpus(data: Any) -> dict[int, GuestVcpu]:
    """``guest-get-vcpus`` -> logical id -> its state (entries that make no sense go)."""
    return _online_states(data, "logical-id", GuestVcpu)


def guest_vcpus(client: AgentClient) -> dict[int, GuestVcpu]:
    return parse_vcpus(client.execute("guest-get-vcpus"))


def set_vcpus(client: AgentClient, changes: dict[int, bool]) -> int:
    """``guest-set-vcpus``: logical id -> online; returns how many the guest changed
    (it stops at the first it could not)."""
    if not changes:
        return 0
    vcpus = [{"logical-id": i, "online": on} for i, on in sorted(changes.items())]
    done = client.execute("guest-set-vcpus", {"vcpus": vcpus})
    return done if isinstance(done, int) else 0


def apicids_from_cpuinfo(text: str) -> dict[int, int]:
    """``/proc/cpuinfo`` -> APIC id -> logical CPU (online CPUs only are listed)."""
    found: dict[int, int] = {}
    processor: int | None = None
    for line in text.splitlines():
        key, sep, value = line.partition(":")
        if not sep:
            processor = None if not line.strip() else processor
            continue
        key, value = key.strip(), value.strip()
        if key == "processor" and value.isdigit():
            processor = int(value)
        elif key == "apicid" and value.isdigit() and processor is not None:
            found[int(value)] = processor
    return found


def read_guest_file(client: AgentClient, path: str, limit: int = MAX_FILE) -> bytes:
    """A small guest file, whole (up to ``limit`` bytes), through ``guest-file-*``."""
    handle = client.execute("guest-file-open", {"path": path, "mode": "r"})
    return _read_and_close(client, handle, limit)


def _read_and_close(client: AgentClient, handle: Any, limit: int = MAX_FILE) -> bytes:
    """One read of up to ``limit`` bytes and the close, in one round trip."""
    read, _ = client.execute_batch(
        [
            ("guest-file-read", {"handle": handle, "count": limit}),
            ("guest-file-close", {"handle": handle}),
        ]
    )
    if isinstance(read, AgentError):
        raise read
    import base64  # noqa: PLC0415 -- with re and struct: a file read's, not `cpu list`'s

    return base64.b64decode(read.get("buf-b64") or "") if isinstance(read, dict) else b""


def guest_apicids(client: AgentClient) -> dict[int, int] | None:
    """APIC id -> logical CPU of the guest's online CPUs; None if the agent cannot read
    ``/proc/cpuinfo`` (``guest-file-*`` blocked)."""
    try:
        text = read_guest_file(client, CPUINFO).decode(errors="replace")
    except AgentCommandError:
        return None
    return apicids_from_cpuinfo(text)


# what guest_cpu_view asks first: send it behind agent_link's resync (``first``)
CPU_VIEW = (("guest-get-vcpus", None), ("guest-file-open", {"path": CPUINFO, "mode": "r"}))


class CpuView(Record):
    """The guest's CPUs, and APIC id -> logical CPU of the online ones (None: the agent
    cannot read ``/proc/cpuinfo``)."""

    vcpus: dict[int, GuestVcpu]
    apicids: dict[int, int] | None


def guest_cpu_view(client: AgentClient, sent: tuple[Any, ...] = ()) -> CpuView:
    """The guest's CPU view in two round trips; ``sent``: the results of ``CPU_VIEW`` when
    it already went out (``AgentLink.first``), which saves one."""
    vcpus_reply, handle = sent or client.execute_batch(CPU_VIEW)
    if isinstance(vcpus_reply, AgentError):
        raise vcpus_reply
    vcpus = parse_vcpus(vcpus_reply)
    if isinstance(handle, AgentCommandError):
        return CpuView(vcpus, None)
    if isinstance(handle, AgentError):
        raise handle
    try:
        text = _read_and_close(client, handle).decode(errors="replace")
    except AgentCommandError:
        return CpuView(vcpus, None)
    return CpuView(vcpus, apicids_from_cpuinfo(text))


def drop_cpu_view(link: AgentLink) -> None:
    """Close the guest file ``CPU_VIEW`` opened if nothing read it (the command failed
    first); the reply is left to the next client's resync."""
    if link.client is None or len(link.first) != len(CPU_VIEW):
        return
    handle = link.first[1]
    if isinstance(handle, int) and not isinstance(handle, bool):
        with contextlib.suppress(AgentError):
            link.client.send("guest-file-close", {"handle": handle})


class CpuMatch(Record):
    """Which guest CPU a vCPU is: its logical id and state, or None where it cannot be told."""

    logical_id: int | None
    online: bool | None
    can_offline: bool | None = None


def match_vcpus(
    apic_by_key: dict[str, int | None],
    apicids: dict[int, int] | None,
    vcpus: dict[int, GuestVcpu],
) -> dict[str, CpuMatch]:
    """key (a slot label) -> the guest CPU with its APIC id.

    An online CPU is found by APIC id in ``/proc/cpuinfo``; the vCPUs not found there are
    offline in the guest when it lists exactly as many offline CPUs (then which is which
    does not matter for "offline"), else unknown."""
    matches: dict[str, CpuMatch] = {}
    unmatched = []
    for key, apic in apic_by_key.items():
        logical = apicids.get(apic) if apicids is not None and apic is not None else None
        vcpu = vcpus.get(logical) if logical is not None else None
        if vcpu is not None:
            matches[key] = CpuMatch(logical, vcpu.online, vcpu.can_offline)
        else:
            unmatched.append(key)
    offline = [v for v in vcpus.values() if not v.online]
    for key in unmatched:
        known = apicids is not None and len(offline) == len(unmatched)
        matches[key] = CpuMatch(None, False if known else None)
    return matches


# --- memory blocks -------------------------------------------------------------------------


class MemoryBlock(Record):
    phys_index: int
    online: bool
    can_offline: bool


def parse_memory_blocks(data: Any) -> dict[int, MemoryBlock]:
    """``guest-get-memory-blocks`` -> phys index -> its state (entries that make no sense go)."""
    return _online_states(data, "phys-index", MemoryBlock)


def blocks_of(addr: int, size: int, block_size: int) -> range:
    """The phys-index range of the memory blocks a device at ``addr`` of ``size`` covers."""
    if block_size <= 0 or size <= 0:
        return range(0)
    return range(addr // block_size, (addr + size + block_size - 1) // block_size)


def memory_block_size(client: AgentClient) -> int | None:
    try:
        info = client.execute("guest-get-memory-block-info")
    except AgentCommandError:
        return None
    size = info.get("size") if isinstance(info, dict) else None
    return size if isinstance(size, int) and size > 0 else None


def set_memory_blocks(client: AgentClient, indexes: Iterable[int]) -> dict[int, str]:
    """Online the blocks; phys-index -> the guest's answer ("success", "failed", ...)."""
    wanted = [{"phys-index": i, "online": True} for i in sorted(indexes)]
    if not wanted:
        return {}
    answers = client.execute("guest-set-memory-blocks", {"mem-blks": wanted})
    found: dict[int, str] = {}
    for item in answers if isinstance(answers, list) else []:
        if isinstance(item, dict) and isinstance(item.get("phys-index"), int):
            response = str(item.get("response", "failed"))
            if item.get("error-code"):
                response += f" (errno {item['error-code']})"
            found[item["phys-index"]] = response
    return found


# --- facts for `status` ------------------------------------------------------------------


STATUS_FACTS = (
    ("guest-get-osinfo", None),
    ("guest-get-host-name", None),
    ("guest-network-get-interfaces", None),
)


def guest_facts(run: RunDir) -> GuestFacts:
    """Ask the agent (briefly, one round trip) for the guest's OS, host name and
    addresses; never raises."""
    with agent_link(
        run, STATUS_SYNC_TIMEOUT, STATUS_SYNC_TIMEOUT, STATUS_FACTS, STATUS_COMMAND_TIMEOUT
    ) as link:
        if link.client is None:
            return GuestFacts(link.state, link.detail)
        problems = list(dict.fromkeys(str(r) for r in link.first if isinstance(r, AgentError)))
        os_reply, host, interfaces = (None if isinstance(r, AgentError) else r for r in link.first)
        hostname = host.get("host-name") if isinstance(host, dict) else None
        return GuestFacts(
            ANSWERING,
            "; ".join(problems) or None,
            OsInfo.from_reply(os_reply) if os_reply is not None else None,
            hostname if isinstance(hostname, str) else None,
            tuple(parse_interfaces(interfaces)),
        )
