"""The QEMU guest agent in the real test guest: the channel, `qvm agent`, `qvm wait --for agent`."""

from __future__ import annotations

import pytest
from framework.harness import Qvm, one_line_error

pytestmark = pytest.mark.integration


def test_agent_answers_in_the_test_guest(qvm: Qvm) -> None:
    qvm.guest_machine("vm1")
    qvm("up", "vm1")
    waited = qvm.json("wait", "vm1", "--for", "agent", "--timeout", "120")
    assert waited["for"] == "agent"

    info = qvm.json("agent", "vm1")
    assert info["answering"] is True
    assert info["version"].startswith("7.")
    for command in ("guest-exec", "guest-exec-status", "guest-shutdown", "guest-get-osinfo"):
        assert command in info["commands"]

    text = qvm("agent", "vm1").stdout
    assert text.startswith(f"vm1: guest agent {info['version']} answering")
    # commands take turns on the channel: several in a row all answer
    for _ in range(3):
        assert qvm.json("agent", "vm1")["version"] == info["version"]
    qvm("down", "vm1", "--timeout", "20")


def test_agent_disabled_is_not_configured(qvm: Qvm) -> None:
    qvm.guest_machine("vm2", extra="\n[agent]\nenabled = false\n")
    qvm("up", "vm2")
    assert "virtio-serial" not in qvm("cmdline", "vm2").stdout
    assert not (qvm.run_dir("vm2") / "agent.sock").exists()
    done = qvm("agent", "vm2", check=False)
    line = one_line_error(done)
    assert "vm2: guest agent not configured" in line
    done = qvm("wait", "vm2", "--for", "agent", "--timeout", "5", check=False)
    assert "not configured" in one_line_error(done)
    qvm("kill", "vm2")
