"""--persist: only cpu.count changes; comments, spacing and order survive."""

from __future__ import annotations

from pathlib import Path

import pytest

from qvm.cli.device_options import persisted_json
from qvm.definition.load import load_machine
from qvm.definition.persist import persist_cpu_count, persist_entry, set_cpu_count_text
from qvm.errors import DefinitionError, VmStateError
from qvm.layout.rundir import RunDir
from qvm.ops.snapshot import stopped_disks

COMMENTED = """\
# My build VM. Keep these comments!
[machine]
type = "q35"        # q35: PCIe
accel = "auto"

[cpu]
# how many at boot
count   = 1         # start small
max = 4             # room for hotplug

[memory]
size = "256M"
"""


def test_only_the_count_changes(tmp_path: Path) -> None:
    path = tmp_path / "vm1.toml"
    path.write_text(COMMENTED)
    path.chmod(0o640)
    result = persist_cpu_count(path, 3)
    assert path.read_text() == COMMENTED.replace("count   = 1 ", "count   = 3 ")
    assert (result.old, result.new, result.changed) == (1, 3, True)
    assert path.stat().st_mode & 0o777 == 0o640
    assert [p.name for p in tmp_path.iterdir()] == ["vm1.toml"]


def test_same_count_leaves_the_file_alone(tmp_path: Path) -> None:
    path = tmp_path / "vm1.toml"
    path.write_text(COMMENTED)
    before = path.stat().st_mtime_ns
    result = persist_cpu_count(path, 1)
    assert not result.changed
    assert path.stat().st_mtime_ns == before


def test_missing_key_and_missing_table_are_created() -> None:
    text, old = set_cpu_count_text('[cpu]\nmax = 4 # m\n\n[memory]\nsize = "1G"\n', 2)
    assert old is None
    assert text == '[cpu]\nmax = 4 # m\ncount = 2\n\n[memory]\nsize = "1G"\n'
    text, old = set_cpu_count_text('# top\n[machine]\ntype = "pc"\n', 2)
    assert old is None
    assert text == '# top\n[machine]\ntype = "pc"\n\n[cpu]\ncount = 2\n'


def test_inline_table_keeps_its_shape() -> None:
    text, _ = set_cpu_count_text("cpu = { count = 1, max = 4 }  # inline\n", 2)
    assert text == "cpu = { count = 2, max = 4 }  # inline\n"


def test_never_writes_a_count_above_the_files_max() -> None:
    with pytest.raises(DefinitionError) as error:
        set_cpu_count_text("[cpu]\ncount = 1\nmax = 2\n", 3, "machines/vm1.toml")
    assert str(error.value).startswith(
        "machines/vm1.toml: cpu.count: not written: 3 vCPUs would exceed cpu.max (2) in the file"
    )


def test_a_persisted_entry_names_its_file_absolute(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """`persisted.file` was relative to the caller's folder: meaningless in a log."""
    monkeypatch.chdir(tmp_path)
    (tmp_path / "machines").mkdir()
    path = tmp_path / "machines" / "vm1.toml"
    path.write_text('[memory]\nsize = "256M"\n')
    done = persist_entry(Path("machines/vm1.toml"), "disk", {"file": "/x.qcow2", "id": "disk1"})
    assert persisted_json(RunDir(tmp_path / "vm1"), done)["file"] == str(path)
    assert load_machine(path).disks[0].id == "disk1"  # the id written is the one it boots with


def test_a_persisted_new_disk_is_qvms_own_image_for_snapshots(tmp_path: Path) -> None:
    """`disk attach --new --persist` writes `file = RUNDIR/hotplug-disk1.qcow2`: qvm made
    that image, so a snapshot of the stopped VM takes it, as it takes an overlay."""
    run = RunDir(tmp_path / "state" / "vm1")
    run.path.mkdir(parents=True)
    made = run.new_disk_image("disk1")
    made.write_bytes(b"")
    path = tmp_path / "vm1.toml"
    path.write_text(f'[memory]\nsize = "256M"\n\n[[disk]]\nfile = "{made}"\nid = "disk1"\n')
    assert stopped_disks(run, load_machine(path)) == [made]
    mine = tmp_path / "mine.qcow2"
    mine.write_bytes(b"")
    path.write_text(f'[memory]\nsize = "256M"\n\n[[disk]]\nfile = "{mine}"\n')
    with pytest.raises(VmStateError, match="used as is: a snapshot would be written into your"):
        stopped_disks(run, load_machine(path))


def test_changed_since_started_compares_contents_not_times(tmp_path: Path) -> None:
    """ "Definition changed since started" fired after a save of an unchanged file, after a
    reverted edit and after qvm's own --persist: it compared the file's time."""
    import os
    import time

    from framework.fake_qmp import launch_record

    from qvm.base.digest import file_sha256
    from qvm.cli import resolve
    from qvm.cli.device_options import follow_persist
    from qvm.store.launch import read_launch, write_launch

    path = tmp_path / "vm1.toml"
    path.write_text("[cpu]\ncount = 1\nmax = 4\n")
    run = RunDir(tmp_path / "vm1")
    run.path.mkdir()
    started = time.time() - 60
    os.utime(path, (started - 1, started - 1))
    launch = launch_record(
        machine_file=str(path), created=started, definition_sha256=file_sha256(path)
    )
    write_launch(run.launch_file, launch)
    assert resolve.definition_changed(run) is None
    path.write_text(path.read_text())  # saved, unchanged: a newer time
    assert resolve.definition_changed(run) is None
    path.write_text("[cpu]\ncount = 2\nmax = 4\n")
    assert "changed since vm1 was started" in (resolve.definition_changed(run) or "")
    path.write_text("[cpu]\ncount = 1\nmax = 4\n")  # the edit reverted
    assert resolve.definition_changed(run) is None
    # qvm's own --persist of the live change: the record follows the file
    follow_persist(run, persist_cpu_count(path, 2))
    assert resolve.definition_changed(run) is None
    record = read_launch(run.launch_file)
    assert record is not None and record.definition_sha256 == file_sha256(path)
    # an edit by hand, then a --persist: still changed, the hand's edit is not running
    path.write_text(path.read_text() + "# mine\n")
    follow_persist(run, persist_cpu_count(path, 3))
    assert resolve.definition_changed(run) is not None
    path.unlink()
    assert "is gone since it was started" in (resolve.definition_changed(run) or "")
    # a record from an older qvm, without the sha256: the file's time, as before
    path.write_text("[cpu]\ncount = 1\nmax = 4\n")
    write_launch(run.launch_file, launch._replace(definition_sha256=None))
    assert resolve.definition_changed(run) is not None
    os.utime(path, (started - 1, started - 1))
    assert resolve.definition_changed(run) is None
