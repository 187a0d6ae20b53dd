from __future__ import annotations

from qvm.definition.schema import CpuSpec
from qvm.definition.topology import Topology, slot_index, slot_props, topology_of


def test_default_topology_is_one_socket_of_cores_like_qemu_7_2() -> None:
    assert topology_of(CpuSpec(count=1, max=2)) == Topology(1, 1, 2, 1)


def test_slot_props_round_trip() -> None:
    topo = Topology(sockets=2, dies=2, cores=3, threads=2)
    seen = set()
    for index in range(topo.max_cpus):
        props = slot_props(index, topo)
        assert slot_index(props, topo) == index
        seen.add(tuple(sorted(props.items())))
    assert len(seen) == topo.max_cpus
    assert slot_props(5, topo) == {"socket-id": 0, "die-id": 0, "core-id": 2, "thread-id": 1}
