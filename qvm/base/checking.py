"""``if TYPE_CHECKING:`` without importing typing, which costs each command ~9 M
instructions (~2 ms here): type checkers take any name TYPE_CHECKING for true, and at run
time it is false. The modules on the way of `qvm status`, `list` and `up` name typing's
things under it only (docs/speed.md; tests/unit/cli/test_cli_imports.py holds them to it).
"""

TYPE_CHECKING = False
