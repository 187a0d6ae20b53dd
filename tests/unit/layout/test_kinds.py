"""The table of device kinds (``qvm.layout.kinds``) walked against every consumer: a kind
that hotplug, ``devices.json``, snapshots (the device set, the command line of a restore,
the records after it), status, the JSON schemas or completion does not know fails here,
by name, instead of being silently left out (a snapshot without the device, a TAB that
offers nothing)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
from framework.fake_qmp import FakeQmp, launch_record, state_json
from framework.jsonschema_lite import SCHEMAS

from qvm.cli import completion
from qvm.cli.parsing.completion import DEVICE_PARAMS
from qvm.cli.parsing.declare import GROUPS
from qvm.cli.parsing.typer_app import module_commands
from qvm.cmdline.argv import LaunchInputs, build_argv
from qvm.control import kinds as behaviour
from qvm.control.snapshot import device_set
from qvm.definition.naming import generated_id_kind
from qvm.definition.schema import CpuSpec, Machine, MemorySpec
from qvm.errors import ControlError, VmStateError
from qvm.layout import kinds
from qvm.layout.kinds import KINDS, Kind
from qvm.layout.rundir import RunDir
from qvm.ops.snapshot import start_from
from qvm.store import snapshots
from qvm.store.devices import DEVICE_KINDS, DeviceRecord, device_records, save_devices
from qvm.store.fields import Fields

IDS = [kind.name for kind in KINDS]
MEMORY_KINDS = [k for k in KINDS if k.snapshot == kinds.SNAPSHOT_MEMORY]
PLUGGED_KINDS = [k for k in KINDS if k.snapshot == kinds.SNAPSHOT_PLUGGED]


def test_the_table_is_well_formed() -> None:
    assert len(set(IDS)) == len(IDS)
    prefixes = [k.id_prefix for k in KINDS]
    assert len(set(prefixes)) == len(prefixes), "two kinds make the same ids"
    for kind in KINDS:
        assert kind.snapshot in kinds.SNAPSHOT_PARTS, kind.name
        assert kind.boot_ids in completion.BOOT_IDS, kind.name
        assert all(kind.counted), kind.name


# --- hotplug ---------------------------------------------------------------------------


@pytest.mark.parametrize("kind", KINDS, ids=IDS)
def test_every_kind_has_its_behaviour(kind: Kind) -> None:
    entry = behaviour.BEHAVIOURS.get(kind.name)
    assert entry is not None, f"qvm.control.kinds.BEHAVIOURS has no {kind.name}"
    assert entry.kind == kind
    assert all(callable(f) for f in (entry.list, entry.add, entry.remove))
    # what devices.json records is recorded again after a start from a snapshot
    assert (entry.restored is not None) == kind.recorded


def test_the_behaviours_name_no_kind_the_table_lacks() -> None:
    assert set(behaviour.BEHAVIOURS) == set(IDS)


@pytest.mark.parametrize("kind", KINDS, ids=IDS)
def test_every_kind_has_a_command_group_that_lists_adds_and_removes(kind: Kind) -> None:
    assert kind.group in GROUPS
    words = set(module_commands(kind.group).functions)
    assert "list" in words
    assert words & {"add", "attach"}, words
    assert words & {"del", "detach"}, words


@pytest.mark.parametrize("kind", KINDS, ids=IDS)
def test_the_ids_of_a_kind_are_kept_for_it(kind: Kind) -> None:
    assert generated_id_kind(f"{kind.id_prefix}0") == kind.family
    assert generated_id_kind(f"{kind.id_prefix}x") is None


# --- devices.json ----------------------------------------------------------------------


def _run(tmp_path: Path) -> RunDir:
    run = RunDir(tmp_path / "vm1")
    run.path.mkdir()
    run.state_file.write_text(json.dumps(state_json(4242, 7)))
    return run


def _record(kind: Kind, dev_id: str) -> DeviceRecord:
    return DeviceRecord(
        id=dev_id,
        kind=kind.name,
        cleanup=(("object-del", {"id": "x"}),),
        bus="hp0",
        backend=f"mem-{dev_id}",
        size=256 * 1024**2,
        file="/s/vm1/hotplug.qcow2",
        format="qcow2",
        model="virtio-net-pci",
        mac="52:54:00:00:00:01",
    )


def test_devices_json_holds_every_recorded_kind(tmp_path: Path) -> None:
    assert set(DEVICE_KINDS) == {k.name for k in KINDS if k.recorded}
    run = _run(tmp_path)
    written = [_record(k, f"{k.id_prefix}7") for k in KINDS if k.recorded]
    save_devices(run, written)
    assert list(device_records(run)) == written


# --- snapshots ---------------------------------------------------------------------------


# the QEMU type of a device of each kind that QEMU cannot save
REFUSED_TYPES = {kinds.SHARE.name: "vhost-user-fs-pci"}


def _session(
    records: dict[str, DeviceRecord],
    memory: list[dict[str, Any]],
    others: dict[str, str] | None = None,
) -> FakeQmp:
    listed = [{"name": i, "type": "child<some-device>"} for i in records]
    listed += [{"name": i, "type": f"child<{t}>"} for i, t in (others or {}).items()]
    return FakeQmp(
        replies={
            "query-hotpluggable-cpus": [{"qom-path": "/machine/unattached/device[0]"}],
            "qom-list": listed,
            "query-memory-devices": memory,
        }
    )


@pytest.mark.parametrize("kind", KINDS, ids=IDS)
def test_a_snapshot_keeps_every_kind_or_refuses_it(kind: Kind, tmp_path: Path) -> None:
    """The device set a save records has the device (or the save is refused, naming
    it), and a restore puts it back on QEMU's command line and in devices.json."""
    run = _run(tmp_path)
    dev_id = f"{kind.id_prefix}5"
    records = {dev_id: _record(kind, dev_id)} if kind.recorded else {}
    save_devices(run, list(records.values()))
    memory = []
    if kind.snapshot == kinds.SNAPSHOT_MEMORY:
        data = {"id": dev_id, "memdev": f"/objects/mem-{dev_id}", "size": 256 * 1024**2}
        memory.append({"type": kind.name, "data": data})
    refused = {dev_id: REFUSED_TYPES[kind.name]} if kind.snapshot == kinds.SNAPSHOT_REFUSED else {}
    session = _session(records, memory, refused)
    launch = launch_record()
    if kind.snapshot == kinds.SNAPSHOT_REFUSED:
        with pytest.raises(VmStateError, match=dev_id):
            device_set(session, run, launch, None)
        return
    devices = device_set(session, run, launch, None)
    if kind.snapshot == kinds.SNAPSHOT_CPU_SLOTS:
        assert devices.cpu_slots == (0,)
        return
    kept = {kinds.SNAPSHOT_MEMORY: devices.memory, kinds.SNAPSHOT_PLUGGED: devices.plugged}
    assert [(d.id, d.kind) for d in kept[kind.snapshot]] == [(dev_id, kind.name)]
    # read back from snapshots.json as written
    assert snapshots.DeviceSet.read(_fields(devices.to_json())) == devices
    # the restore: on the command line with its id, and recorded as hotplugged by qvm
    record = _snapshot(devices)
    inputs = LaunchInputs("tcg", run, **start_from(record)._asdict())
    argv = " ".join(build_argv(_machine(), inputs))
    assert f"id={dev_id}," in argv or argv.endswith(f"id={dev_id}")
    (restored,) = behaviour.restored_records(devices, 1.0)
    assert (restored.id, restored.kind) == (dev_id, kind.name)
    assert restored.cleanup
    # status and summaries count it
    assert kinds.count_text(kind, 1) in devices.summary()


