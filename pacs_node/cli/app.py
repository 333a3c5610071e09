"""The ``pacs-node`` app: every command, registered in the order ``--help`` lists them.

Each door topic lives in a module of its own; they share :mod:`pacs_node.cli.console` and
:mod:`pacs_node.cli.common` and never import one another's commands.
"""

from __future__ import annotations

import typer

from pacs_node import __version__
from pacs_node.cli.audit import audit
from pacs_node.cli.console import out
from pacs_node.cli.deliveries import deliveries_app
from pacs_node.cli.demo import demo
from pacs_node.cli.jobs import jobs_app, run
from pacs_node.cli.models import evaluate, models
from pacs_node.cli.network import echo, send
from pacs_node.cli.quarantine import quarantine_app
from pacs_node.cli.results import results_app
from pacs_node.cli.routes import routes_app
from pacs_node.cli.segment import segment
from pacs_node.cli.serve import serve
from pacs_node.cli.status import status
from pacs_node.cli.studies import studies
from pacs_node.cli.tokens import tokens_app
from pacs_node.cli.train import train
from pacs_node.cli.users import users_app
from pacs_node.cli.worker import worker

app = typer.Typer(
    name="pacs-node",
    help="A DICOM AI node: receives studies, segments them, returns results to PACS and EHR.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)


def version() -> None:
    """Print the version."""
    out.print(f"pacs-node {__version__}", highlight=False)


for command in (
    run,
    demo,
    status,
    serve,
    worker,
    studies,
    send,
    echo,
    models,
    segment,
    train,
    evaluate,
    audit,
):
    app.command()(command)
app.command()(version)
app.add_typer(jobs_app, name="jobs")
app.add_typer(deliveries_app, name="deliveries")
app.add_typer(results_app, name="results")
app.add_typer(quarantine_app, name="quarantine")
app.add_typer(routes_app, name="routes")
app.add_typer(users_app, name="users")
app.add_typer(tokens_app, name="tokens")


def main() -> None:
    app()


if __name__ == "__main__":
    main()
