"""The ``pacs-node`` command line: one door onto :mod:`pacs_node.services`.

:mod:`pacs_node.cli.app` assembles the commands; this package imports none of them, so
``python -m pacs_node.training`` can load :mod:`pacs_node.cli.train` without the node.
"""

from __future__ import annotations


def main() -> None:
    """The console script (entry points installed before ``pacs_node.cli.app:main`` name this)."""
    from pacs_node.cli.app import main as run

    run()
