"""The linters as tests (Firecracker's ``integration_tests/style``): a wrong import, a new
import circle, a lint or format error or a type error fails `pytest` alone, not only
`scripts/test`.

The import contracts live in pyproject.toml (``[tool.importlinter]``), the layers of
../shared/architecture.md; the tests here also check that the hand-written module lists in
those contracts still name every module they are meant to cover.
"""

from __future__ import annotations

import re
import subprocess
import sys
import tomllib
from pathlib import Path
from typing import Any

import pytest

REPO = Path(__file__).resolve().parents[2]
BIN = Path(sys.executable).parent


def run_tool(name: str, *args: str) -> subprocess.CompletedProcess[str]:
    tool = BIN / name
    if not tool.exists():
        pytest.fail(f"{tool} is missing: run scripts/setup (the test extra installs it)")
    return subprocess.run([str(tool), *args], cwd=REPO, capture_output=True, text=True, timeout=120)


def test_ruff() -> None:
    done = run_tool("ruff", "check", "--no-cache", "qvm", "tests", "scripts")
    assert done.returncode == 0, done.stdout + done.stderr


def test_format() -> None:
    done = run_tool("ruff", "format", "--check", "--no-cache", "qvm", "tests", "scripts")
    assert done.returncode == 0, done.stdout + done.stderr


def test_types() -> None:
    """mypy --strict over qvm/ ([tool.mypy] in pyproject.toml), every record's
    construction included (``Record`` is a ``dataclass_transform``)."""
    done = run_tool("mypy")
    assert done.returncode == 0, done.stdout + done.stderr


def test_import_contracts() -> None:
    done = run_tool("lint-imports", "--no-cache", "--no-logo")
    assert done.returncode == 0, done.stdout + done.stderr


def contracts() -> dict[str, dict[str, Any]]:
    config = tomllib.loads((REPO / "pyproject.toml").read_text())["tool"]["importlinter"]
    return {contract["name"]: contract for contract in config["contracts"]}


def modules(package: str) -> set[str]:
    """The modules and packages directly inside ``package`` (``qvm.cli`` -> ``qvm.cli.app``...)."""
    folder = REPO.joinpath(*package.split("."))
    names = {p.stem for p in folder.glob("*.py") if p.name != "__init__.py"}
    names |= {p.name for p in folder.iterdir() if (p / "__init__.py").exists()}
    return {f"{package}.{name}" for name in names}


LAYERS = modules("qvm")


def test_the_layers_contract_names_every_layer() -> None:
    (layers,) = (c for c in contracts().values() if c["type"] == "layers")
    named = {m.strip() for layer in layers["layers"] for m in layer.split("|")}
    assert named == LAYERS


@pytest.mark.parametrize(
    ("contract", "allowed"),
    [
        ("typer and click only in qvm.cli.parsing", "qvm.cli.parsing"),
        ("asyncio and qemu.qmp only in qvm.supervisor", "qvm.supervisor"),
        ("psutil only in qvm.host", "qvm.host"),
    ],
)
def test_a_framework_fence_covers_all_but_its_package(contract: str, allowed: str) -> None:
    """A new module must not slip past a fence because its list was written by hand."""
    sources = set(contracts()[contract]["source_modules"])
    # a package listed as a source covers everything inside it
    expected = set(LAYERS)
    parent = allowed.rsplit(".", 1)[0]
    while parent != "qvm":
        expected = (expected - {parent}) | modules(parent)
        parent = parent.rsplit(".", 1)[0]
    assert sources == expected - {allowed}


def test_only_the_supervisors_client_and_wire_are_public() -> None:
    forbidden = set(
        contracts()["qvm.cli and qvm.control use only the supervisor's client and wire"][
            "forbidden_modules"
        ]
    )
    public = {
        "qvm.supervisor.client",
        "qvm.supervisor.wire",
        "qvm.supervisor.agent_wire",
        "qvm.supervisor.qmp_replies",
    }
    assert forbidden == modules("qvm.supervisor") - public


def test_no_two_test_files_share_a_name() -> None:
    """pytest imports test modules by basename (no packages here): two files of one name
    stop the whole run at collection."""
    names = [path.name for path in (REPO / "tests").rglob("test_*.py")]
    assert sorted({n for n in names if names.count(n) > 1}) == []


def unexplained_lazy_imports(lines: list[str]) -> list[int]:
    """The line numbers of ``# noqa: PLC0415`` that give no reason: neither ``-- why`` on
    the line, nor a comment just above the group of imports it belongs to."""
    found = []
    for index, line in enumerate(lines):
        if "noqa: PLC0415" not in line or re.search(r"noqa: PLC0415\s+--\s+\S", line):
            continue
        above = index - 1
        while above >= 0 and ("PLC0415" in lines[above] or not lines[above].strip()):
            above -= 1
        if above < 0 or not lines[above].lstrip().startswith("#"):
            found.append(index + 1)
    return found


def test_every_import_inside_a_function_outside_the_cli_says_why() -> None:
    """ruff's PLC0415 flags them; the noqa must come with the reason (start-up, the
    supervisor's memory, a circle it would make), not just silence the rule."""
    bare = [
        f"{path.relative_to(REPO)}:{number}"
        for path in (REPO / "qvm").rglob("*.py")
        if path.relative_to(REPO / "qvm").parts[0] != "cli"
        for number in unexplained_lazy_imports(path.read_text().splitlines())
    ]
    assert bare == []


def test_a_lazy_import_without_a_reason_is_found() -> None:
    lines = [
        "def f():",
        "    # the supervisor's RSS: only when a client asks",
        "    import json  # noqa: PLC0415",
        "    import socket  # noqa: PLC0415",
        "    x = 1",
        "    import ssl  # noqa: PLC0415",
        "    import os  # noqa: PLC0415 -- start-up: only this path",
    ]
    assert unexplained_lazy_imports(lines) == [6]


def test_the_unit_tests_mirror_qvms_packages() -> None:
    """tests/unit/PACKAGE/ holds the tests of qvm/PACKAGE/; what spans the layers (the
    linters, the docs, the JSON contract, bad input through the CLI) stays in tests/unit."""
    unit = REPO / "tests" / "unit"
    folders = {p.name for p in unit.iterdir() if p.is_dir() and p.name != "__pycache__"}
    packages = {p.name for p in (REPO / "qvm").iterdir() if (p / "__init__.py").exists()}
    assert folders == packages
    assert all(any((unit / name).glob("test_*.py")) for name in folders)


def test_the_supervisor_runs_without_pathlib() -> None:
    """pathlib would be 0.67 MiB of the supervisor's RSS (qvm.layout.runfiles): every
    module it imports to start and to answer, by the same path the supervisor takes."""
    code = (
        "import sys\n"
        "from qvm.supervisor.__main__ import load_asyncio_without_tls\n"
        "load_asyncio_without_tls()\n"
        "import qvm.supervisor.process, qvm.supervisor.relay, qvm.supervisor.agent_proxy\n"
        "import qvm.supervisor.agent_shutdown\n"
        "print(sorted(m for m in sys.modules if m.split('.')[0] in ('pathlib', 'qvm')))\n"
    )
    done = subprocess.run(
        [sys.executable, "-c", code], cwd="/", capture_output=True, text=True, timeout=60
    )
    assert done.returncode == 0, done.stderr
    assert "'qvm.supervisor.relay'" in done.stdout
    assert "pathlib" not in done.stdout
