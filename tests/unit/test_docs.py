"""The docs (README.md and docs/*.md) against the code: every `qvm ...` line in a code block
parses as the CLI parses it, and every `qvm ...` span in the prose names a command and only
its options; every machine key is documented and every documented key exists; every TOML
example loads as a machine file; every relative link and anchor resolves; every schema file
named exists; docs/design.md's tree names every module, its exit codes are qvm.errors' and
its dependencies pyproject.toml's; docs/json.md's status keys and states are the schema's;
docs/supervision.md's run-dir table names every file qvm makes there."""

from __future__ import annotations

import functools
import re
import shlex
import tomllib
from pathlib import Path

import pytest

from qvm.definition.schema import KEYS

REPO = Path(__file__).resolve().parents[2]
DOCS = [REPO / "README.md", *sorted((REPO / "docs").glob("*.md"))]
FENCE = re.compile(r"^```(\w*)\n(.*?)^```", re.M | re.S)


def code_blocks(text: str) -> list[tuple[str, str]]:
    """(language, body) of each fenced block, and ("", body) of each indented one."""
    blocks = [(m.group(1), m.group(2)) for m in FENCE.finditer(text)]
    unfenced = FENCE.sub("", text)
    for m in re.finditer(r"(?:^(?: {4}|\t).*\n|^\n)+", unfenced, re.M):
        body = "\n".join(line[4:] for line in m.group(0).splitlines())
        if body.strip():
            blocks.append(("", body))
    return blocks


def qvm_lines(text: str) -> list[str]:
    """The `qvm ...` invocations in code blocks (a shell prompt and comments stripped),
    without synopsis lines (``[--json]``, ``NAME...``, ``<x>``)."""
    lines = []
    for language, body in code_blocks(text):
        if language not in ("", "sh", "bash", "console", "shell"):
            continue
        for line in body.splitlines():
            line = line.strip().removeprefix("$ ").strip()
            line = re.split(r"\s+#\s", line)[0]
            for part in re.split(r"\s*(?:&&|\|\||;|\|)\s*", line):
                if part.startswith("qvm ") and not re.search(r"[\[\]<>]|\.\.\.|\$\(", part):
                    lines.append(part)
    return lines


def parses(argv: list[str]) -> str | None:
    """None when the CLI takes ``argv`` (by either parser), else Click's complaint."""
    from qvm.cli.parsing.fast import plain_call

    if plain_call(argv) is not None:
        return None
    import click

    command = click_command()
    try:
        context = command.make_context("qvm", list(argv), resilient_parsing=False)
        args = unparsed(context)
        while isinstance(command, click.Group) and args:
            name, command, args = command.resolve_command(context, args)
            assert command is not None
            context = command.make_context(name, args, parent=context)
            args = unparsed(context) if isinstance(command, click.Group) else []
    except click.exceptions.Exit:
        return None  # --help, --version
    except click.ClickException as error:
        return error.format_message()
    return None


def unparsed(context: object) -> list[str]:
    """A group's words left for its subcommand (Click 8.3 keeps the first apart, and warns
    when ``protected_args`` is read; Click 9 keeps them all in ``args``)."""
    return [*getattr(context, "_protected_args", ()), *context.args]  # type: ignore[attr-defined]


@functools.cache
def click_command() -> object:
    """The whole Typer app as Click sees it, every command registered."""
    import typer

    from qvm.cli.parsing import typer_app

    typer_app.register(None)  # every command, for real
    return typer.main.get_command(typer_app.app)


ALL_LINES = [(doc.name, line) for doc in DOCS for line in qvm_lines(doc.read_text())]


def test_the_docs_show_commands() -> None:
    assert len(ALL_LINES) >= 10, ALL_LINES


@pytest.mark.parametrize(("doc", "line"), ALL_LINES, ids=[f"{d}:{line}" for d, line in ALL_LINES])
def test_every_qvm_line_in_the_docs_parses(doc: str, line: str) -> None:
    argv = shlex.split(line)[1:]
    assert parses(argv) is None, f"{doc}: {line}: {parses(argv)}"


