"""`qvm systemd`: the unit's text, and systemd's own verdict on it where it is installed."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest

from qvm.ops.systemd import systemd_word, unit_for


def settings(text: str) -> dict[str, str]:
    return dict(line.split("=", 1) for line in text.splitlines() if "=" in line and line[0] != "#")


def test_the_unit_runs_qvm_in_the_foreground_with_room_to_stop() -> None:
    unit = unit_for("vm1", ("/opt/qvm/bin/qvm",), "/m/vm1.toml", "/s", 20.0, user=False)
    assert unit.name == "qvm-vm1.service"
    keys = settings(unit.text)
    assert keys["Type"] == "notify"
    assert keys["ExecStart"] == "/opt/qvm/bin/qvm up --foreground /m/vm1.toml --stop-timeout 20"
    assert keys["Environment"] == "QVM_STATE_DIR=/s"
    assert keys["KillMode"] == "mixed"  # SIGTERM to qvm only: QEMU would quit at once
    assert int(keys["TimeoutStopSec"]) > 20
    assert keys["WantedBy"] == "multi-user.target"
    user = unit_for("vm1", ("/q",), "/m/vm1.toml", "/s", 2.5, user=True)
    assert settings(user.text)["WantedBy"] == "default.target"
    assert int(settings(user.text)["TimeoutStopSec"]) > 2.5


@pytest.mark.parametrize(
    ("word", "written"),
    [
        ("plain", "plain"),
        ("/a b/vm.toml", '"/a b/vm.toml"'),
        ('say "hi"', '"say \\"hi\\""'),
        ("100%", "100%%"),
        ("$HOME", "$$HOME"),
        ("", '""'),
    ],
)
def test_words_are_quoted_as_systemd_reads_them(word: str, written: str) -> None:
    assert systemd_word(word) == written


@pytest.mark.skipif(not shutil.which("systemd-analyze"), reason="no systemd-analyze here")
def test_systemd_analyze_finds_nothing_to_say(tmp_path: Path) -> None:
    machine = tmp_path / "a dir" / "vm1.toml"
    unit = unit_for("vm1", ("/usr/bin/true",), str(machine), str(tmp_path), 20.0, user=False)
    path = tmp_path / unit.name
    path.write_text(unit.text)
    done = subprocess.run(
        ["systemd-analyze", "verify", str(path)],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    assert str(path) not in done.stderr, done.stderr  # no warning about a line of it
