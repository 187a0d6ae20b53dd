"""[[share]] and memory.shared in a machine file: every bad input is one problem naming the
key, and the guest path rule holds for any text (hypothesis)."""

from __future__ import annotations

from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from qvm.definition.host_checks import check_host
from qvm.definition.load import guest_path_problem, load_machine
from qvm.definition.schema import ShareSpec, shared_memory
from qvm.errors import DefinitionError


def load(tmp_path: Path, text: str) -> object:
    path = tmp_path / "vm1.toml"
    path.write_text(text)
    return load_machine(path)


def problems(tmp_path: Path, text: str) -> list[str]:
    with pytest.raises(DefinitionError) as caught:
        load(tmp_path, text)
    return [str(problem) for problem in caught.value.problems]


def test_a_share_reads_relative_to_the_file_and_makes_the_memory_shared(tmp_path: Path) -> None:
    machine = load_machine_text(tmp_path, '[[share]]\nhost = "data"\nguest = "/mnt/data"\n')
    assert machine.shares == (ShareSpec(tmp_path / "data", "/mnt/data"),)
    assert shared_memory(machine)
    nine = load_machine_text(tmp_path, '[[share]]\nhost = "d"\nguest = "/d"\nvia = "9p"\n')
    assert not shared_memory(nine)
    assert shared_memory(load_machine_text(tmp_path, "[memory]\nshared = true\n"))


def load_machine_text(tmp_path: Path, text: str) -> object:
    return load(tmp_path, text)


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ('[[share]]\nguest = "/mnt/x"', "share[0].host: is required"),
        ('[[share]]\nhost = "d"', "share[0].guest: is required"),
        ('[[share]]\nhost = "d"\nguest = "mnt/x"', "share[0].guest: must be an absolute path"),
        ('[[share]]\nhost = "d"\nguest = "/"', "share[0].guest: must not be the guest's root"),
        ('[[share]]\nhost = "d"\nguest = "/a/../b"', "share[0].guest: must be a plain path"),
        ('[[share]]\nhost = "d"\nguest = "/a b"', "share[0].guest: must be at most 255"),
        ('[[share]]\nhost = "d"\nguest = "/x"\nvia = "nfs"', "share[0].via: must be one of"),
        ('[[share]]\nhost = "a,b"\nguest = "/x"', "share[0].host: must not contain a comma"),
        ('[[share]]\nhost = "d"\nguest = "/x"\nreadonly = 1', "share[0].readonly: must be"),
        ('[[share]]\nhost = "d"\nguest = "/x"\nmode = "ro"', "share[0].mode: unknown key"),
        (
            '[[share]]\nhost = "d"\nguest = "/x"\n[[share]]\nhost = "e"\nguest = "/x/"',
            'share[1].guest: already mounted by share[0].guest, got "/x/"',
        ),
        (
            '[machine]\ntype = "microvm"\n[[share]]\nhost = "d"\nguest = "/x"',
            "share[0]: not supported on microvm",
        ),
        ('[share]\nhost = "d"', "share: must be an array of tables"),
    ],
)
def test_bad_shares_are_one_problem_naming_the_key(tmp_path: Path, text: str, message: str) -> None:
    (found,) = problems(tmp_path, text + "\n")
    assert found.startswith(f"{tmp_path / 'vm1.toml'}: {message}"), found


def test_the_host_folder_must_exist_and_be_a_folder_at_up(tmp_path: Path) -> None:
    (tmp_path / "file").write_text("")
    machine = load(
        tmp_path,
        '[[share]]\nhost = "gone"\nguest = "/a"\n[[share]]\nhost = "file"\nguest = "/b"\n',
    )
    found = [str(p) for p in check_host(machine, ("max",), ("q35",))]  # type: ignore[arg-type]
    file = tmp_path / "vm1.toml"
    assert found[0] == (
        f'{file}: share[0].host: folder not found, got "{tmp_path}/gone" (hint: check the path)'
    )
    assert found[1] == (
        f'{file}: share[1].host: is not a folder, got "{tmp_path}/file" (hint: check the path)'
    )
    assert len(found) == 2  # root here: virtiofs may run


@given(st.text(max_size=80))
def test_an_accepted_guest_path_is_absolute_plain_and_quiet(text: str) -> None:
    if guest_path_problem(text) is not None:
        return
    assert text.startswith("/") and text.strip("/")
    parts = text.strip("/").split("/")
    assert all(part not in ("", ".", "..") for part in parts)
    assert not any(c.isspace() or ord(c) < 32 or c == "\\" for c in text)


@given(st.lists(st.sampled_from(["a", "b1", "..", ".", ""]), min_size=1, max_size=5))
def test_a_path_with_dots_or_empty_parts_is_refused(parts: list[str]) -> None:
    path = "/" + "/".join(parts)
    inner = path.strip("/").split("/")  # a trailing "/" is no part: "/a/" is "/a"
    plain = all(part not in ("", ".", "..") for part in inner)
    assert (guest_path_problem(path) is None) == plain
    assert guest_path_problem(path.lstrip("/")) is not None  # relative: never
