"""`up` of a cloud image on a network (qvm.ops.up.start_vm) with the supervisor and the
switch left out: the seed is written once the VM has joined its networks, with the
addresses the join gave, the MACs QEMU gets and the members; a pinned address that took
this VM's is said in the result's notes, and its seed is a new instance."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import yaml

from qvm.cmdline.argv import LaunchInputs, build_argv
from qvm.definition.load import load_machine
from qvm.definition.schema import Machine
from qvm.host.accel import AccelChoice
from qvm.host.cloudinit import plan_seed, read_iso
from qvm.layout.rundir import RunDir
from qvm.ops import net, up
from qvm.store.networks import SwitchRecord
from qvm.supervisor.boot import UpResult

KEY = "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIAABAgMEBQYHCAkKCwwNDg8QERITFBUWFxgZGhscHR4f me@h"


def machine(tmp_path: Path, name: str, nic: str = "") -> Machine:
    path = tmp_path / "machines" / f"{name}.toml"
    path.parent.mkdir(exist_ok=True)
    path.write_text(
        f'[cloud_init]\nssh_authorized_keys = ["{KEY}"]\n'
        "[[nic]]\n"  # user-mode, for ssh
        f'[[nic]]\nnetwork = "lab"\n{nic}\n'
    )
    return load_machine(path)


def start(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, vm: Machine) -> tuple[UpResult, Any]:
    """start_vm, with a supervisor that only reads the seed it would boot with."""
    run = RunDir(tmp_path / "state" / vm.name)
    seen: dict[str, Any] = {}

    def supervisor(run_dir: RunDir, launch: object, wait: bool) -> UpResult:
        seen.update({n: d.decode() for n, d in read_iso(run_dir.seed_image)[1].items()})
        return UpResult(vm.name, False, 1, "tcg", "test", run.serial_log, run.qmp_socket, True)

    monkeypatch.setattr(up, "start_supervisor", supervisor)
    monkeypatch.setattr(net, "ensure_switch", lambda n: (SwitchRecord(2, None, 0.0), False))
    inputs = LaunchInputs(accel="tcg", run_dir=run)
    plan = up.LaunchPlan(
        vm, run, AccelChoice("tcg", "test"), build_argv(vm, inputs), inputs, plan_seed(vm, run)
    )
    return up.start_vm(plan, wait=True), seen


def test_the_seed_holds_what_the_join_gave(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    start(tmp_path, monkeypatch, machine(tmp_path, "b"))
    a = machine(tmp_path, "a")
    result, seed = start(tmp_path, monkeypatch, a)
    assert result.notes == ()
    lab = net.read_network(net.NetFiles(tmp_path / "state", "lab"))
    assert lab is not None
    address = {m.vm: m.address for m in lab.members}
    config = json.loads(seed["network-config"])["ethernets"]
    # the MACs are those on QEMU's command line
    argv = " ".join(build_argv(a, LaunchInputs(accel="tcg", run_dir=RunDir(tmp_path))))
    for nic in ("net0", "net1"):
        assert f"mac={config[nic]['match']['macaddress']},id={nic}" in argv
    assert config["net0"]["dhcp4"] is True
    assert config["net1"]["addresses"] == [f"{address['a']}/24"]
    bootcmd = yaml.safe_load(seed["vendor-data"])["bootcmd"]
    assert f"{address['a']} a\\n{address['b']} b\\n" in bootcmd[0][2]


def test_a_pinned_address_that_took_this_vms_is_said_and_makes_a_new_instance(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    _, first = start(tmp_path, monkeypatch, machine(tmp_path, "a"))
    taken = json.loads(first["network-config"])["ethernets"]["net1"]["addresses"][0]
    pinned = taken.split("/")[0]
    start(tmp_path, monkeypatch, machine(tmp_path, "b", f'address = "{pinned}"'))
    result, second = start(tmp_path, monkeypatch, machine(tmp_path, "a"))
    now = json.loads(second["network-config"])["ethernets"]["net1"]["addresses"][0]
    assert now != taken
    assert result.notes == (
        f"network lab: {pinned} was taken by b's pinned address; a now has {now.split('/')[0]}",
    )
    assert second["meta-data"] != first["meta-data"]  # cloud-init applies the new address


def test_up_prints_the_notes(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from qvm.cli.commands.vm import _say_started

    run = RunDir(tmp_path / "a")
    note = "network lab: 10.70.211.1 was taken by b's pinned address; a now has 10.70.211.3"
    result = UpResult("a", False, 7, "tcg", "test", run.serial_log, run.qmp_socket, True, (note,))
    _say_started(result, run)
    assert capsys.readouterr().out.splitlines()[-1] == f"  note        {note}"
