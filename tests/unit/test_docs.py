"""The docs (README.md and docs/*.md) against the code: every `qvm ...` line in a code block
parses as the CLI parses it, every machine key is documented and every documented key
exists, every TOML example parses, every relative link and anchor resolves."""

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
        args = context.protected_args + context.args
        while isinstance(command, click.Group) and args:
            name, command, args = command.resolve_command(context, args)
            assert command is not None
            context = command.make_context(name, args, parent=context)
            args = context.protected_args + context.args if isinstance(command, click.Group) else []
    except click.exceptions.Exit:
        return None  # --help, --version
    except click.ClickException as error:
        return error.format_message()
    return None


@functools.cache
def click_command() -> object:
    """The whole Typer app as Click sees it, every command registered."""
    import typer

    from qvm.cli.parsing import typer_app

    typer_app.register(None)
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
