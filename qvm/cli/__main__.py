"""``python -m qvm.cli``: the same as the ``qvm`` console script."""

from qvm.cli.app import run

run()
