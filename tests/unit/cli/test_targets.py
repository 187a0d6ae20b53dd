"""What a command about several VMs acts on (qvm.cli.targets) and how it reports
(qvm.cli.several): names, @GROUP and --all resolved, each VM once in the order first
named, mistakes exit 2; failures said, counted and listed in the JSON in order."""

from __future__ import annotations

import json
import os
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from qvm.cli import resolve, targets
from qvm.cli.several import Several
from qvm.errors import EXIT_USAGE, DefinitionError, NotRunningError, UsageError

MACHINES = {
    "web1": 'group = "web"\n',
    "web2": 'group = "web"\n[cpu]\ncount = 1\n',
    "db1": 'group = "db"\n',
    "lone": "",
    # named otherwise than its file: its path is what finds it
    "file-name": 'name = "other"\ngroup = "web"\n',
    # a member with another problem is still one: acting on it says the problem
    "broken": 'group = "db"\n[cpu]\ncount = "many"\n',
    "not-toml": 'group = "web"\n[[[',
}


@pytest.fixture
def machines(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Path]:
    folder = tmp_path / "machines"
    folder.mkdir()
    for name, text in MACHINES.items():
        (folder / f"{name}.toml").write_text(text)
    state = tmp_path / "state"
    state.mkdir(mode=0o700)
    monkeypatch.setenv("QVM_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.setenv("QVM_MACHINES", "")
    monkeypatch.chdir(tmp_path / "state")  # no ./machines
    resolve.configure(folder, state)
    yield folder
    resolve.configure(None, None)


def test_a_group_is_its_members_in_the_order_of_their_files(machines: Path) -> None:
    assert targets.targets(["@web"], False) == (
        (str(machines / "file-name.toml"), "web1", "web2"),
        True,
    )
    assert targets.targets(["@db"], False).specs == ("broken", "db1")


def test_names_and_groups_mix_each_vm_once_in_the_order_first_named(machines: Path) -> None:
    found = targets.targets(["web2", "@web", "lone", "web2", "@db"], False)
    assert found.specs == (
        "web2",
        str(machines / "file-name.toml"),
        "web1",
        "lone",
        "broken",
        "db1",
    )
    # one name by itself is not "several": its JSON stays the one object
    assert targets.targets(["web1"], False) == (("web1",), False)
    assert targets.targets(["web1", "web1"], False) == (("web1",), True)


@given(st.lists(st.sampled_from(["a", "b", "c", "d"]), min_size=1, max_size=12))
def test_names_are_kept_once_in_first_order(names: list[str]) -> None:
    assert list(targets.targets(names, False).specs) == list(dict.fromkeys(names))


def test_all_is_every_machine_file_for_up_and_every_live_supervisor_otherwise(
    machines: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    assert targets.targets(None, True, defined=True).specs == (
        "broken",
        "db1",
        str(machines / "file-name.toml"),
        "lone",
        "not-toml",
        "web1",
        "web2",
    )
    state = resolve.state_root()
    for name in ("web1", "gone", "db1"):
        (state / name).mkdir(mode=0o700)
    alive = {"web1", "db1"}
    monkeypatch.setattr("qvm.supervisor.client.supervisor_alive", lambda run: run.name in alive)
    assert targets.targets([], True) == (("db1", "web1"), True)


@pytest.mark.parametrize(
    ("names", "every", "message"),
    [
        (["@nosuch"], False, "no machine is in group 'nosuch' (looked in: {machines}"),
        (["@Bad!"], False, "@'Bad!': not a group name"),
        (["web1"], True, "--all: names given too ('web1')"),
        ([], False, "name a VM, a group (@GROUP), or give --all for every running VM"),
        (None, False, "name a VM, a group (@GROUP), or give --all"),
    ],
)
def test_mistakes_in_naming_are_usage_errors(
    machines: Path, names: list[str] | None, every: bool, message: str
) -> None:
    with pytest.raises(UsageError) as raised:
        targets.targets(names, every)
    assert raised.value.exit_code == EXIT_USAGE
    assert str(raised.value).startswith(message.format(machines=machines)), str(raised.value)
    assert "\n" not in str(raised.value)


def test_a_machine_file_named_at_something_is_a_path_not_a_group(machines: Path) -> None:
    assert targets.targets(["@x.toml"], False).specs == ("@x.toml",)


# --- how the command reports ------------------------------------------------------------


def test_a_failure_is_said_counted_and_listed_in_order_and_the_highest_status_wins(
    capsys: pytest.CaptureFixture[str],
) -> None:
    delays = {"a": 0.3, "b": 0.0, "c": 0.1, "d": 0.0}

    def work(name: str) -> str:
        time.sleep(delays[name])
        if name == "b":
            raise NotRunningError("b")
        if name == "d":
            raise DefinitionError(
                [],
            )
        return name.upper()

    several = Several(["a", "b", "c", "d"], False, None)
    done = []
    for spec, result in several.run(work, "doing"):
        done.append(spec)
        several.record(spec, {"name": spec, "result": result})
    assert done == ["c", "a"]  # as they finished
    with pytest.raises(SystemExit) as exited:
        several.finish(as_json=True)
    assert exited.value.code == EXIT_USAGE  # the DefinitionError's 2 over the 1
    out, err = capsys.readouterr()
    listed = json.loads(out)
    assert [entry["name"] for entry in listed] == ["a", "b", "c", "d"]  # as named
    assert listed[0] == {"name": "a", "result": "A"}
    assert listed[1]["exit_code"] == 1 and "not running" in listed[1]["error"]
    assert listed[3]["exit_code"] == EXIT_USAGE
    lines = err.splitlines()
    assert lines[0].startswith("qvm: b") and lines[-1] == "qvm: 2 of 4 failed: b, d"


def test_one_vm_by_itself_keeps_its_object_and_its_error(
    capsys: pytest.CaptureFixture[str],
) -> None:
    several = Several(["a"], False, None, single_object=True)
    for spec, result in several.run(lambda name: name * 2, "doing"):
        several.record(spec, {"name": spec, "twice": result})
    several.finish(as_json=True)
    assert json.loads(capsys.readouterr().out) == {"name": "a", "twice": "aa"}
    failing = Several(["a"], False, None, single_object=True)

    def fail(name: str) -> None:
        raise NotRunningError(name)

    with pytest.raises(NotRunningError):  # the command's own error, as before
        list(failing.run(fail, "doing"))


def test_jobs_below_one_is_a_usage_error() -> None:
    with pytest.raises(UsageError, match="--jobs: must be at least 1, got 0"):
        Several(["a", "b"], False, 0)


def test_all_finding_nothing_says_so_and_succeeds(
    machines: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    several = Several(None, True, None)
    assert list(several.run(lambda name: name, "doing")) == []
    several.finish(as_json=True)
    out, err = capsys.readouterr()
    assert json.loads(out) == [] and err == "qvm: --all: no VM runs\n"
    assert os.listdir(resolve.state_root()) == []
