"""vCPU hotplug commands (filled in by the vCPU hotplug work)."""

from __future__ import annotations

import typer

app = typer.Typer(help="List, add and remove vCPUs of a running VM.", no_args_is_help=True)
