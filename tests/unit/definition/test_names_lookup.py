"""Where `qvm new` writes and how a name is found from any folder, without QEMU: `cmdline`
reads the definition and starts nothing. (With real VMs: tests/integration/
test_names_anywhere.py.)"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from qvm.definition.discovery import machine_search_dirs, new_machines_dir

QVM = Path(sys.executable).parent / "qvm"


def test_new_writes_to_the_first_folder_lookup_sees_from_anywhere(tmp_path: Path) -> None:
    home = {"HOME": "/home/me"}
    cwd = tmp_path
    assert new_machines_dir(None, home, cwd) == Path("/home/me/.config/qvm/machines")
    assert new_machines_dir(None, {**home, "XDG_CONFIG_HOME": "/cfg"}, cwd) == Path(
        "/cfg/qvm/machines"
    )
    # a relative XDG_CONFIG_HOME is ignored, as the spec says
    assert new_machines_dir(None, {**home, "XDG_CONFIG_HOME": "cfg"}, cwd) == Path(
        "/home/me/.config/qvm/machines"
    )
    env = {**home, "QVM_MACHINES": f"::~/vms{os.pathsep}/other"}
    assert new_machines_dir(None, env, cwd) == Path("/home/me/vms")
    assert new_machines_dir(Path("here"), env, cwd) == cwd / "here"
    # and lookup searches it
    for explicit, where in ((None, home), (None, env), (Path("here"), env)):
        assert new_machines_dir(explicit, where, cwd) in machine_search_dirs(explicit, where, cwd)


def qvm(cwd: Path, root: Path, *args: str) -> subprocess.CompletedProcess[str]:
    env = dict(os.environ, QVM_STATE_DIR=str(root / "state"), XDG_CONFIG_HOME=str(root / "cfg"))
    env.pop("QVM_MACHINES", None)
    return subprocess.run(
        [str(QVM), *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=60
    )


def test_names_from_anywhere(tmp_path: Path) -> None:
    project, elsewhere = tmp_path / "project", tmp_path / "elsewhere"
    project.mkdir()
    elsewhere.mkdir()
    (project / "vmlinuz").write_bytes(b"")
    kernel = ("--kernel", "vmlinuz", "--no-cloud-init")

    made = qvm(project, tmp_path, "new", "box", *kernel)
    assert made.returncode == 0, made.stderr
    written = tmp_path / "cfg" / "qvm" / "machines" / "box.toml"
    assert made.stdout.splitlines() == [f"box: wrote {written}", "  start it:   qvm up box"]

    local = qvm(project, tmp_path, "--machines", "vms", "new", "local", *kernel)
    assert local.returncode == 0, local.stderr

    for name in ("box", "local"):
        shown = qvm(elsewhere, tmp_path, "cmdline", name)
        assert shown.returncode == 0, shown.stderr
        assert f"-name guest={name}," in shown.stdout
        assert f"{project}/vmlinuz" in shown.stdout

    listed = qvm(elsewhere, tmp_path, "list")
    assert [row.split()[:2] for row in listed.stdout.splitlines()[1:]] == [
        ["box", "stopped"],
        ["local", "stopped"],
    ]

    (project / "vms" / "local.toml").unlink()
    gone = qvm(elsewhere, tmp_path, "up", "local")
    assert gone.returncode == 1
    assert gone.stderr.splitlines() == [
        f"qvm: local: its machine file {project}/vms/local.toml is gone (it was there when "
        "local was last started or made) (hint: put it back, or qvm up path/to/local.toml; "
        "qvm rm local forgets the VM)"
    ]
    assert not (tmp_path / "state" / "local" / "launch.json").exists()

    unknown = qvm(elsewhere, tmp_path, "cmdline", "nobody")
    assert unknown.returncode == 1
    assert unknown.stderr.startswith("qvm: no VM named 'nobody'")


def test_a_mistyped_name_is_not_found_by_any_command(tmp_path: Path) -> None:
    """`qvm status dmeo` said "dmeo: not running" and `qvm rm dmeo` exited 0; every
    command now says the name is unknown, the closest one it knows, and where it looked,
    absolute (a relative folder means nothing in a log read elsewhere)."""
    project = tmp_path / "project"
    (project / "machines").mkdir(parents=True)
    (project / "machines" / "demo.toml").write_text('[memory]\nsize = "128M"\n')
    for argv in (["status", "dmeo"], ["rm", "dmeo"], ["down", "dmeo"], ["ssh", "dmeo"]):
        done = qvm(project, tmp_path, *argv)
        assert done.returncode != 0, argv
        assert done.stderr.startswith(
            f"qvm: no VM named 'dmeo' (did you mean 'demo'?) (looked in: {project}/machines,"
            f" {tmp_path}/cfg/qvm/machines; run dirs in {tmp_path}/state)"
        ), (argv, done.stderr)
    unknown = qvm(project, tmp_path, "rm", "zzzz")
    assert unknown.returncode != 0
    assert "did you mean" not in unknown.stderr
    assert unknown.stderr.endswith("(hint: qvm new zzzz --image FILE, or pass --machines DIR)\n")
    assert qvm(project, tmp_path, "rm", "demo").returncode == 0  # known, never started
