"""Shell completion, tried in a real bash: the script `qvm --show-completion bash` prints
is sourced, the line is set as bash sets it on TAB (COMP_LINE, COMP_POINT, COMP_WORDS,
COMP_CWORD, with bash's own word breaks), and the completion function runs the real
`qvm`. Device ids come from run-dir records written here, as qvm writes them; nothing
starts QEMU. zsh and fish scripts are checked by their own shells: scripts/setup
installs them as root, and in CI (CI set) a missing one fails the test instead of skipping it.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from framework.completion import BASH_DRIVER
from framework.fake_qmp import state_json

QVM = Path(sys.executable).parent / "qvm"


def env_for(tmp_path: Path) -> dict[str, str]:
    return dict(
        os.environ,
        QVM=str(QVM),
        PATH=f"{QVM.parent}{os.pathsep}{os.environ.get('PATH', '')}",
        QVM_MACHINES=str(tmp_path / "machines"),
        QVM_STATE_DIR=str(tmp_path / "state"),
        XDG_CONFIG_HOME=str(tmp_path / "config"),
        HOME=str(tmp_path / "home"),
    )


def run_in(tmp_path: Path, argv: list[str], **env: str) -> subprocess.CompletedProcess[str]:
    """``argv`` run in ``tmp_path`` with its environment (``env_for``, and ``env``)."""
    return subprocess.run(
        argv,
        env={**env_for(tmp_path), **env},
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=60,
    )


def bash_complete(line: str, tmp_path: Path) -> list[str]:
    done = run_in(tmp_path, ["bash", "--norc", "--noprofile", "-c", BASH_DRIVER], LINE=line)
    assert done.returncode == 0, done.stderr
    return [word for word in done.stdout.splitlines() if word]


@pytest.fixture
def vms(tmp_path: Path) -> Path:
    """Two machine files, and a run dir of a third VM (its file elsewhere) that runs with
    hotplugged devices and a forward added at run time, as its records say."""
    machines = tmp_path / "machines"
    machines.mkdir()
    for name in ("alpha", "beta"):
        (machines / f"{name}.toml").write_text("[cpu]\ncount = 1\n")
    run = tmp_path / "state" / "gamma"
    run.mkdir(parents=True, mode=0o700)
    os.chmod(tmp_path / "state", 0o700)
    this_run = {"qemu_pid": 4242, "qemu_start_time": 1234}
    (run / "state.json").write_text(json.dumps(state_json(4242, 1234, name="gamma")))
    argv = [
        "qemu-system-x86_64",
        "-smp", "1,sockets=1,cores=4,threads=1,maxcpus=4",
        "-device", "max-x86_64-cpu,id=cpu1,socket-id=0,core-id=1,thread-id=0",
        "-blockdev", "driver=qcow2,node-name=disk0,file=disk0-file",
        "-device", "virtio-blk-pci,drive=disk0,id=disk0",
        "-device", "virtio-blk-pci,drive=cidata,id=cidata",
        "-device", "virtio-net-pci,netdev=net0,mac=52:54:00:12:34:56,id=net0",
    ]  # fmt: skip
    forward = {"nic": "net0", "proto": "tcp", "host_addr": "127.0.0.1", "guest_port": 22}
    (run / "launch.json").write_text(
        json.dumps(
            {
                "name": "gamma",
                "argv": argv,
                "vcpus_boot": 2,
                "vcpus_max": 4,
                "nics": ["net0"],
                "forwards": [{**forward, "host_port": 2222}],
            }
        )
    )
    devices = [
        {"id": "dimm0", "kind": "dimm", "cleanup": []},
        {"id": "vmem0", "kind": "virtio-mem", "cleanup": []},
        {"id": "hot1", "kind": "disk", "cleanup": []},
        {"id": "nic1", "kind": "nic", "cleanup": []},
    ]
    (run / "devices.json").write_text(json.dumps({**this_run, "devices": devices}))
    forwards = [{**forward, "host_port": 2222}, {**forward, "host_port": 8080, "guest_port": 80}]
    (run / "forwards.json").write_text(json.dumps({**this_run, "forwards": forwards}))
    return tmp_path


def test_bash_completes_command_words_and_groups(tmp_path: Path) -> None:
    words = bash_complete("qvm ", tmp_path)
    assert {"up", "down", "status", "list", "agent", "cpu", "mem", "disk", "nic", "port"} <= set(
        words
    )
    assert bash_complete("qvm sta", tmp_path) == ["status"]
    assert set(bash_complete("qvm cpu ", tmp_path)) >= {"list", "add", "del", "set"}
    assert bash_complete("qvm disk det", tmp_path) == ["detach"]


def test_bash_completes_options(tmp_path: Path) -> None:
    assert {"--timeout", "--force", "--json"} <= set(bash_complete("qvm down --", tmp_path))
    assert bash_complete("qvm down --fo", tmp_path) == ["--force"]
    assert {"--machines", "--state-dir", "--version", "--show-completion"} <= set(
        bash_complete("qvm --", tmp_path)
    )


def test_bash_completes_vm_names_from_files_and_run_dirs(vms: Path) -> None:
    assert bash_complete("qvm up ", vms) == ["alpha", "beta", "gamma"]
    assert bash_complete("qvm status g", vms) == ["gamma"]
    assert bash_complete("qvm cpu add a", vms) == ["alpha"]
    assert bash_complete("qvm down alpha ", vms) == ["alpha", "beta", "gamma"]
    # a new machine's name must not exist yet: nothing to offer (bash falls back to files)
    assert bash_complete("qvm new ", vms) == []


def test_commands_about_several_vms_complete_groups_and_all(vms: Path) -> None:
    (vms / "machines" / "beta.toml").write_text('group = "web"\n[cpu]\ncount = 1\n')
    (vms / "machines" / "zeta.toml").write_text('group = "db"\n')
    assert bash_complete("qvm up ", vms) == ["alpha", "beta", "gamma", "zeta", "@db", "@web"]
    assert bash_complete("qvm down @", vms) == ["@db", "@web"]
    assert bash_complete("qvm snapshot save @w", vms) == ["@web"]
    assert bash_complete("qvm status --a", vms) == ["--all"]
    assert "--jobs" in bash_complete("qvm kill --", vms)
    # a command about one VM takes no group
    assert bash_complete("qvm logs @", vms) == []


def test_global_machines_option_is_followed(vms: Path) -> None:
    other = vms / "other"
    other.mkdir()
    (other / "delta.toml").write_text("")
    assert "delta" in bash_complete(f"qvm --machines {other} up ", vms)


def test_bash_completes_each_commands_device_ids(vms: Path) -> None:
    # vCPUs come from QEMU itself (tests/integration/test_completion_live.py): none here
    assert bash_complete("qvm cpu del gamma ", vms) == []
    assert bash_complete("qvm mem del gamma ", vms) == ["dimm0", "vmem0"]
    assert bash_complete("qvm mem resize gamma ", vms) == ["vmem0"]
    assert bash_complete("qvm disk detach gamma ", vms) == ["disk0", "hot1"]
    assert bash_complete("qvm nic del gamma ", vms) == ["net0", "nic1"]
    assert bash_complete("qvm nic del gamma n", vms) == ["net0", "nic1"]
    # a VM with no run dir, or no records: nothing, and no traceback in the prompt
    assert bash_complete("qvm nic del alpha ", vms) == []


def save_snapshots(vms: Path, name: str, tags: list[str]) -> None:
    """``snapshots.json`` in ``name``'s run dir, written by qvm's own store."""
    from qvm.layout.rundir import run_dir_for
    from qvm.store.snapshots import DeviceSet, SnapshotRecord, write_snapshots

    run = run_dir_for(vms / "state", name)
    run.path.mkdir(exist_ok=True, mode=0o700)
    records = [
        SnapshotRecord(
            tag=tag,
            created=1.0,
            disk_only=False,
            files=("disk0.qcow2",),
            devices=DeviceSet(cpu_slots=(0,)),
            definition_sha256=None,
            shape={},
        )
        for tag in tags
    ]
    write_snapshots(run, records)


def test_bash_completes_snapshot_tags_from_the_record(vms: Path) -> None:
    tags = ["booted", "before-upgrade", "clean"]
    save_snapshots(vms, "gamma", tags)
    save_snapshots(vms, "alpha", ["alpha-only"])
    assert bash_complete("qvm snapshot restore gamma ", vms) == tags
    assert bash_complete("qvm snapshot rm gamma b", vms) == ["booted", "before-upgrade"]
    assert bash_complete("qvm up gamma --restore ", vms) == tags
    assert bash_complete("qvm up gamma alpha --restore c", vms) == ["clean"]
    assert bash_complete("qvm up alpha gamma --restore ", vms) == ["alpha-only", *tags]
    # no snapshot record, or a broken one: nothing, and no traceback
    assert bash_complete("qvm snapshot restore beta ", vms) == []
    (vms / "state" / "gamma" / "snapshots.json").write_text("{not json")
    assert bash_complete("qvm snapshot rm gamma ", vms) == []


def test_bash_completes_forwards_across_colons(vms: Path) -> None:
    """bash splits `tcp:127.0.0.1:2222:22` at each ":"; the candidates must be the rest."""
    assert bash_complete("qvm port del gamma ", vms) == [
        "tcp:127.0.0.1:2222:22",
        "tcp:127.0.0.1:8080:80",
    ]
    assert bash_complete("qvm port del gamma tcp:127.0.0.1:8", vms) == ["8080:80"]


def test_cp_offers_name_colon_and_local_paths(vms: Path) -> None:
    """Either end of `qvm cp` is NAME:PATH or a local path: both are offered, and a lone
    "NAME:" or "folder/" takes no space after it, so that the path goes on."""
    (vms / "notes.txt").write_text("")
    (vms / "backup").mkdir()
    assert bash_complete("qvm cp ", vms) == [
        "alpha:", "beta:", "gamma:", "backup/", "machines/", "notes.txt", "state/",
    ]  # fmt: skip
    assert bash_complete("qvm cp g", vms) == ["gamma:"]
    assert bash_complete("qvm cp b", vms) == ["beta:", "backup/"]
    assert bash_complete("qvm cp notes.txt ", vms)[:3] == ["alpha:", "beta:", "gamma:"]
    assert bash_complete("qvm cp gamma:/etc/hostname m", vms) == ["machines/"]
    assert bash_complete("qvm cp -r machines/", vms) == [
        "machines/alpha.toml",
        "machines/beta.toml",
    ]
    # a guest path is not listed: bash falls back to its own completion
    assert bash_complete("qvm cp gamma:/et", vms) == []
    script = run_qvm("--show-completion", "bash", tmp_path=vms).stdout
    assert "compopt -o nospace" in script


def test_a_broken_record_offers_nothing(vms: Path) -> None:
    (vms / "state" / "gamma" / "launch.json").write_text("{not json")
    assert bash_complete("qvm disk detach gamma ", vms) == []
    assert bash_complete("qvm up ", vms) == ["alpha", "beta", "gamma"]


def run_qvm(*args: str, tmp_path: Path) -> subprocess.CompletedProcess[str]:
    return run_in(tmp_path, [str(QVM), *args])


def shell_binary(shell: str) -> str:
    """The shell's path; where it is missing the test is skipped, but not in CI, whose
    scripts/setup installs zsh and fish."""
    binary = shutil.which(shell)
    if binary is None:
        if os.environ.get("CI"):
            pytest.fail(f"{shell} is not installed, and scripts/setup installs it in CI")
        pytest.skip(f"{shell} is not installed (scripts/setup installs it as root)")
    return binary


@pytest.mark.parametrize("shell", ["bash", "zsh", "fish"])
def test_each_shells_script_is_produced_and_parses(shell: str, tmp_path: Path) -> None:
    done = run_qvm("--show-completion", shell, tmp_path=tmp_path)
    assert done.returncode == 0, done.stderr
    assert "_QVM_COMPLETE=complete_" + shell in done.stdout
    binary = shell_binary(shell)
    check = [binary, "-n"] if shell != "fish" else [binary, "--no-execute"]
    script = tmp_path / f"qvm.{shell}"
    script.write_text(done.stdout)
    parsed = subprocess.run([*check, str(script)], capture_output=True, text=True)
    assert parsed.returncode == 0, parsed.stderr


def test_install_completion_for_bash(tmp_path: Path) -> None:
    done = run_qvm("--install-completion", "bash", tmp_path=tmp_path)
    assert done.returncode == 0, done.stderr
    installed = tmp_path / "home" / ".bash_completions" / "qvm.sh"
    assert f"installed in {installed}" in done.stdout
    assert "_QVM_COMPLETE=complete_bash" in installed.read_text()
    assert f"source '{installed}'" in (tmp_path / "home" / ".bashrc").read_text()


def test_an_unknown_shell_is_one_line(tmp_path: Path) -> None:
    done = run_qvm("--show-completion", "tcsh", tmp_path=tmp_path)
    assert done.returncode == 2
    assert done.stderr.strip().splitlines() == [
        "qvm: completion: 'tcsh' is not a shell qvm completes "
        "(hint: name one: qvm --show-completion bash|zsh|fish)"
    ]


def test_version_names_qvm_qemu_and_python(tmp_path: Path) -> None:
    done = run_qvm("--version", tmp_path=tmp_path)
    assert done.returncode == 0, done.stderr
    lines = done.stdout.splitlines()
    assert lines[0].startswith("qvm ")
    assert lines[1].startswith("QEMU ") and "qemu-system-x86_64" in lines[1]
    assert lines[2].startswith(f"Python {sys.version_info.major}.{sys.version_info.minor}.")


def test_bare_qvm_prints_help_on_stdout_and_exits_0(tmp_path: Path) -> None:
    done = run_qvm(tmp_path=tmp_path)
    assert done.returncode == 0
    assert done.stdout.startswith("Usage: qvm")
    assert "--install-completion" in done.stdout and "agent" in done.stdout
    assert done.stderr == ""


def shell_script(shell: str, tmp_path: Path) -> Path:
    shell_binary(shell)
    script = tmp_path / f"qvm.{shell}"
    script.write_text(run_qvm("--show-completion", shell, tmp_path=tmp_path).stdout)
    return script


def test_fish_completes_with_the_real_fish(vms: Path) -> None:
    script = shell_script("fish", vms)

    def complete(line: str) -> list[str]:
        done = run_in(vms, ["fish", "--no-config", "-c", f"source {script}; complete -C {line!r}"])
        assert done.returncode == 0, done.stderr
        return [row.split("\t")[0] for row in done.stdout.splitlines()]

    assert complete("qvm sta") == ["status"]
    assert complete("qvm up ") == ["alpha", "beta", "gamma"]
    assert complete("qvm mem del gamma ") == ["dimm0", "vmem0"]
    assert complete("qvm port del gamma tcp:127.0.0.1:8") == ["tcp:127.0.0.1:8080:80"]
    save_snapshots(vms, "gamma", ["booted"])
    assert complete("qvm up gamma --restore ") == ["booted"]


def test_zsh_runs_its_completion_function(vms: Path) -> None:
    """zsh's completion widgets need a terminal; ``_arguments`` is replaced by a function
    that prints what the script hands it, after zsh itself ran the script's function."""
    script = shell_script("zsh", vms)
    driver = (
        f"compdef() {{ : }}; source {script}; "
        "_arguments() { print -r -- $@ }; _files() { print FILES }; "
        'words=(qvm disk detach gamma ""); CURRENT=5; _qvm_completion; '
        'words=(qvm new ""); CURRENT=3; _qvm_completion'
    )
    done = run_in(vms, ["zsh", "-f", "-c", driver])
    assert done.returncode == 0, done.stderr
    assert done.stdout.splitlines() == ['*: :(("disk0" "hot1"))', "FILES"]


def test_version_and_plain_commands_do_not_import_typer(tmp_path: Path) -> None:
    for argv in (["--version"], ["status", "no-such-vm"]):
        done = run_in(tmp_path, [sys.executable, "-X", "importtime", "-m", "qvm.cli", *argv])
        imported = {
            line.rsplit("|", 1)[1].strip() for line in done.stderr.splitlines() if "|" in line
        }
        assert "qvm.cli.parsing.fast" in imported or argv == ["--version"]
        assert not {m for m in imported if m.split(".")[0] in ("typer", "click")}, argv
