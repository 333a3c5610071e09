"""``pacs-node quarantine``: list, release, reassign and discard instances kept apart.

JSON goes alone to stdout.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, Annotated

import typer
from rich.table import Table

from pacs_node.cli.common import ConfigOption, JsonOption, opened_catalog, settings_for, user
from pacs_node.cli.console import FAILED, fail, out, print_json
from pacs_node.config import Settings
from pacs_node.errors import PacsNodeError

if TYPE_CHECKING:
    from pacs_node.catalog.db import Catalog

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
    from pacs_node.services.quarantine import list_quarantined

    with opened_catalog(settings_for(config)) as catalog:
        items = list_quarantined(catalog)
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
            str(i["state"]),
            str(i["reason_text"]),
            str(i["sop_instance_uid"]),
            str(i["collided_study_uid"] or ""),
            str(i["received_at"])[:19],
        )
    out.print(table)


def _act(config: ConfigOption, what: str, action: Callable[[Catalog, Settings], str]) -> None:
    settings = settings_for(config)
    with opened_catalog(settings) as catalog:
        try:
            result = action(catalog, settings)
        except PacsNodeError as exc:
            fail(f"{what}: {exc}", FAILED)
    out.print(f"{what}: {result}", highlight=False)


@quarantine_app.command("release")
def quarantine_release(
    item_id: ItemArgument, config: ConfigOption = None, actor: ActorOption = None
) -> None:
    """File the instance into a study of its own (new UIDs where its own collide)."""
    from pacs_node.services.quarantine import release

    def action(catalog: Catalog, settings: Settings) -> str:
        filed = release(catalog, settings, item_id, user(actor))
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
    from pacs_node.services.quarantine import reassign

    def action(catalog: Catalog, settings: Settings) -> str:
        filed = reassign(catalog, settings, item_id, study, user(actor))
        return f"re-assigned to study {filed.study_uid}"

    _act(config, f"quarantine {item_id}", action)


@quarantine_app.command("discard")
def quarantine_discard(
    item_id: ItemArgument, config: ConfigOption = None, actor: ActorOption = None
) -> None:
    """Delete the instance's bytes; the row stays as discarded."""
    from pacs_node.services.quarantine import discard

    def action(catalog: Catalog, settings: Settings) -> str:
        discard(catalog, settings, item_id, user(actor))
        return "discarded"

    _act(config, f"quarantine {item_id}", action)
