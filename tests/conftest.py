"""Fixtures shared by the test suite; the helpers they use live in tests/framework/.

Integration tests drive the real `qvm` CLI in subprocesses, against real QEMU and the
real test guest, each with a private state dir and machines dir. The ``qvm`` fixture
owns every VM a test starts: at the end it kills them all, checks that no QEMU or
supervisor from that state dir survived, and keeps the logs of a failed test.
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Iterator
from pathlib import Path

import pytest
from framework.harness import GUEST_DIR, REPO, Qvm, short_tmpdir


@pytest.fixture
def qvm(request: pytest.FixtureRequest) -> Iterator[Qvm]:
    if not (GUEST_DIR / "vmlinuz").exists():
        pytest.fail(f"no test guest in {GUEST_DIR} (run scripts/build-test-guest)")
    root = short_tmpdir()
    harness = Qvm(root)
    yield harness
    survivors = harness.cleanup()
    failed = getattr(request.node, "rep_call", None) is not None and request.node.rep_call.failed
    if failed:
        keep = REPO / "build" / "test-logs" / request.node.name
        shutil.rmtree(keep, ignore_errors=True)
        shutil.copytree(root, keep, ignore=shutil.ignore_patterns("*.sock", "*.qcow2"))
    shutil.rmtree(root, ignore_errors=True)
    assert not survivors, f"processes survived the test's cleanup: {survivors}"


@pytest.fixture
def fake_tools(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A folder first on PATH for fake host tools (``framework.fake_tools.fake_tool``)."""
    folder = tmp_path / "fakebin"
    folder.mkdir()
    monkeypatch.setenv("PATH", f"{folder}{os.pathsep}{os.environ['PATH']}")
    return folder


@pytest.hookimpl(tryfirst=True, hookwrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo[None]) -> Iterator[None]:
    # the ``qvm`` fixture keeps the logs of a failed test: it needs the call's outcome
    outcome = yield
    report = outcome.get_result()
    setattr(item, f"rep_{report.when}", report)
