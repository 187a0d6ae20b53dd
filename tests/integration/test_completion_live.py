"""Completion of the vCPUs `cpu del` can take: only QEMU knows them, so TAB asks it."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
from framework.completion import BASH_DRIVER
from framework.harness import Qvm

pytestmark = pytest.mark.integration


def bash_complete(qvm: Qvm, line: str) -> list[str]:
    qvm_bin = Path(sys.executable).parent / "qvm"
    done = subprocess.run(
        ["bash", "--norc", "--noprofile", "-c", BASH_DRIVER],
        env={
            **qvm.env(),
            "QVM": str(qvm_bin),
            "LINE": line,
            # the completion function runs the `qvm` on PATH, as a user's shell does
            "PATH": f"{qvm_bin.parent}:{os.environ.get('PATH', '')}",
        },
        cwd=qvm.root,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 0, done.stderr
    return [word for word in done.stdout.splitlines() if word]


def test_cpu_del_offers_the_vcpus_present_now(qvm: Qvm) -> None:
    qvm.guest_machine("vm1", count=1, max=4)
    assert bash_complete(qvm, "qvm cpu del vm1 ") == []  # not running: nothing to delete
    qvm("up", "vm1")
    qvm.serial("vm1").wait_ready()
    assert bash_complete(qvm, "qvm cpu del vm1 ") == []  # the boot vCPU has no id
    qvm("cpu", "add", "vm1", "--count", "2")
    assert bash_complete(qvm, "qvm cpu del vm1 ") == ["cpu1", "cpu2"]
    assert bash_complete(qvm, "qvm cpu del vm1 cpu2") == ["cpu2"]
    qvm("kill", "vm1")
