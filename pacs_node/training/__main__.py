"""``python -m pacs_node.training RECIPE``: the same as ``pacs-node train``."""

import typer

from pacs_node.cli.train import train

if __name__ == "__main__":
    typer.run(train)
