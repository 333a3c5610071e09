"""``pacs-node results release|reject``: an operator's decision on a result the quality gate
held."""

from __future__ import annotations

from collections.abc import Callable
from typing import Annotated

import typer
from sqlalchemy.orm import Session

from pacs_node.cli.common import ConfigOption, login_name, opened_catalog, settings_for
from pacs_node.cli.console import FAILED, err, fail

results_app = typer.Typer(
    help="Results held by the quality gate: release (send) or reject them. ID is the job id "
    "(see `pacs-node jobs`): the gate judges a job's whole result, so all its objects go or "
    "none.",
    no_args_is_help=True,
)
ActorOption = Annotated[
    str,
    typer.Option("--actor", help="Who decides, for the job's events (default: the login name)."),
]
HeldJobArgument = Annotated[int, typer.Argument(help="Job ID whose result is held.")]


def _decide(
    config: ConfigOption, job_id: int, action: Callable[[Session, int], int], verb: str
) -> None:
    settings = settings_for(config)
    with opened_catalog(settings, migrate=True) as catalog, catalog.sessions.begin() as session:
        count = action(session, job_id)
    if not count:
        fail(f"job {job_id}: no result held by the quality gate", FAILED)
    err.print(f"job {job_id}: {count} deliveries {verb}", highlight=False)


@results_app.command("release")
def results_release(
    job_id: HeldJobArgument, actor: ActorOption = "", config: ConfigOption = None
) -> None:
    """Send a result the quality gate held: its deliveries become due now."""
    from pacs_node.catalog.quality import release_result

    who = login_name(actor)
    _decide(config, job_id, lambda s, j: release_result(s, j, who), "released")


@results_app.command("reject")
def results_reject(
    job_id: HeldJobArgument,
    actor: ActorOption = "",
    reason: Annotated[str, typer.Option("--reason", help="Why, for the job's events.")] = "",
    config: ConfigOption = None,
) -> None:
    """Reject a result the quality gate held: its deliveries are never sent."""
    from pacs_node.catalog.quality import reject_result

    who = login_name(actor)
    _decide(config, job_id, lambda s, j: reject_result(s, j, who, reason), "rejected")
