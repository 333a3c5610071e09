"""``pacs-node studies``: what the node received."""

from __future__ import annotations

from rich.table import Table

from pacs_node.cli.common import ConfigOption, JsonOption, opened_catalog, settings_for
from pacs_node.cli.console import out, print_json


def studies(config: ConfigOption = None, json_output: JsonOption = False) -> None:
    """List received studies with their series and assembly state."""
    settings = settings_for(config)
    from pacs_node.catalog.db import sqlite_file
    from pacs_node.catalog.studies import StudySummary
    from pacs_node.services.studies import list_studies

    path = sqlite_file(settings.node.catalog_url)
    summaries: list[StudySummary] = []
    if path is None or path.exists():  # a node that never ran has no studies (and no file)
        with opened_catalog(settings) as catalog:
            summaries = list_studies(catalog)
    if json_output:
        print_json([s.as_json() for s in summaries])
        return
    table = Table(title=f"{len(summaries)} studies")
    columns = (
        "Study Instance UID",
        "State",
        "Status",
        "Received",
        "Series",
        "Instances",
        "Quarantined",
    )
    for column in (*columns, "Modalities"):
        table.add_column(column)
    for s in summaries:
        modalities = ", ".join(sorted({x.modality or "?" for x in s.series}))
        table.add_row(
            s.study_uid,
            s.state,
            s.status or "",
            s.last_received_at.strftime("%Y-%m-%d %H:%M:%S"),
            str(len(s.series)),
            str(s.instances),
            str(s.quarantined),
            modalities,
        )
    out.print(table)
