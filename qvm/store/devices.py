"""``devices.json``: what qvm hotplugged into the current QEMU run (memory, disks, NICs),
stamped with that run (QEMU's pid and start time), so that ``list`` can show files and
forwards QMP cannot and ``--persist`` knows what to write. QEMU stays the truth for what is
present: a record whose device is gone is dropped.

``DeviceRecord.read`` checks every field where the file is read; a record that does not
parse is a ``RecordError`` naming the file.
"""

from __future__ import annotations

from qvm.base.checking import TYPE_CHECKING
from qvm.base.jsonfile import write_json_atomic
from qvm.base.record import Record
from qvm.layout.kinds import recorded_kinds
from qvm.layout.rundir import RunDir
from qvm.store.fields import Fields
from qvm.store.stamped import qemu_run, read_fields, same_run

if TYPE_CHECKING:
    from typing import Any

# One QMP command: (name, arguments)
Command = tuple[str, dict[str, "Any"]]  # "Any": typing is only imported for type checks
DEVICE_KINDS = recorded_kinds()  # qvm.layout.kinds: the kinds qvm records
_HINT = "qvm restart rewrites it"


def read_commands(f: Fields, key: str) -> tuple[Command, ...]:
    """A list of ``[command, {arguments}]`` (the cleanup of a device or a pending mark)."""
    value = f.any(key, None) or []
    if not isinstance(value, list) or not all(
        isinstance(c, list) and len(c) == 2 and isinstance(c[0], str) and isinstance(c[1], dict)
        for c in value
    ):
        raise f.fail(key, "must be a list of [command, {arguments}]")
    return tuple((command, dict(arguments)) for command, arguments in value)


def commands_json(commands: tuple[Command, ...]) -> list[list[Any]]:
    return [[command, arguments] for command, arguments in commands]


class DeviceRecord(Record):
    """One device qvm hotplugged; the facts of its kind are None for the others."""

    id: str
    kind: str  # one of DEVICE_KINDS
    # the QMP commands that delete its backend once the device is gone
    cleanup: tuple[Command, ...] = ()
    bus: str | None = None  # the PCIe root port it sits on (q35)
    # memory
    backend: str | None = None
    size: int | None = None
    max_size: int | None = None
    added: float | None = None
    # disk
    file: str | None = None
    format: str | None = None
    readonly: bool = False
    created: bool = False  # made by 'disk attach --new'
    # nic
    model: str | None = None
    mac: str | None = None
    index: int | None = None  # type: ignore[assignment]  # a field may shadow tuple.index

    @classmethod
    def read(cls, f: Fields) -> DeviceRecord:
        return f.declared(
            cls, kind=f.one_of("kind", DEVICE_KINDS), cleanup=read_commands(f, "cleanup")
        )

    def to_json(self) -> dict[str, Any]:
        data = {k: v for k, v in self._asdict().items() if v is not None}
        data["cleanup"] = commands_json(self.cleanup)
        return data


def device_records(run: RunDir) -> tuple[DeviceRecord, ...]:
    """What qvm hotplugged into the VM's current QEMU (an earlier run's record means
    nothing)."""
    f = read_fields(run.devices_file, _HINT)
    if f is None or not same_run(f, qemu_run(run)):
        return ()
    return f.records("devices", DeviceRecord.read, ())


def save_devices(run: RunDir, devices: tuple[DeviceRecord, ...] | list[DeviceRecord]) -> None:
    write_json_atomic(
        run.devices_file, {**qemu_run(run).stamp(), "devices": [d.to_json() for d in devices]}
    )


# --- what qvm hotplugged in this QEMU run ---------------------------------------------


def add_device_record(run: RunDir, record: DeviceRecord) -> None:
    save_devices(run, [*device_records(run), record])


def drop_device_record(run: RunDir, dev_id: str) -> None:
    devices = device_records(run)
    kept = [d for d in devices if d.id != dev_id]
    if len(kept) != len(devices):
        save_devices(run, kept)


def update_device_record(run: RunDir, dev_id: str, **changes: Any) -> None:
    devices = device_records(run)
    if any(d.id == dev_id for d in devices):
        save_devices(run, [d._replace(**changes) if d.id == dev_id else d for d in devices])
