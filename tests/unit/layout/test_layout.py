"""VM names and run dirs: a name is checked before it becomes a path, and a run dir that
is a link, someone else's or open to others is refused before qvm writes in it."""

from __future__ import annotations

import os
import re
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from qvm.errors import HostError, UnsafeStateError, VmNameError
from qvm.layout.names import NAME_PATTERN, check_vm_name, is_vm_name, shown
from qvm.layout.rundir import RunDir, list_run_dirs, run_dir_for


@pytest.mark.parametrize(
    "name", ["..", ".", "", "a/b", "../x", "/etc", "A", "-x", "x" * 64, "a\0b", "vm 1", "é"]
)
def test_names_that_are_no_vm_names_are_refused_before_a_path_exists(name: str) -> None:
    with pytest.raises(VmNameError, match="is not a VM name"):
        run_dir_for(Path("/state"), name)


@given(st.text(max_size=80))
def test_any_accepted_name_stays_one_level_below_the_state_root(text: str) -> None:
    try:
        name = check_vm_name(text)
    except VmNameError as error:
        assert len(str(error)) < 200  # a huge name is not echoed whole
        return
    run = run_dir_for(Path("/state"), name)
    assert run.path.parent == Path("/state")
    assert run.path.name == text not in (".", "..")


NAME_ALPHABET = "abcxyz0189_-AZ./ \0é\n"


@given(
    st.text(alphabet=NAME_ALPHABET, max_size=70)
    | st.text(max_size=70)
    | st.sampled_from(["a" * 63, "a" * 64, "0", "_", "-a", "a-", "a_b", "a\n"])
)
def test_the_name_check_is_the_name_pattern(text: str) -> None:
    assert is_vm_name(text) == (re.fullmatch(NAME_PATTERN, text) is not None)


def test_a_huge_bad_name_is_cut_in_the_message() -> None:
    with pytest.raises(VmNameError) as caught:
        check_vm_name("x/" * 5_000_000)
    assert len(str(caught.value)) < 200
    assert shown("abc") == "'abc'"


def test_create_makes_state_root_and_run_dir_private_whatever_the_umask(tmp_path: Path) -> None:
    old = os.umask(0)
    try:
        RunDir(tmp_path / "state" / "vm1").create()
    finally:
        os.umask(old)
    assert (tmp_path / "state").stat().st_mode & 0o777 == 0o700
    assert (tmp_path / "state" / "vm1").stat().st_mode & 0o777 == 0o700


def test_a_symlinked_run_dir_is_refused_and_its_target_untouched(tmp_path: Path) -> None:
    state = tmp_path / "state"
    state.mkdir(mode=0o700)
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir(mode=0o755)
    (state / "vm1").symlink_to(elsewhere)
    with pytest.raises(UnsafeStateError, match="symbolic link"):
        RunDir(state / "vm1").create()
    assert elsewhere.stat().st_mode & 0o777 == 0o755
    assert list_run_dirs(state) == []


def test_a_state_root_writable_by_others_is_refused(tmp_path: Path) -> None:
    state = tmp_path / "state"
    state.mkdir()
    state.chmod(0o777)
    with pytest.raises(UnsafeStateError, match="writable by others"):
        RunDir(state / "vm1").create()
    assert not (state / "vm1").exists()


def test_a_state_dir_that_is_a_file_is_one_clear_error(tmp_path: Path) -> None:
    with pytest.raises(UnsafeStateError, match="/dev/null is not a folder"):
        RunDir(Path("/dev/null/vm1")).create()
    (tmp_path / "file").write_text("")
    with pytest.raises(UnsafeStateError, match="not a folder"):
        RunDir(tmp_path / "file" / "vm1").create()
    with pytest.raises(HostError, match="cannot create it"):
        RunDir(Path("/proc/no-such-dir/vm1")).create()


def test_a_run_dir_of_another_user_is_refused(tmp_path: Path) -> None:
    if os.geteuid() == 0:  # root can make one: chown it away
        state = tmp_path / "state"
        (state / "vm1").mkdir(parents=True, mode=0o700)
        state.chmod(0o700)
        os.chown(state / "vm1", 12345, 12345)
        foreign, owner = state / "vm1", 12345
    else:  # anyone else finds one: root's
        foreign, owner = Path("/usr"), 0
    with pytest.raises(UnsafeStateError, match=f"belongs to uid {owner}"):
        RunDir(foreign).create()
