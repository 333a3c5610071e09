"""``pacs-node status``: the node's health as the catalog and the spool tell it."""

from __future__ import annotations

import time

import typer
from rich.table import Table

from pacs_node.cli.common import ConfigOption, JsonOption, settings_for
from pacs_node.cli.console import FAILED, out, print_json


def status(config: ConfigOption = None, json_output: JsonOption = False) -> None:
    """The node's health as the catalog and the spool tell it: catalog reachable or not (and
    since when the recorder could not write), counters, quarantine and studies held."""
    from pacs_node.services.status import node_health

    health = node_health(settings_for(config))
    if json_output:
        print_json(health.as_json())
    else:
        recorder = health.recorder
        table = Table(title="pacs-node status")
        table.add_column("What")
        table.add_column("Value")
        table.add_row("healthy", str(health.healthy))
        table.add_row("catalog reachable", str(health.counts is not None))
        since = recorder.get("outage_since")
        if isinstance(since, int | float | str) and since:
            table.add_row("recorder outage", f"{time.time() - float(since):.0f} s")
        if recorder.get("unrecorded"):
            table.add_row("unrecorded instances", str(recorder["unrecorded"]))
        if health.counts is not None:
            table.add_row("studies", str(health.counts.studies))
            table.add_row("quarantine held", str(health.counts.quarantine_held))
            for name, value in sorted(health.counts.counters.items()):
                table.add_row(name, str(value))
        out.print(table)
    if not health.healthy:
        raise typer.Exit(FAILED)
