"""The consoles every command writes to, and the one way a command ends in error.

JSON output goes alone to stdout; tables go to stdout; logs, progress and errors to stderr.
Only typer and rich here: :mod:`pacs_node.cli.train` runs without the node's services.
"""

from __future__ import annotations

import json
import sys
from typing import NoReturn

import typer
from rich.console import Console

out = Console()
err = Console(stderr=True)

USAGE = 2  # a bad option, argument or configuration
FAILED = 1  # the command ran and could not do what it was asked


def fail(message: str, code: int = USAGE) -> NoReturn:
    """Print ``error: message`` on stderr and end the command with ``code``."""
    err.print(f"[bold red]error:[/] {message}", highlight=False)
    raise typer.Exit(code)


def print_json(value: object, *, ascii_only: bool = False) -> None:
    """One JSON document on stdout, alone on its line (``ascii_only``: non-ASCII escaped)."""
    sys.stdout.write(json.dumps(value, ensure_ascii=ascii_only) + "\n")
