"""What `qvm share add` refuses before anything happens."""

from __future__ import annotations

from pathlib import Path

import pytest
from framework.fake_qmp import launch_record

from qvm.control.share import check_add
from qvm.errors import HotplugError, UsageError
from qvm.layout.rundir import RunDir

SHARED = ["qemu-system-x86_64", "-object", "memory-backend-memfd,id=qvm.ram,size=256M,share=on"]


def test_a_vm_booted_without_shared_memory_is_refused_naming_the_key(tmp_path: Path) -> None:
    run = RunDir(tmp_path / "vm1")
    with pytest.raises(HotplugError) as caught:
        check_add(run, launch_record(), tmp_path, "/mnt/x", "virtiofs")
    assert str(caught.value) == (
        "vm1: share add: this VM booted without shared memory, which virtiofs needs (hint: set "
        "memory.shared = true in /nowhere/machines/vm1.toml, then qvm restart vm1)"
    )
    check_add(run, launch_record(argv=SHARED), tmp_path, "/mnt/x", "virtiofs")  # as root


@pytest.mark.parametrize(
    ("host", "guest", "via", "said"),
    [
        ("missing", "/mnt/x", "virtiofs", "HOST: folder not found"),
        ("file", "/mnt/x", "virtiofs", "HOST: is not a folder"),
        (".", "mnt", "virtiofs", "GUEST must be an absolute path"),
        (".", "/mnt/x", "9p", "QEMU has no 9p hotplug"),
    ],
)
def test_bad_input_is_a_usage_error(
    tmp_path: Path, host: str, guest: str, via: str, said: str
) -> None:
    (tmp_path / "file").write_text("")
    run = RunDir(tmp_path / "vm1")
    with pytest.raises(UsageError, match=said):
        check_add(run, launch_record(argv=SHARED), tmp_path / host, guest, via)
