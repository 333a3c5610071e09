"""``pacs-node status``: the node's health as the catalog and the spool tell it."""

from __future__ import annotations

import json
import time
from typing import Any

import typer
from rich.table import Table

from pacs_node.cli.common import ConfigOption, JsonOption, settings_for
from pacs_node.cli.console import FAILED, out, print_json


def status(config: ConfigOption = None, json_output: JsonOption = False) -> None:
    """The node's health as the catalog and the spool tell it: catalog reachable or not (and
    since when the recorder could not write), counters, quarantine and studies held."""
    from sqlalchemy import func, select

    from pacs_node.catalog.db import open_catalog
    from pacs_node.catalog.models import QuarantineItem, QuarantineState, Study
    from pacs_node.catalog.studies import counters
    from pacs_node.ingest.recorder import OUTAGE_FILE

    settings = settings_for(config)
    report: dict[str, Any] = {"catalog": settings.node.catalog_url.split("@")[-1]}
    flag = settings.node.spool_dir / OUTAGE_FILE
    recorder: dict[str, Any] = {"catalog_available": True}
    if flag.exists():
        try:
            recorder = json.loads(flag.read_text(encoding="utf-8"))
        except (OSError, ValueError):
            recorder = {"catalog_available": False, "last_error": "unreadable status file"}
    report["recorder"] = recorder
    try:
        catalog = open_catalog(settings.node.catalog_url, run_migrations=False)
        try:
            with catalog.sessions() as session:
                report["counters"] = counters(session)
                report["studies"] = session.scalar(select(func.count(Study.id))) or 0
                report["quarantine_held"] = (
                    session.scalar(
                        select(func.count(QuarantineItem.id)).where(
                            QuarantineItem.state == QuarantineState.HELD
                        )
                    )
                    or 0
                )
            report["catalog_reachable"] = True
        finally:
            catalog.dispose()
    except Exception as exc:  # the point is to report it, not to fail on it
        report["catalog_reachable"] = False
        report["catalog_error"] = type(exc).__name__
    healthy = report["catalog_reachable"] and recorder.get("catalog_available", True)
    report["healthy"] = bool(healthy) and not recorder.get("unrecorded")
    if json_output:
        print_json(report)
    else:
        table = Table(title="pacs-node status")
        table.add_column("What")
        table.add_column("Value")
        table.add_row("healthy", str(report["healthy"]))
        table.add_row("catalog reachable", str(report["catalog_reachable"]))
        since = recorder.get("outage_since")
        if since:
            table.add_row("recorder outage", f"{time.time() - float(since):.0f} s")
        if recorder.get("unrecorded"):
            table.add_row("unrecorded instances", str(recorder["unrecorded"]))
        for key in ("studies", "quarantine_held"):
            if key in report:
                table.add_row(key.replace("_", " "), str(report[key]))
        for name, value in sorted(report.get("counters", {}).items()):
            table.add_row(name, str(value))
        out.print(table)
    if not report["healthy"]:
        raise typer.Exit(FAILED)
