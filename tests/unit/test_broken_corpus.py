"""The corpus of broken machine files (tests/data/broken/, one problem each, said in its
first comment line) through the real CLI: `cmdline`, `up` and `list`.

Each file gives qvm's own lines, one per problem, each naming the file and bounded in
length, a non-zero exit and no traceback; `up` fails before QEMU starts, so nothing runs
and no run dir says running; `list` exits 0 and shows the machine as invalid, naming the
file. No VM boots: this is a fast test.
"""

from __future__ import annotations

import json
import os
import shutil
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
from framework.harness import REPO, Qvm, short_tmpdir

CORPUS = REPO / "tests" / "data" / "broken"
FILES = sorted(CORPUS.glob("*.toml"))
MAX_LINE = 400


@pytest.fixture(scope="module")
def corpus_qvm() -> Qvm:
    root = short_tmpdir()
    qvm = Qvm(root)
    shutil.copytree(CORPUS, qvm.machines_dir)
    yield qvm
    shutil.rmtree(root, ignore_errors=True)


def _problem_lines(stderr: str, path: Path) -> list[str]:
    """The lines of one file's DefinitionError: the first with "qvm: ", all naming it."""
    lines = stderr.strip().splitlines()
    assert lines, "no message"
    assert "Traceback" not in stderr, stderr
    assert lines[0].startswith(f"qvm: {path}: "), lines[0][:300]
    for line in lines[1:]:
        assert line.startswith(f"{path}: "), line[:300]
    for line in lines:
        assert len(line) <= MAX_LINE, line[:300]
        assert line.isprintable(), repr(line[:300])
    return lines


def test_the_corpus_is_big_and_says_what_is_broken() -> None:
    assert len(FILES) >= 50
    for path in FILES:
        first = path.read_bytes().split(b"\n", 1)[0]
        assert first.startswith(b"# broken: "), path.name
        assert path.stat().st_size < 40_000, path.name


def test_cmdline_refuses_each_file(corpus_qvm: Qvm) -> None:
    paths = [corpus_qvm.machines_dir / p.name for p in FILES]
    with ThreadPoolExecutor(4) as pool:
        results = list(pool.map(lambda p: corpus_qvm("cmdline", str(p), check=False), paths))
    for path, done in zip(paths, results, strict=True):
        assert done.returncode != 0, path.name
        assert done.stdout == "", path.name
        _problem_lines(done.stderr, path)


def test_up_refuses_each_file_before_qemu_starts(corpus_qvm: Qvm) -> None:
    paths = [str(corpus_qvm.machines_dir / p.name) for p in FILES]
    done = corpus_qvm("up", *paths, check=False)
    assert done.returncode != 0
    assert "Traceback" not in done.stderr
    # one block of lines per file, as each is refused (they are checked at once), each
    # file's lines naming it; then the count of the failed
    lines = done.stderr.strip().splitlines()
    assert lines.pop().startswith(f"qvm: {len(paths)} of {len(paths)} failed: ")
    starts = [i for i, line in enumerate(lines) if line.startswith("qvm: ")]
    assert len(starts) == len(paths), done.stderr[:2000]
    blocks = {}
    for start, end in zip(starts, [*starts[1:], len(lines)], strict=True):
        path = next(p for p in paths if lines[start].startswith(f"qvm: {p}: "))
        blocks[path] = _problem_lines("\n".join(lines[start:end]), Path(path))
    assert sorted(blocks) == sorted(paths)
    # nothing ran: no run dir says running, no process holds the state dir
    state = corpus_qvm.state_dir
    for record in state.glob("*/state.json") if state.exists() else []:
        assert json.loads(record.read_text()).get("state") != "running", record
    assert not _processes_mentioning(str(state))


def test_list_shows_each_file_invalid(corpus_qvm: Qvm) -> None:
    done = corpus_qvm("list", "--json", check=False)
    assert done.returncode == 0, done.stderr
    assert "Traceback" not in done.stderr
    rows = {row["name"]: row for row in json.loads(done.stdout)}
    for path in FILES:
        row = rows.get(path.stem)
        assert row is not None, path.stem
        assert row["state"] == "invalid", (path.stem, row)
        error = row["error"]
        assert error.startswith(f"{corpus_qvm.machines_dir / path.name}: "), error[:300]
        assert "\n" not in error and len(error) <= MAX_LINE, error[:300]
    table = corpus_qvm("list").stdout
    assert table.count(" invalid ") >= len(FILES)


def _processes_mentioning(text: str) -> list[int]:
    found = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            cmdline = Path(f"/proc/{entry}/cmdline").read_bytes()
        except OSError:
            continue
        if text.encode() in cmdline:
            found.append(int(entry))
    return found