def documented_keys(text: str) -> set[str]:
    """Keys named in the first cell of the machine-keys table: `table.key`, `[[table]] key`,
    and `.key` for another key of the table named just before."""
    start = text.index("| key | meaning |")
    keys: set[str] = set()
    for row in text[start:].splitlines()[2:]:
        if not row.startswith("|"):
            break
        table = ""
        for token in re.findall(r"`([^`]+)`", row.split("|")[1]):
            if token.startswith("[["):
                table, _, key = token[2:].partition("]] ")
            elif token.startswith("."):
                key = token[1:]
            elif "." in token:
                table, _, key = token.partition(".")
            else:
                table, key = "", token
            keys.add(f"{table}.{key}" if table else key)
    return keys


def test_every_machine_key_is_documented_and_every_documented_key_exists() -> None:
    text = "\n".join(doc.read_text() for doc in DOCS if "| key | meaning |" in doc.read_text())
    schema = {f"{table}.{key}" if table else key for table, keys in KEYS.items() for key in keys}
    documented = documented_keys(text)
    assert schema - documented == set(), "keys the docs do not name"
    assert documented - schema == set(), "keys the docs name that qvm does not know"


def test_every_toml_example_parses() -> None:
    examples = 0
    for doc in DOCS:
        for language, body in code_blocks(doc.read_text()):
            if language == "toml" or (not language and re.search(r"^\[\w+\]$", body, re.M)):
                lines = [line for line in body.splitlines() if not line.startswith("$")]
                tomllib.loads("\n".join(lines))
                examples += 1
    assert examples >= 1


def slug(heading: str) -> str:
    """GitHub's anchor for a heading."""
    text = re.sub(r"[^\w\- ]", "", heading.strip().lower())
    return text.replace(" ", "-")


def test_relative_links_and_anchors_resolve() -> None:
    for doc in DOCS:
        text = FENCE.sub("", doc.read_text())
        for target in re.findall(r"\]\(([^)\s]+)\)", text):
            if re.match(r"\w+://|mailto:", target):
                continue
            path, _, anchor = target.partition("#")
            linked = (doc.parent / path).resolve() if path else doc
            assert linked.exists(), f"{doc.name}: link to {target}: no such file"
            if anchor and linked.suffix == ".md":
                headings = re.findall(r"^#+ (.*)$", linked.read_text(), re.M)
                assert anchor in {slug(h) for h in headings}, f"{doc.name}: no anchor {target}"


# --- prose: `qvm ...` spans, schema files, exit codes, the design tree -----------------------

INLINE = re.compile(r"(?<!`)`(qvm [^`]+)`(?!`)")


def prose_spans() -> list[tuple[str, str]]:
    """Every inline `qvm ...` code span outside code blocks, with its document's name."""
    spans = []
    for doc in DOCS:
        text = FENCE.sub("", doc.read_text())
        text = re.sub(r"(?m)^(?: {4}|\t).*$", "", text)  # indented blocks are code too
        spans += [(doc.name, span) for span in INLINE.findall(text.replace("\\|", "|"))]
    return spans


SPANS = prose_spans()


def commands_named(words: list[str]) -> tuple[list[object], list[str]]:
    """The commands a span's leading words name (``cpu list/add`` names two), and the rest."""
    import click

    commands: list[object] = [click_command()]
    while words and all(isinstance(c, click.Group) for c in commands):
        parts = re.split(r"[/|]", words[0])
        found = [
            c.commands[p]  # type: ignore[attr-defined]
            for c in commands
            for p in parts
            if p in c.commands  # type: ignore[attr-defined]
        ]
        if len(found) != len(parts) * len(commands):
            break
        commands, words = found, words[1:]
    return commands, words


def option_names(command: object) -> set[str]:
    return {
        name
        for param in command.params  # type: ignore[attr-defined]
        for name in (*param.opts, *param.secondary_opts)
    } | {"--help"}


def test_the_docs_name_commands_in_prose() -> None:
    assert len(SPANS) >= 50, SPANS


