"""``pacs-node audit``: the audit trail (DICOM PS3.15 audit messages), for a privacy officer."""

from __future__ import annotations

from typing import Annotated

import typer
from rich.table import Table

from pacs_node.cli.common import ConfigOption, JsonOption, opened_catalog, settings_for, user
from pacs_node.cli.console import FAILED, err, fail, out, print_json

# EventOutcomeIndicator (PS3.15 A.5.1), in words
OUTCOMES = {0: "success", 4: "minor failure", 8: "serious failure", 12: "major failure"}
SinceOption = Annotated[
    str | None,
    typer.Option(
        "--since",
        help="From this time on: ISO 8601 (local time without an offset) or 15m, 2h, 7d.",
        show_default=False,
    ),
]
LimitOption = Annotated[
    int,
    typer.Option("--limit", min=1, help="At most this many events: the newest ones."),
]
AfterOption = Annotated[
    int | None,
    typer.Option(
        "--after-id",
        min=0,
        help="The events after this id instead, oldest first (0: from the start).",
        show_default=False,
    ),
]
XmlOption = Annotated[
    bool, typer.Option("--xml", help="With --json: add each event's AuditMessage XML.")
]


def audit(
    since: SinceOption = None,
    limit: LimitOption = 1000,
    after_id: AfterOption = None,
    config: ConfigOption = None,
    json_output: JsonOption = False,
    xml: XmlOption = False,
) -> None:
    """List the audit trail: event (DCM code), outcome, time, actor, participants. Reading it
    is itself audited (110101 Audit Log Used), and refused when that cannot be recorded."""
    from pacs_node.services.audit import AuditUnavailable, parse_since, read_audit_log

    settings = settings_for(config)
    try:
        start = parse_since(since) if since else None
    except ValueError as exc:
        fail(f"--since: {exc}")
    with opened_catalog(settings) as catalog:
        try:
            page = read_audit_log(catalog, user(), start, limit=limit, after_id=after_id)
        except AuditUnavailable as exc:
            fail(str(exc), FAILED)
    rows = page.rows
    if page.truncated:
        if after_id is None:
            note = f"older events left out (--limit {limit}): narrow with --since, or page "
            note += "with --after-id"
        else:
            last = rows[-1].id if rows else after_id
            note = f"more events follow: --after-id {last}"
        err.print(f"truncated: {note}", highlight=False)
    if json_output:
        print_json([{**row.as_json(), **({"message": row.message} if xml else {})} for row in rows])
        return
    table = Table(title=f"{len(rows)} audit events")
    for column in ("Time", "Event", "Type", "Action", "Outcome", "Actor", "Participants"):
        table.add_column(column)
    for row in rows:
        table.add_row(
            row.time,
            row.event_id,
            row.event_type or "",
            row.action,
            OUTCOMES.get(row.outcome, str(row.outcome)),
            row.actor,
            ", ".join(row.participants),
        )
    out.print(table)
