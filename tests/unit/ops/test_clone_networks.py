"""A clone of a VM on a network (issue 20): on the same network, with its own MAC and
address; the helper QEMU that freezes the snapshot joins no switch; a clone's resume
sends no announcement with the template's MAC."""

from __future__ import annotations

from pathlib import Path

from qvm.cmdline.argv import LaunchInputs, build_argv
from qvm.definition.load import load_machine
from qvm.layout.rundir import RunDir
from qvm.ops.clone import _frozen_machine, clone_document
from qvm.store.snapshots import shape_of_argv

TEMPLATE = """
[memory]
size = "128M"

[[nic]]
network = "lab"
mac = "52:54:00:aa:bb:cc"
address = "10.70.1.9"

[[nic]]
mac = "52:54:00:aa:bb:dd"
"""


def test_a_clone_is_on_the_templates_network_with_its_own_mac_and_address(
    tmp_path: Path,
) -> None:
    path = tmp_path / "tpl.toml"
    path.write_text(TEMPLATE)
    template = load_machine(path)
    doc = clone_document(template, RunDir(tmp_path / "tpl@ready"), "c1", "ready")
    on_lab, user = doc["nic"]
    assert on_lab["network"] == "lab"
    assert "mac" not in on_lab and "address" not in on_lab
    assert "network" not in user and "mac" not in user


def test_the_freezing_helper_joins_no_switch_and_keeps_the_devices(tmp_path: Path) -> None:
    path = tmp_path / "tpl.toml"
    path.write_text(TEMPLATE)
    template = load_machine(path)
    inputs = LaunchInputs(accel="tcg", run_dir=RunDir(tmp_path / "tpl@ready"))
    helper = build_argv(_frozen_machine(template), inputs._replace(no_uplinks=True))
    assert not any(arg.startswith("vde,") for arg in helper)
    # on its hub, not user-mode: slirp's state would be in the memory image
    assert "hubport,id=net0,hubid=0" in helper and not any(
        "id=net0," in a for a in helper if a.startswith("user,")
    )
    clone = build_argv(template, inputs)
    assert shape_of_argv(helper) == shape_of_argv(clone)


def test_a_resume_announces_nothing(tmp_path: Path) -> None:
    path = tmp_path / "tpl.toml"
    path.write_text(TEMPLATE)
    inputs = LaunchInputs(accel="tcg", run_dir=RunDir(tmp_path / "c1"), incoming="exec:cat m")
    argv = build_argv(load_machine(path), inputs)
    assert "migration.announce-rounds=0" in argv