def prose_problem(span: str) -> str | None:
    """What is wrong with a `qvm ...` span: `qvm cpu add NAME [--count N]` must name a
    command that takes --count; a span with no placeholder syntax must parse as a whole, as
    a code block's line does, but for arguments left out (`qvm up`, `--new` name a command
    or an option in prose)."""
    words = span.split()[1:]
    commands, rest = commands_named(words)
    if commands == [click_command()] and words and not words[0].startswith("-"):
        return f"no command {words[0]!r}"
    known = option_names(click_command()).union(*(option_names(c) for c in commands))
    before_args = " ".join(rest).split(" -- ")[0]
    unknown = set(re.findall(r"(?<![\w-])(--?[a-zA-Z][\w-]*)", before_args)) - known
    if unknown:
        return f"not options of this command: {sorted(unknown)}"
    placeholders = r"[\[\]<>|/]|\.\.\.|\$"
    if re.search(placeholders, " ".join(words[: len(words) - len(rest)])) or re.search(
        placeholders.replace("/", ""), before_args
    ):
        return None
    complaint = parses(shlex.split(span)[1:])
    if complaint is None or re.match(
        r"Missing argument|Option '.*' requires an argument", complaint
    ):
        return None
    return complaint


def test_the_prose_check_can_fail() -> None:
    assert prose_problem("qvm cpu add NAME [--count N] [--wait-guest]") is None
    assert prose_problem("qvm up") is None
    assert "no command" in (prose_problem("qvm frobnicate VM") or "")
    assert "--bogus" in (prose_problem("qvm down NAME [--bogus]") or "")
    assert "--count" in (prose_problem("qvm status NAME --count 2") or "")
    assert prose_problem("qvm down vm1 --timeout soon") is not None


@pytest.mark.parametrize(("doc", "span"), SPANS, ids=[f"{d}:{s}" for d, s in SPANS])
def test_every_option_named_in_prose_is_the_commands(doc: str, span: str) -> None:
    problem = prose_problem(span)
    assert problem is None, f"{doc}: `{span}`: {problem}"


def design_tree() -> list[str]:
    """The modules docs/design.md's tree names, as paths (``qvm/base/sizes.py``): a line
    starts with a folder (``base/``) or modules (``text.py, urls.py``) at two spaces a
    level; anything else is a description running on."""
    text = (REPO / "docs" / "design.md").read_text()
    (tree,) = [body for _, body in code_blocks(text) if body.startswith("qvm/\n")]
    folders: list[str] = []
    modules = []
    for line in tree.splitlines():
        stripped = line.lstrip()
        depth = (len(line) - len(stripped)) // 2
        entry = re.match(r"(\w+/|\w+\.py(?:, \w+\.py)*)(?:\s|$)", stripped)
        if entry is None:
            continue
        folders = folders[:depth]
        if entry.group(1).endswith("/"):
            folders.append(entry.group(1))
        else:
            modules += ["".join(folders) + name for name in entry.group(1).split(", ")]
    return modules


def test_the_design_tree_names_every_module_once_and_nothing_else() -> None:
    named = design_tree()
    assert len(named) == len(set(named)), "a module named twice"
    real = {
        str(path.relative_to(REPO))
        for path in (REPO / "qvm").rglob("*.py")
        if path.name != "__init__.py"
    }
    assert real - set(named) == set(), "modules docs/design.md's tree does not name"
    assert set(named) - real == set(), "names in docs/design.md's tree that are no module"


def test_no_init_module_holds_code() -> None:
    """design.md: every ``__init__.py`` is empty (a docstring at most)."""
    import ast

    for path in (REPO / "qvm").rglob("__init__.py"):
        body = ast.parse(path.read_text()).body
        docstring = [node for node in body if isinstance(node, ast.Expr)][:1]
        assert body == docstring, path


def test_every_schema_file_the_docs_name_exists() -> None:
    named = {
        (doc.name, name)
        for doc in DOCS
        for name in re.findall(r"schemas/([\w-]+\.json)", doc.read_text())
    }
    assert len(named) >= 3
    for doc, name in named:
        assert (REPO / "schemas" / name).is_file(), f"{doc}: schemas/{name}: no such file"


def test_the_exit_codes_design_md_lists_are_qvm_errors() -> None:
    from qvm import errors

    text = (REPO / "docs" / "design.md").read_text()
    paragraph = text[text.index("**Exit codes**") :].split("\n\n")[0]
    listed = {int(code) for code in re.findall(r"[:;]\s+(\d+)\s", paragraph)}
    defined = {v for k, v in vars(errors).items() if k.startswith("EXIT_")}
    assert listed == defined


def test_design_md_names_every_dependency() -> None:
    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    required = [*project["dependencies"], *project["optional-dependencies"]["test"]]
    names = {re.split(r"[<>=!~\[; ]", spec)[0] for spec in required}
    text = (REPO / "docs" / "design.md").read_text()
    section = text[text.index("### Dependencies") :]
    assert {n for n in names if n.lower() not in section.lower()} == set()


