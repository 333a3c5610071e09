"""The command line's shape: ``python -m pacs_node.training`` loads the train command without
the node's services, and no CLI module but the app imports another's commands."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

CLI = Path(__file__).parents[2] / "pacs_node" / "cli"
SHARED = {"pacs_node.cli.common", "pacs_node.cli.console"}


def test_the_train_command_loads_without_the_node() -> None:
    code = (
        "import sys, pacs_node.cli.train; "
        "print(' '.join(sorted(m for m in sys.modules if m.startswith(('pacs_node', 'sqlalchemy', "
        "'pynetdicom')))))"
    )
    loaded = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True, timeout=120
    ).stdout.split()
    assert loaded == [
        "pacs_node",
        "pacs_node.cli",
        "pacs_node.cli.console",
        "pacs_node.cli.train",
        "pacs_node.errors",
    ]


def test_cli_modules_import_only_the_shared_ones() -> None:
    for path in CLI.glob("*.py"):
        if path.name in ("app.py", "__init__.py"):
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and (node.module or "").startswith("pacs_node.cli"):
                assert node.module in SHARED, (path.name, node.module)
