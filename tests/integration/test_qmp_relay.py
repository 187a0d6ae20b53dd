"""QMP messages of any size QEMU takes pass the supervisor's relay whole, both ways."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from framework.harness import Qvm, one_line_error

pytestmark = pytest.mark.integration

MiB = 1024 * 1024


def test_requests_and_replies_of_megabytes_reach_qemu_and_come_back(
    qvm: Qvm, tmp_path: Path
) -> None:
    qvm.guest_machine("big")
    qvm("up", "big")
    # padding inside one JSON string: QEMU parses the whole request before it runs it, so
    # the right answer proves every byte arrived (a cut request is a JSON error). 1.25 MiB
    # is past both old limits (64 KiB per request line, 1 MiB per message); QEMU 7.2 itself
    # parses such a request slowly (~5 s here, 12 s for 2 MiB, measured on raw QMP too)
    args = tmp_path / "args.json"
    args.write_text(json.dumps({"command-line": "info version" + " " * (5 * MiB // 4)}))
    done = qvm("qmp", "big", "human-monitor-command", "--args-file", str(args), "--timeout", "60")
    version = json.loads(done.stdout)
    assert version.startswith("7.2"), version

    # the same through standard input
    small = json.dumps({"command-line": "info version" + " " * 70000})  # > 64 KiB
    done = qvm("qmp", "big", "human-monitor-command", "--args-file", "-", input=small)
    assert json.loads(done.stdout) == version

    # a reply of several MiB: a hex dump of guest memory, 16 bytes a line
    done = qvm("qmp", "big", "human-monitor-command", "command-line=xp /600000xb 0", timeout=120)
    dump = json.loads(done.stdout)
    assert len(dump) > 4 * MiB
    assert dump.count("\n") == 600000 // 8  # HMP prints 8 bytes a line

    # more than QEMU takes in one message: refused before it is sent, in one line
    args.write_text(json.dumps({"command-line": " " * (64 * MiB)}))
    line = one_line_error(
        qvm("qmp", "big", "human-monitor-command", "--args-file", str(args), check=False)
    )
    assert "QEMU takes at most 67108864 bytes in one message" in line
    args.unlink()

    # the VM is as it was: the next command answers as usual
    assert qvm.json("status", "big")["state"] == "running"
    qvm("kill", "big")


def test_a_broken_arguments_file_is_one_line(qvm: Qvm, tmp_path: Path) -> None:
    qvm.guest_machine("args")
    qvm("up", "args", "--no-wait")
    not_json = tmp_path / "bad.json"
    not_json.write_text("{" * 10)
    line = one_line_error(
        qvm("qmp", "args", "query-status", "--args-file", str(not_json), check=False)
    )
    assert f"--args-file: {not_json}: not JSON" in line
    a_list = tmp_path / "list.json"
    a_list.write_text("[1, 2]")
    line = one_line_error(
        qvm("qmp", "args", "query-status", "--args-file", str(a_list), check=False)
    )
    assert "must hold a JSON object" in line
    missing = tmp_path / "missing.json"
    line = one_line_error(
        qvm("qmp", "args", "query-status", "--args-file", str(missing), check=False)
    )
    assert f"--args-file: {missing}: No such file or directory" in line
    qvm("kill", "args")