def test_json_md_names_every_status_key_and_state() -> None:
    """docs/json.md's table of `qvm status --json` against schemas/status.json."""
    import json

    text = (REPO / "docs" / "json.md").read_text()
    rows = [row for row in text.splitlines() if row.startswith("| `")]
    documented = {key for row in rows for key in re.findall(r"`(\w+)`", row.split("|")[1])}
    schema = json.loads((REPO / "schemas" / "status.json").read_text())
    assert documented == set(schema["$defs"]["status"]["properties"])
    common = json.loads((REPO / "schemas" / "common.json").read_text())
    (state_row,) = [row for row in rows if row.startswith("| `state` |")]
    assert set(re.findall(r"`(\w+)`", state_row.split("|")[3])) == set(
        common["$defs"]["state"]["enum"]
    )


def test_the_run_dir_table_names_every_file_qvm_makes() -> None:
    from qvm.layout.rundir import QVM_FILE_NAMES

    text = (REPO / "docs" / "supervision.md").read_text()
    start = text.index("| file | what |")
    rows = [row for row in text[start:].splitlines()[2:] if row.startswith("|")]
    named = {name for row in rows for name in re.findall(r"`([^`]+)`", row.split("|")[1])}
    # disk[0-9]+.qcow2, hotplug-*.qcow2, share-[A-Za-z0-9_-]+.sock
    patterns = {"diskN.qcow2", "hotplug-ID.qcow2", "share-ID.sock"}
    assert named - patterns == set(QVM_FILE_NAMES)


def test_every_toml_example_is_a_valid_machine_definition(tmp_path: Path) -> None:
    """A ```toml block is a machine file: qvm's loader takes it (files are checked at `up`)."""
    from qvm.definition.load import load_machine

    examples = [
        body
        for doc in DOCS
        for language, body in code_blocks(doc.read_text())
        if language == "toml"
    ]
    assert examples
    for index, body in enumerate(examples):
        path = tmp_path / f"vm{index}.toml"
        path.write_text(body)
        load_machine(path)  # a DefinitionError names the file, the key and the problem


def test_the_readme_command_table_names_every_command() -> None:
    from qvm.cli.parsing.declare import GROUPS, TOP_LEVEL

    text = (REPO / "README.md").read_text()
    start = text.index("| command | what it does |")
    first_cells = [
        row.split("|")[1] for row in text[start:].splitlines()[2:] if row.startswith("|")
    ]
    named = {
        word
        for cell in first_cells
        for span in re.findall(r"`qvm ([^`]+)`", cell)
        for word in re.split(r"[/|]", span.split()[0])
    }
    assert set(TOP_LEVEL) | set(GROUPS) <= named


def test_the_readme_tour_shows_neutral_paths_and_where_it_runs_from() -> None:
    """The sample output showed the folder it was written in (/work/main/...): a reader
    took it for a path qvm needs. It runs from the clone's root, and says so."""
    text = (REPO / "README.md").read_text()
    tour = text[text.index("## Quick tour") : text.index("## Commands")]
    assert "runs from the clone's root" in tour
    for foreign in ("/work/", "/root/"):
        assert foreign not in tour, foreign


def test_the_exit_status_table_is_in_the_readme_and_qvm_help() -> None:
    """One contract, three places: qvm.errors' codes, the README's table, `qvm --help`."""
    import subprocess
    import sys

    from qvm import errors
    from qvm.cli.parsing.typer_app import EXIT_STATUS

    defined = {v for k, v in vars(errors).items() if k.startswith("EXIT_")}
    assert {code for code, _ in EXIT_STATUS} == defined
    readme = (REPO / "README.md").read_text()
    section = readme[readme.index("Exit status (also at the end of `qvm --help`)") :]
    table = section.split("\n\n")[1]
    assert {int(code) for code in re.findall(r"^\| (\d+) \|", table, re.M)} == defined
    shown = subprocess.run(
        [sys.executable, "-m", "qvm.cli", "--help"], capture_output=True, text=True, check=True
    ).stdout
    listing = shown[shown.index("Exit status:") :]
    for code, meaning in EXIT_STATUS:
        assert f"  {code:<4} {meaning}\n" in listing, (code, listing)
