"""The supervisor's virtiofsd daemons, for real (root: virtiofsd runs only as root): started
listening, read-only ones in a read-only mount, and a start that fails part-way leaves no
daemon behind and says why."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from framework.fake_qmp import launch_record

from qvm.host.virtiofsd import VIRTIOFSD, stop_daemon
from qvm.layout.runfiles import RunFiles
from qvm.store.shares import ShareRecord, read_shares
from qvm.supervisor.shares import ShareKeeper, ShareStartError, start_boot_shares

pytestmark = pytest.mark.skipif(
    os.geteuid() != 0 or not os.path.exists(VIRTIOFSD), reason="virtiofsd runs as root only"
)


def share(tmp_path: Path, ident: str, host: Path, readonly: bool = False) -> ShareRecord:
    socket = str(tmp_path / f"share-{ident}.sock")
    return ShareRecord(ident, str(host), f"/mnt/{ident}", readonly, "virtiofs", socket=socket)


def alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


def test_boot_shares_listen_before_qemu_and_stop_with_it(tmp_path: Path) -> None:
    (tmp_path / "rw").mkdir()
    (tmp_path / "ro").mkdir()
    launch = launch_record(
        shares=[
            share(tmp_path, "fs0", tmp_path / "rw").to_json(),
            share(tmp_path, "fs1", tmp_path / "ro", readonly=True).to_json(),
        ]
    )
    started = start_boot_shares(str(tmp_path), launch)
    assert read_shares(tmp_path / "shares.json") == started
    for record in started:
        assert record.pid is not None and alive(record.pid)
        assert record.socket is not None and os.path.exists(record.socket)
    ro_pid = started[1].pid
    mounts = Path(f"/proc/{ro_pid}/mountinfo").read_text()
    (line,) = [m for m in mounts.splitlines() if f" {tmp_path}/ro " in m]
    assert " ro," in line  # the read-only share's folder, as its daemon sees it
    host_view = Path("/proc/self/mountinfo").read_text()
    assert f" {tmp_path}/ro " not in host_view  # the host's own view is untouched
    ShareKeeper(RunFiles(str(tmp_path))).stop_all()
    assert not any(alive(r.pid) for r in started if r.pid is not None)
    assert not (tmp_path / "shares.json").exists()
    assert not any(os.path.exists(r.socket) for r in started if r.socket)


def test_a_daemon_that_cannot_start_stops_those_started_and_says_why(tmp_path: Path) -> None:
    (tmp_path / "rw").mkdir()
    first = share(tmp_path, "fs0", tmp_path / "rw")
    launch = launch_record(
        shares=[first.to_json(), share(tmp_path, "fs1", tmp_path / "gone").to_json()]
    )
    before = {p for p in os.listdir("/proc") if p.isdigit()}
    with pytest.raises(ShareStartError, match=f"virtiofsd for {tmp_path}/gone exited"):
        start_boot_shares(str(tmp_path), launch)
    assert not os.path.exists(first.socket or "")
    new = {p for p in os.listdir("/proc") if p.isdigit()} - before
    daemons = [p for p in new if VIRTIOFSD.encode() in _cmdline(p)]
    assert daemons == []


def _cmdline(pid: str) -> bytes:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return b""


def test_stop_daemon_leaves_another_process_alone() -> None:
    stop_daemon(os.getpid(), 1)  # a start time that is not ours: not signalled
