"""The forked child of `qvm up` imports, before its exec, only what ``CHILD_IMPORTS``
names: the parent imports those whole first when it forks from threads (several VMs at
once), since a module another thread is importing at the fork stays locked in the child.
"""

from __future__ import annotations

import ast
from pathlib import Path

from qvm.supervisor import spawn
from qvm.supervisor.spawn import CHILD_IMPORTS


def imports_inside_functions(path: Path) -> set[str]:
    found = set()
    for function in ast.walk(ast.parse(path.read_text())):
        if not isinstance(function, ast.FunctionDef):
            continue
        for node in ast.walk(function):
            if isinstance(node, ast.Import):
                found.update(alias.name for alias in node.names)
            elif isinstance(node, ast.ImportFrom) and node.module:
                # `from qvm.supervisor import shares` imports the module qvm.supervisor.shares
                package = node.module == "qvm.supervisor"
                found.update(
                    f"{node.module}.{a.name}" if package else node.module for a in node.names
                )
    return found


def test_every_import_of_the_forked_child_is_listed() -> None:
    inside = imports_inside_functions(Path(spawn.__file__))
    assert inside - {"collections.abc"} <= set(CHILD_IMPORTS), inside - set(CHILD_IMPORTS)


def test_the_listed_modules_import_lazily_nothing_themselves() -> None:
    # their own module-level imports are done once they are imported; an import inside
    # one of their functions would happen in the child, unlisted
    for name in CHILD_IMPORTS:
        if name.startswith("qvm."):
            path = Path(spawn.__file__).parents[2] / (name.replace(".", "/") + ".py")
            assert imports_inside_functions(path) <= set(CHILD_IMPORTS), name
