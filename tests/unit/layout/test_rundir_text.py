"""The queries name a run dir and its files as strings (``qvm.layout.rundir``): the same
text as the ``Path``s every other command uses, so output stays what it was."""

from __future__ import annotations

import os
from pathlib import Path, PurePosixPath

import pytest
from hypothesis import given
from hypothesis import strategies as st

from qvm.definition.discovery import (
    list_machine_files,
    machine_file_locations,
    machine_search_dirs,
    machine_search_locations,
    machine_stem,
)
from qvm.layout.rundir import (
    RunDir,
    default_state_dir,
    default_state_location,
    list_run_dirs,
    path_text,
    run_dir_for,
)
from qvm.layout.runfiles import QMP_SOCKET, STATE_FILE

PATHS = st.text(alphabet="/.a~b", max_size=12)


@given(PATHS)
def test_path_text_is_what_pathlib_says(text: str) -> None:
    assert path_text(text) == str(PurePosixPath(text))


@given(PATHS.filter(lambda t: t.startswith("/")), st.sampled_from(["vm1", "a-b_c"]))
def test_a_run_dir_and_its_files_read_as_their_paths(root: str, name: str) -> None:
    run = run_dir_for(root, name)
    assert run == RunDir(Path(root) / name) and hash(run) == hash(RunDir(Path(root) / name))
    assert run.location == str(run.path) == str(Path(root) / name)
    assert run.name == run.path.name == name
    assert run.file(STATE_FILE) == str(run.state_file)
    assert run.file(QMP_SOCKET) == str(run.qmp_socket)


def test_the_state_root_reads_as_its_path(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    for value in ("/tmp//x/", "rel/./dir", "//net/x"):
        monkeypatch.setenv("QVM_STATE_DIR", value)
        assert default_state_location() == str(default_state_dir()) == str(Path(value))
    monkeypatch.delenv("QVM_STATE_DIR")
    monkeypatch.delenv("SLURM_JOB_ID", raising=False)
    monkeypatch.setenv("XDG_STATE_HOME", str(tmp_path) + "/")
    assert default_state_location() == str(default_state_dir()) == str(tmp_path / "qvm")


def test_run_dirs_listed_as_strings_are_the_folders(tmp_path: Path) -> None:
    for name in ("b", "a", "Not-a-name", ".hidden"):
        (tmp_path / name).mkdir()
    (tmp_path / "c").write_text("")
    (tmp_path / "d").symlink_to(tmp_path / "a")
    listed = list_run_dirs(str(tmp_path) + "/")
    assert [run.name for run in listed] == ["a", "b"]
    assert listed == list_run_dirs(tmp_path)
    assert [run.path for run in listed] == [tmp_path / "a", tmp_path / "b"]


def test_machine_files_listed_as_strings_are_the_paths(tmp_path: Path) -> None:
    home, cwd = tmp_path / "home", tmp_path / "cwd"
    for folder in (cwd / "machines", home / "vms", home / ".config/qvm/machines"):
        folder.mkdir(parents=True)
    for name in ("vm2.toml", "a.b.toml", ".lock.toml", "x.txt"):
        (cwd / "machines" / name).write_text("")
    (home / "vms" / "vm2.toml").write_text("")
    (home / "vms" / "vm1.toml").write_text("")
    env = {"HOME": str(home), "QVM_MACHINES": os.pathsep.join(["~/vms", "", "rel//"])}
    for explicit in (None, Path("given/"), Path("~/vms")):
        dirs = machine_search_dirs(explicit, env, cwd)
        assert machine_search_locations(explicit, env, str(cwd)) == [str(d) for d in dirs]
        files = list_machine_files(dirs)
        assert machine_file_locations([str(d) for d in dirs]) == [str(f) for f in files]
        assert [machine_stem(str(f)) for f in files] == [f.stem for f in files]
    assert [f.name for f in files] == ["a.b.toml", "vm1.toml", "vm2.toml"]
