"""``pacs-node quarantine``: list, release, reassign and discard instances kept apart.

JSON goes alone to stdout.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Annotated

import typer
from rich.table import Table
from sqlalchemy.orm import Session

from pacs_node.cli.common import (
    ConfigOption,
    JsonOption,
    login_name,
    opened_catalog,
    settings_for,
)
from pacs_node.cli.console import FAILED, fail, out, print_json
from pacs_node.errors import PacsNodeError
from pacs_node.ingest.spool import Spool

ActorOption = Annotated[
    str | None, typer.Option("--actor", help="Who decides (recorded); default: the login name.")
]
ItemArgument = Annotated[int, typer.Argument(help="Its id in `pacs-node quarantine`.")]

quarantine_app = typer.Typer(
    help="Instances kept apart from every study: list them, release, re-assign or discard one.",
    invoke_without_command=True,
    no_args_is_help=False,
)


@quarantine_app.callback()
def quarantine(
    ctx: typer.Context, config: ConfigOption = None, json_output: JsonOption = False
) -> None:
    """List quarantined instances with the reason each was kept apart."""
    if ctx.invoked_subcommand is not None:
        return
    from pacs_node.catalog.quarantine import item_json, list_items

    with opened_catalog(settings_for(config)) as catalog, catalog.sessions() as session:
        items = [item_json(item) for item in list_items(session)]
    if json_output:
        print_json(items)
        return
    held = sum(1 for i in items if i["state"] == "held")
    table = Table(title=f"{len(items)} quarantined instances ({held} held)")
    for column in ("Id", "State", "Reason", "SOP Instance UID", "Collided with", "Received"):
        table.add_column(column)
    for i in items:
        table.add_row(
            str(i["id"]),
            i["state"],
            i["reason_text"],
            i["sop_instance_uid"],
            i["collided_study_uid"] or "",
            i["received_at"][:19],
        )
    out.print(table)


def _act(config: ConfigOption, what: str, action: Callable[[Session, Spool], str]) -> None:
    settings = settings_for(config)
    spool = Spool(settings.node.spool_dir)
    with opened_catalog(settings) as catalog:
        try:
            with catalog.sessions.begin() as session:
                result = action(session, spool)
        except PacsNodeError as exc:
            fail(f"{what}: {exc}", FAILED)
    out.print(f"{what}: {result}", highlight=False)


@quarantine_app.command("release")
def quarantine_release(
    item_id: ItemArgument, config: ConfigOption = None, actor: ActorOption = None
) -> None:
    """File the instance into a study of its own (new UIDs where its own collide)."""
    from pacs_node.ingest.quarantine import release

    def action(session: Session, spool: Spool) -> str:
        filed = release(session, spool, item_id, login_name(actor))
        how = "a copy with new UIDs" if filed.coerced else "as received"
        return f"released into study {filed.study_uid} ({how})"

    _act(config, f"quarantine {item_id}", action)


@quarantine_app.command("reassign")
def quarantine_reassign(
    item_id: ItemArgument,
    study: Annotated[str, typer.Option("--study", help="Study Instance UID it belongs to.")],
    config: ConfigOption = None,
    actor: ActorOption = None,
) -> None:
    """File the instance into an existing study (the operator's decision, recorded)."""
    from pacs_node.ingest.quarantine import reassign

    def action(session: Session, spool: Spool) -> str:
        filed = reassign(session, spool, item_id, study, login_name(actor))
        return f"re-assigned to study {filed.study_uid}"

    _act(config, f"quarantine {item_id}", action)


@quarantine_app.command("discard")
def quarantine_discard(
    item_id: ItemArgument, config: ConfigOption = None, actor: ActorOption = None
) -> None:
    """Delete the instance's bytes; the row stays as discarded."""
    from pacs_node.ingest.quarantine import discard

    def action(session: Session, spool: Spool) -> str:
        discard(session, spool, item_id, login_name(actor))
        return "discarded"

    _act(config, f"quarantine {item_id}", action)
