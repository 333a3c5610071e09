"""``pacs-node quarantine`` (list, release, discard, reassign) and ``pacs-node status``.

Registered on the main app by :mod:`pacs_node.cli`; JSON goes alone to stdout.
"""

from __future__ import annotations

import getpass
import json
import sys
import time
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.table import Table

ConfigOption = Annotated[
    Path | None,
    typer.Option(
        "--config", help="Folder with node.yaml, peers.yaml and routes.yaml.", show_default=False
    ),
]
JsonOption = Annotated[bool, typer.Option("--json", help="Print JSON only, on stdout.")]
ActorOption = Annotated[
    str | None, typer.Option("--actor", help="Who decides (recorded); default: the login name.")
]
ItemArgument = Annotated[int, typer.Argument(help="Its id in `pacs-node quarantine`.")]

quarantine_app = typer.Typer(
    help="Instances kept apart from every study: list them, release, re-assign or discard one.",
    invoke_without_command=True,
    no_args_is_help=False,
)


def _open(config: Path | None) -> Any:
    """(settings, catalog) for a command; errors end the command with the reason."""
    from pacs_node.catalog.db import open_catalog
    from pacs_node.cli import _fail, _settings
    from pacs_node.errors import PacsNodeError

    settings = _settings(config)
    try:
        return settings, open_catalog(settings.node.catalog_url, run_migrations=False)
    except PacsNodeError as exc:
        raise _fail(str(exc), 1) from exc


def _print_json(value: Any) -> None:
    sys.stdout.write(json.dumps(value, ensure_ascii=False) + "\n")


@quarantine_app.callback()
def quarantine(
    ctx: typer.Context, config: ConfigOption = None, json_output: JsonOption = False
) -> None:
    """List quarantined instances with the reason each was kept apart."""
    if ctx.invoked_subcommand is not None:
        return
    from pacs_node.catalog.quarantine import item_json, list_items
    from pacs_node.cli import out

    _settings, catalog = _open(config)
    try:
        with catalog.sessions() as session:
            items = [item_json(item) for item in list_items(session)]
    finally:
        catalog.dispose()
    if json_output:
        _print_json(items)
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


def _act(config: Path | None, what: str, action: Any) -> None:
    from pacs_node.cli import _fail, out
    from pacs_node.errors import PacsNodeError
    from pacs_node.ingest.spool import Spool

    settings, catalog = _open(config)
    spool = Spool(settings.node.spool_dir)
    try:
        with catalog.sessions.begin() as session:
            result = action(session, spool)
    except PacsNodeError as exc:
        raise _fail(f"{what}: {exc}", 1) from exc
    finally:
        catalog.dispose()
    out.print(f"{what}: {result}", highlight=False)


def _actor(actor: str | None) -> str:
    if actor:
        return actor
    try:
        return getpass.getuser()
    except (KeyError, OSError):
        return "unknown"


@quarantine_app.command("release")
def quarantine_release(
    item_id: ItemArgument, config: ConfigOption = None, actor: ActorOption = None
) -> None:
    """File the instance into a study of its own (new UIDs where its own collide)."""
    from pacs_node.ingest.quarantine import release

    def action(session: Any, spool: Any) -> str:
        filed = release(session, spool, item_id, _actor(actor))
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

    def action(session: Any, spool: Any) -> str:
        filed = reassign(session, spool, item_id, study, _actor(actor))
        return f"re-assigned to study {filed.study_uid}"

    _act(config, f"quarantine {item_id}", action)


@quarantine_app.command("discard")
def quarantine_discard(
    item_id: ItemArgument, config: ConfigOption = None, actor: ActorOption = None
) -> None:
    """Delete the instance's bytes; the row stays as discarded."""
    from pacs_node.ingest.quarantine import discard

    def action(session: Any, spool: Any) -> str:
        discard(session, spool, item_id, _actor(actor))
        return "discarded"

    _act(config, f"quarantine {item_id}", action)


def status(config: ConfigOption = None, json_output: JsonOption = False) -> None:
    """The node's health as the catalog and the spool tell it: catalog reachable or not (and
    since when the recorder could not write), counters, quarantine and studies held."""
    from sqlalchemy import func, select

    from pacs_node.catalog.db import open_catalog
    from pacs_node.catalog.models import QuarantineItem, QuarantineState, Study
    from pacs_node.catalog.studies import counters
    from pacs_node.cli import _settings, out
    from pacs_node.ingest.recorder import OUTAGE_FILE

    settings = _settings(config)
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
        _print_json(report)
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
        raise typer.Exit(1)


def register(app: typer.Typer) -> None:
    app.add_typer(quarantine_app, name="quarantine")
    app.command("status")(status)
