"""``launch.json``: the facts of one QEMU run, written by ``qvm up`` before the fork and
read by the supervisor and by every command that acts on the running VM.

``LaunchRecord.from_json`` checks every field where the file is read; deeper code reads
attributes. A record that does not parse is a ``RecordError`` naming the file.
"""

from __future__ import annotations

import os

from qvm.base.checking import TYPE_CHECKING
from qvm.base.jsonfile import write_json_atomic
from qvm.base.record import Record
from qvm.layout.runfiles import AGENT_PORT_NAME
from qvm.store.fields import Fields, PlainRecord, read_record
from qvm.store.shares import ShareRecord

if TYPE_CHECKING:
    from typing import Any, Self

RESTART_POLICIES = ("no", "on-failure", "always")
PROTOCOLS = ("tcp", "udp")
LAUNCH_HINT = "qvm up writes it anew; qvm down, then qvm up"


class Forward(PlainRecord):
    """One host-to-guest port forward of a NIC, its host port resolved."""

    nic: str
    proto: str
    host_addr: str
    host_port: int
    guest_port: int

    @classmethod
    def read(cls, f: Fields) -> Self:
        return f.declared(cls, proto=f.one_of("proto", PROTOCOLS))


class Image(PlainRecord):
    """A file QEMU opens, and whether it writes it (for other VMs' pre-flight)."""

    path: str
    writable: bool


class Topology(PlainRecord):
    sockets: int
    dies: int
    cores: int
    threads: int


class SshFacts(Record):
    """How ``qvm ssh`` logs in: the cloud-init user, its keys, and whether qvm made one."""

    user: str
    identities: tuple[str, ...]
    generated_key: bool
    user_data_file: str | None

    @classmethod
    def read(cls, f: Fields) -> SshFacts:
        return cls(
            user=f.str("user"),
            identities=f.str_list("identities", ()),
            generated_key=f.bool("generated_key", False),
            user_data_file=f.str("user_data_file", None),
        )

    def to_json(self) -> dict[str, Any]:
        return {**self._asdict(), "identities": list(self.identities)}


class LaunchRecord(Record):
    name: str
    machine_file: str | None
    argv: tuple[str, ...]
    accel: str | None
    accel_reason: str | None
    machine_type: str | None
    cpu_model: str | None
    vcpus_boot: int | None
    vcpus_max: int | None
    topology: Topology | None
    memory_size: int | None
    memory_max: int | None
    memory_slots: int | None
    forwards: tuple[Forward, ...]
    nics: tuple[str, ...]
    images: tuple[Image, ...]
    ssh: SshFacts | None
    restart: str
    max_restarts: int
    restart_delay: float
    created: float | None
    # what a restart by the policy runs instead of ``argv``: a run started from a snapshot
    # (-loadvm) or a clone's memory image (-incoming) comes back cold, from its definition,
    # never silently from the snapshot again; None: ``argv`` itself
    restart_argv: tuple[str, ...] | None = None
    # the machine file's sha256 as this run started it (and as qvm's own --persist left it
    # since): "changed since started" compares contents, not file times; None: a record
    # from an older qvm
    definition_sha256: str | None = None
    # the machine file's [[share]]s: the supervisor starts their virtiofsd before QEMU
    shares: tuple[ShareRecord, ...] = ()

    @property
    def has_agent(self) -> bool:
        """Whether this run's QEMU has the guest agent's channel (``[agent] enabled``)."""
        return any(f"name={AGENT_PORT_NAME}" in arg for arg in self.argv)

    @classmethod
    def from_json(cls, data: Any, source: str) -> LaunchRecord:
        f = Fields(data, source, LAUNCH_HINT)
        topology = f.object("topology", None)
        ssh = f.object("ssh", None)
        return f.declared(
            cls,
            topology=Topology.read(topology) if topology is not None else None,
            forwards=f.records("forwards", Forward.read, ()),
            nics=f.str_list("nics", ()),
            images=f.records("images", Image.read, ()),
            ssh=SshFacts.read(ssh) if ssh is not None else None,
            restart=f.one_of("restart", RESTART_POLICIES, "no"),
            max_restarts=f.int("max_restarts", 5),
            restart_delay=f.float("restart_delay", 1.0),
            shares=f.records("shares", ShareRecord.read, ()),
        )

    def to_json(self) -> dict[str, Any]:
        data = self._asdict()
        data["argv"] = list(self.argv)
        data["restart_argv"] = list(self.restart_argv) if self.restart_argv is not None else None
        data["nics"] = list(self.nics)
        data["topology"] = self.topology.to_json() if self.topology else None
        data["forwards"] = [forward.to_json() for forward in self.forwards]
        data["images"] = [image.to_json() for image in self.images]
        data["ssh"] = self.ssh.to_json() if self.ssh else None
        data["shares"] = [share.to_json() for share in self.shares]
        return data


def read_launch(path: str | os.PathLike[str]) -> LaunchRecord | None:
    """The launch record at ``path``; None when there is none. Corrupt: RecordError."""
    return read_record(path, LaunchRecord.from_json, LAUNCH_HINT)


def write_launch(path: str | os.PathLike[str], record: LaunchRecord) -> None:
    write_json_atomic(path, record.to_json())


def definition_changed(launch: LaunchRecord) -> bool | None:
    """Whether the machine file's contents differ from those this run was started from (a
    file that is gone differs); None when nothing can say: no machine file, or one that
    cannot be read. A record from before the sha256 compares the file's time, as qvm did."""
    file = launch.machine_file
    if not file:
        return None
    if launch.definition_sha256 is None:
        if launch.created is None:
            return None
        try:
            return os.stat(file).st_mtime > launch.created
        except FileNotFoundError:
            return True
        except OSError:
            return None
    if not os.path.lexists(file):
        return True
    # a running VM's question only: `list` and `status` of stopped VMs never hash
    from qvm.base.digest import file_sha256  # noqa: PLC0415

    now = file_sha256(file)
    return None if now is None else now != launch.definition_sha256


def follow_persist(path: str | os.PathLike[str], before: str | None, after: str | None) -> None:
    """qvm's own ``--persist`` wrote the running VM's change into its machine file, whose
    sha256 was ``before`` and is ``after``: when the file was as the run knew it, the
    record at ``path`` takes the new contents, which describe the running VM. A file
    edited by hand since the start stays "changed"."""
    launch = read_launch(path)
    if launch is None or launch.definition_sha256 is None or before == after:
        return
    if launch.definition_sha256 == before:
        write_launch(path, launch._replace(definition_sha256=after))
