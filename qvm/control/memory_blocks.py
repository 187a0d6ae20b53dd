"""The guest's memory blocks: the size it onlines memory in, and, through the guest agent,
whether it has the blocks of a new DIMM online (onlining those it left offline).

Linux onlines hotplugged memory in blocks (``/sys/devices/system/memory/memoryN``), 128
MiB on x86-64 (more on large hosts; ``guest-get-memory-block-info`` says): a DIMM whose
size is not a multiple of it is accepted by QEMU and never used whole by the guest
(measured: a 100 MiB DIMM, nothing of it online). The test guest onlines new blocks
itself (``auto_online_blocks``) within about 134 ms; a guest that does not (no udev rule)
leaves them offline until someone writes ``online`` to them, which qvm does with
``guest-set-memory-blocks``.

Nothing here prints.
"""

from __future__ import annotations

import time
from typing import Any

from qvm.base.record import Record
from qvm.base.sizes import human_size
from qvm.control.agent import AgentClient
from qvm.control.guest_agent_facts import (
    SOURCE_AGENT,
    SOURCE_QEMU,
    AgentLink,
    blocks_of,
    memory_block_size,
    parse_memory_blocks,
    set_memory_blocks,
)
from qvm.errors import AgentError, HotplugError

# x86-64 Linux, when the guest agent cannot say
DEFAULT_BLOCK_SIZE = 128 * 1024**2
BLOCK_POLL = 0.05
# a guest that onlines new memory itself does it within about 134 ms under TCG
ONLINE_GRACE = 1.0


class BlockSize(Record):
    size: int
    told_by: str  # "the guest agent says", or "x86-64 Linux" (the default)


def guest_block_size(link: AgentLink) -> BlockSize:
    """The guest's memory block size: its agent's word, else x86-64 Linux's 128 MiB."""
    size = None
    if link.client is not None:
        try:
            size = memory_block_size(link.client)
        except AgentError:
            size = None
    if size is None:
        return BlockSize(DEFAULT_BLOCK_SIZE, "x86-64 Linux")
    return BlockSize(size, "the guest agent says")


def check_block_multiple(name: str, size: int, block: BlockSize) -> None:
    """Refuse a DIMM the guest could not use whole, naming the block size and the sizes
    it could use."""
    block_size, told_by = block
    if size % block_size == 0:
        return
    below = size - size % block_size
    above = below + block_size
    sizes = _argument(above) if below == 0 else f"{_argument(below)} or {_argument(above)}"
    raise HotplugError(
        f"{name}: mem add {human_size(size)}: the guest onlines memory in blocks of "
        f"{human_size(block_size)} ({told_by}), so it could never use all of a "
        f"{human_size(size)} DIMM; nothing was added (hint: qvm mem add {name} {sizes}; or "
        f"qvm mem add {name} {_argument(size)} --virtio-mem, whose guest driver plugs memory "
        "in smaller pieces)"
    )


def _argument(size: int) -> str:
    """A size as `mem add` takes it: ``128M``."""
    return f"{size // 1024**2}M"


class GuestBlocks(Record):
    """The memory blocks of one new DIMM as the guest agent saw and left them."""

    block_size: int
    blocks: tuple[int, ...]  # phys-index of each block the DIMM covers
    online: tuple[int, ...]  # those the guest has online at the end
    onlined_by_qvm: tuple[int, ...] = ()  # those qvm onlined (guest-set-memory-blocks)
    seconds: float | None = None  # until all were online
    detail: str | None = None  # what went wrong

    @property
    def complete(self) -> bool:
        return bool(self.blocks) and set(self.online) >= set(self.blocks)

    def as_json(self) -> dict[str, Any]:
        return {**self._asdict(), "complete": self.complete}


def dimm_blocks_online(
    link: AgentLink,
    block: BlockSize,
    addr: int | None,
    size: int,
    timeout: float,
    online_them: bool,
) -> tuple[GuestBlocks | None, str, str | None]:
    """After a DIMM's plug: its blocks as the guest agent sees them (onlined where the
    guest left them offline), the source of the guest's view, and why not the agent."""
    if link.client is None:
        return None, SOURCE_QEMU, link.why_not()
    if block.told_by != "the guest agent says" or addr is None:
        return None, SOURCE_QEMU, "the guest agent does not list memory blocks"
    try:
        found = agent_online_blocks(link.client, addr, size, block.size, timeout, online_them)
    except AgentError as error:
        return None, SOURCE_QEMU, str(error)
    return found, SOURCE_AGENT, None


def agent_online_blocks(
    client: AgentClient,
    addr: int,
    size: int,
    block_size: int,
    timeout: float,
    online_them: bool = True,
) -> GuestBlocks:
    """Wait until the guest lists every block of the DIMM at ``addr`` (``size`` bytes)
    online; blocks it leaves offline for ``ONLINE_GRACE`` s are onlined (unless not
    ``online_them``). Returns at ``timeout`` s at the latest."""
    wanted = tuple(blocks_of(addr, size, block_size))
    started = time.monotonic()
    deadline = started + timeout
    seen_at: float | None = None
    onlined: tuple[int, ...] = ()
    detail = None
    while True:
        blocks = parse_memory_blocks(client.execute("guest-get-memory-blocks"))
        online = tuple(i for i in wanted if i in blocks and blocks[i].online)
        if len(online) == len(wanted):
            return GuestBlocks(
                block_size, wanted, online, onlined, round(time.monotonic() - started, 3)
            )
        present = all(i in blocks for i in wanted)
        now = time.monotonic()
        if present and seen_at is None:
            seen_at = now
        if now >= deadline:
            if not present:
                detail = f"the guest lists only {sum(i in blocks for i in wanted)} of its blocks"
            break
        if online_them and not onlined and seen_at is not None and now - seen_at >= ONLINE_GRACE:
            onlined = tuple(i for i in wanted if i not in online)
            try:
                answers = set_memory_blocks(client, onlined)
            except AgentError as error:
                detail = str(error)
                break
            failed = {i: a for i, a in answers.items() if a != "success"}
            if failed:
                detail = "; ".join(f"block {i}: {a}" for i, a in sorted(failed.items()))
                break
            continue
        time.sleep(BLOCK_POLL)
    blocks = parse_memory_blocks(client.execute("guest-get-memory-blocks"))
    online = tuple(i for i in wanted if i in blocks and blocks[i].online)
    return GuestBlocks(block_size, wanted, online, onlined, None, detail)
