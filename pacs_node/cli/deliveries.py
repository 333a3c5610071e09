"""``pacs-node deliveries`` (list, retry): the outbox by hand. JSON goes alone to stdout."""

from __future__ import annotations

from typing import Annotated

import typer
from rich.table import Table

from pacs_node.cli.common import (
    ConfigOption,
    JsonOption,
    change,
    opened_catalog,
    settings_for,
    user,
)
from pacs_node.cli.console import FAILED, err, fail, out, print_json

deliveries_app = typer.Typer(
    help="The outbox: every result's way to every destination; retry a held or dead one.",
    invoke_without_command=True,
    no_args_is_help=False,
)


@deliveries_app.callback()
def deliveries(
    ctx: typer.Context,
    state: Annotated[
        list[str] | None,
        typer.Option(
            "--state",
            help="Only these states (pending, sending, delivered, held, dead, rejected).",
        ),
    ] = None,
    config: ConfigOption = None,
    json_output: JsonOption = False,
) -> None:
    """List deliveries: destination, state, attempts, next attempt and the last error."""
    if ctx.invoked_subcommand is not None:
        return
    from pacs_node.services.deliveries import list_deliveries

    with opened_catalog(settings_for(config), migrate=True) as catalog:
        rows = list_deliveries(catalog, states=state)
    if json_output:
        print_json([r.as_json() for r in rows])
        return
    table = Table(title=f"{len(rows)} deliveries")
    for column in ("ID", "Job", "Kind", "Destination", "State", "Tries", "Next", "Last error"):
        table.add_column(column)
    for r in rows:
        shown = f"{r.state} ({r.held_for})" if r.held_for else r.state
        table.add_row(
            str(r.id),
            str(r.job_id),
            r.kind,
            r.destination,
            shown,
            str(r.attempts),
            r.next_attempt_at.strftime("%H:%M:%S") if r.next_attempt_at else "",
            (r.last_error or "")[: 160 if r.held_for == "quality" else 60],
        )
    out.print(table)


@deliveries_app.command("retry")
def deliveries_retry(
    delivery_id: Annotated[int, typer.Argument(help="Delivery ID.")], config: ConfigOption = None
) -> None:
    """Send a held or dead delivery again now (attempts counted afresh)."""
    from pacs_node.services.deliveries import retry_delivery

    if not change(config, lambda catalog: retry_delivery(catalog, delivery_id, user())):
        fail(
            f"delivery {delivery_id}: no such delivery that is held or dead (one the quality "
            "gate holds: `pacs-node results release JOB`)",
            FAILED,
        )
    err.print(f"delivery {delivery_id}: done", highlight=False)
