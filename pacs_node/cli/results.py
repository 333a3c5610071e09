"""``pacs-node results release|reject``: an operator's decision on a result the quality gate
held."""

from __future__ import annotations

from typing import Annotated

import typer

from pacs_node.cli.common import ConfigOption, change, user
from pacs_node.cli.console import FAILED, err, fail
from pacs_node.errors import RequestError

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


@results_app.command("release")
def results_release(
    job_id: HeldJobArgument, actor: ActorOption = "", config: ConfigOption = None
) -> None:
    """Send a result the quality gate held: its deliveries become due now."""
    from pacs_node.services.deliveries import release_result

    try:
        count = change(config, lambda catalog: release_result(catalog, job_id, user(actor)))
    except RequestError as exc:  # a newer result of the study and model has gone out
        fail(str(exc), FAILED)
    _decided(job_id, count, "released")


@results_app.command("reject")
def results_reject(
    job_id: HeldJobArgument,
    actor: ActorOption = "",
    reason: Annotated[str, typer.Option("--reason", help="Why, for the job's events.")] = "",
    config: ConfigOption = None,
) -> None:
    """Reject a result the quality gate held: its deliveries are never sent."""
    from pacs_node.services.deliveries import reject_result

    count = change(config, lambda catalog: reject_result(catalog, job_id, user(actor), reason))
    _decided(job_id, count, "rejected")


def _decided(job_id: int, count: int, verb: str) -> None:
    if not count:
        fail(f"job {job_id}: no result held by the quality gate", FAILED)
    err.print(f"job {job_id}: {count} deliveries {verb}", highlight=False)