def test_a_recorded_kind_with_no_place_in_a_snapshot_is_never_left_out(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    run = _run(tmp_path)
    share = kinds.DISK._replace(name="share", snapshot="somewhere-new")
    monkeypatch.setitem(kinds.BY_NAME, "share", share)
    records = {"fs0": _record(kinds.DISK, "fs0")._replace(kind="share")}
    monkeypatch.setattr("qvm.store.devices.DEVICE_KINDS", ("disk", "share"))
    save_devices(run, list(records.values()))
    with pytest.raises(ControlError, match="fs0: no place in a snapshot"):
        device_set(_session(records, []), run, launch_record(), None)


def _fields(data: dict[str, Any]) -> Fields:
    return Fields(data, "snapshots.json", None)


def _snapshot(devices: snapshots.DeviceSet) -> snapshots.SnapshotRecord:
    return snapshots.SnapshotRecord(
        tag="t",
        created=1.0,
        disk_only=False,
        files=(),
        devices=devices,
        definition_sha256=None,
        shape={},
    )


def _machine() -> Machine:
    return Machine(
        name="vm1",
        path=Path("/m/vm1.toml"),
        cpu=CpuSpec(count=1, max=4),
        memory=MemorySpec(size=256 * 1024**2, max=1024**3, slots=2),
    )


# --- status ----------------------------------------------------------------------------


def test_status_shows_every_kind_under_its_own_label() -> None:
    shown = kinds.shown_in_status()
    assert set(shown) == set(KINDS)
    labels = [kind.counted[1] for kind in shown]
    assert len(set(labels)) == len(labels)


# --- the JSON schemas ------------------------------------------------------------------


def _kind_enums(node: Any, path: str = "") -> list[tuple[str, list[str]]]:
    """Every ``kind`` enumeration in a schema, by its path."""
    found = []
    if isinstance(node, dict):
        kind = (node.get("properties") or {}).get("kind")
        if isinstance(kind, dict) and "enum" in kind:
            found.append((path, kind["enum"]))
        for key, value in node.items():
            found += _kind_enums(value, f"{path}/{key}")
    elif isinstance(node, list):
        for index, value in enumerate(node):
            found += _kind_enums(value, f"{path}/{index}")
    return found


def test_the_schemas_enumerate_every_kind_where_they_list_kinds() -> None:
    checked = 0
    for file in sorted(SCHEMAS.glob("*.json")):
        for path, enum in _kind_enums(json.loads(file.read_text())):
            where = f"{file.name}{path}"
            if path.endswith("/devices/properties/memory/items"):
                assert enum == list(kinds.snapshot_kinds(kinds.SNAPSHOT_MEMORY)), where
            elif path.endswith("/devices/properties/plugged/items"):
                assert enum == list(kinds.snapshot_kinds(kinds.SNAPSHOT_PLUGGED)), where
            elif path.endswith("/memory_device"):  # mem list: QEMU's types, ours among them
                assert {k.name for k in kinds.group_kinds("mem")} <= set(enum), where
            else:
                pytest.fail(f"{where}: a kind enumeration this test does not know: {enum}")
            checked += 1
    assert checked >= 5  # snapshot-save, snapshot-list (twice), common's memory_device


# --- completion --------------------------------------------------------------------------


def test_completion_has_a_key_for_every_group_and_kind() -> None:
    completed = set(DEVICE_PARAMS.values())
    for kind in KINDS:
        assert kind.group in completed, f"no command completes {kind.group} ids"
        assert completion.device_kinds(kind.group)
        assert completion.device_kinds(kind.name) in ((kind,), kinds.group_kinds(kind.name))
    for key in completed - {"port"}:
        assert completion.device_kinds(key), key


def test_completion_offers_the_hotplugged_devices_of_every_recorded_kind(tmp_path: Path) -> None:
    run = _run(tmp_path)
    written = [_record(k, f"{k.id_prefix}3") for k in KINDS if k.recorded]
    save_devices(run, written)
    for kind in KINDS:
        if kind.recorded:
            assert f"{kind.id_prefix}3" in completion._kind_ids(run, (kind,)), kind.name
