"""vCPU topology and slot identity, following QEMU's x86 rules.

qvm always passes the full topology to ``-smp`` so that QEMU and qvm agree on it: left to
itself, QEMU 7.2 turns ``-smp 1,maxcpus=2`` into one socket with two cores (newer machine
types prefer cores), which is why the upstream walk-through's ``socket-id=1`` fails there.
The live source of truth for free slots is still ``query-hotpluggable-cpus``; these
functions only name slots and build the boot-time ``-device`` lines.
"""

from __future__ import annotations

from qvm.base.checking import TYPE_CHECKING
from qvm.base.record import Record

if TYPE_CHECKING:  # the vCPU commands import this module, and need no TOML parsing
    from qvm.definition.schema import CpuSpec


class Topology(Record):
    sockets: int
    dies: int
    cores: int
    threads: int

    @property
    def max_cpus(self) -> int:
        return self.sockets * self.dies * self.cores * self.threads


def topology_of(cpu: CpuSpec) -> Topology:
    if cpu.sockets is None and cpu.dies is None and cpu.cores is None and cpu.threads is None:
        # QEMU's own default for current pc/q35 machine types: one socket, all cores
        return Topology(sockets=1, dies=1, cores=cpu.max, threads=1)
    return Topology(
        sockets=cpu.sockets or 1,
        dies=cpu.dies or 1,
        cores=cpu.cores or 1,
        threads=cpu.threads or 1,
    )


def slot_props(index: int, topo: Topology) -> dict[str, int]:
    """The ``device_add`` props of the vCPU with linear index ``index`` (x86 APIC order)."""
    props = {"socket-id": index // (topo.threads * topo.cores * topo.dies)}
    if topo.dies > 1:  # QEMU 7.2 lists die-id only when there is more than one die
        props["die-id"] = (index // (topo.threads * topo.cores)) % topo.dies
    props["core-id"] = (index // topo.threads) % topo.cores
    props["thread-id"] = index % topo.threads
    return props


def slot_index(props: dict[str, int], topo: Topology) -> int:
    """Inverse of ``slot_props``: the linear index of a slot."""
    socket = props.get("socket-id", 0)
    die = props.get("die-id", 0)
    core = props.get("core-id", 0)
    thread = props.get("thread-id", 0)
    return ((socket * topo.dies + die) * topo.cores + core) * topo.threads + thread


def cpu_device_id(index: int) -> str:
    """Stable QOM id for the vCPU in slot ``index``: the same slot always gets the same id."""
    return f"cpu{index}"


def cpu_driver(model: str) -> str:
    return f"{model}-x86_64-cpu"
