"""shares.json and launch.json's shares: read back as written; a bad record is one
RecordError naming the file and the key."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from framework.fake_qmp import launch_record

from qvm.errors import RecordError
from qvm.store.launch import LaunchRecord
from qvm.store.shares import ShareRecord, find_share, read_shares, write_shares

SHARE = ShareRecord("fs0", "/h/data", "/mnt/data", False, "virtiofs", "boot", "/s/x.sock", 42, 7)


def test_shares_json_reads_back_as_written(tmp_path: Path) -> None:
    path = tmp_path / "shares.json"
    assert read_shares(path) == ()
    live = SHARE._replace(id="fs1", guest="/mnt/x", origin="qvm", mount="mounted")
    write_shares(path, (SHARE, live))
    assert read_shares(path) == (SHARE, live)
    assert find_share((SHARE, live), "/mnt/x/") == live
    assert find_share((SHARE, live), "/mnt") is None


@pytest.mark.parametrize(
    ("change", "key"),
    [
        ({"via": "nfs"}, "via"),
        ({"pid": -1}, "pid"),
        ({"mount": "maybe"}, "mount"),
        ({"readonly": "no"}, "readonly"),
    ],
)
def test_a_bad_share_record_names_its_key(
    tmp_path: Path, change: dict[str, object], key: str
) -> None:
    path = tmp_path / "shares.json"
    path.write_text(json.dumps({"shares": [{**SHARE.to_json(), **change}]}))
    with pytest.raises(RecordError, match=key):
        read_shares(path)


def test_launch_json_carries_the_boot_shares() -> None:
    launch = launch_record(shares=[SHARE.to_json()])
    assert launch.shares == (SHARE,)
    assert LaunchRecord.from_json(launch.to_json(), "launch.json") == launch
    assert launch_record().shares == ()
