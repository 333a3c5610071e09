"""``pacs-node routes check`` and ``pacs-node routes explain STUDY_UID``."""

from __future__ import annotations

import json
import sys
from dataclasses import asdict
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console
from rich.tree import Tree

from pacs_node.config import Settings, load_settings
from pacs_node.errors import PacsNodeError

routes_app = typer.Typer(help="Check the routing rules, and explain how a study was routed.")
out = Console()
err = Console(stderr=True)

ConfigOption = Annotated[
    Path | None, typer.Option("--config", help="Folder with routes.yaml.", show_default=False)
]


def _load(config: Path | None) -> Settings:
    try:
        return load_settings(config)
    except PacsNodeError as exc:
        err.print(f"[bold red]error:[/] configuration: {exc}", highlight=False)
        raise typer.Exit(2) from exc


@routes_app.command("check")
def check(config: ConfigOption = None) -> None:
    """Validate routes.yaml and that every model it names is installed."""
    from pacs_node.routing.router import check_models

    settings = _load(config)
    try:
        check_models(settings)
    except PacsNodeError as exc:
        err.print(f"[bold red]error:[/] {exc}", highlight=False)
        raise typer.Exit(1) from exc
    enabled = sum(rule.enabled for rule in settings.routes.rules)
    out.print(f"routes ok: {len(settings.routes.rules)} rules, {enabled} enabled", highlight=False)


@routes_app.command("explain")
def explain(
    study_uid: Annotated[str, typer.Argument(help="Study Instance UID")],
    config: ConfigOption = None,
    json_output: Annotated[bool, typer.Option("--json", help="Print JSON only.")] = False,
) -> None:
    """Say, for each rule and series, why it did or did not match."""
    from sqlalchemy.exc import NoResultFound

    from pacs_node.catalog.db import open_catalog
    from pacs_node.ingest.spool import Spool
    from pacs_node.routing.router import Router

    settings = _load(config)
    try:
        catalog = open_catalog(settings.node.catalog_url, run_migrations=False)
    except PacsNodeError as exc:
        err.print(f"[bold red]error:[/] {exc}", highlight=False)
        raise typer.Exit(1) from exc
    router = Router(catalog, Spool(settings.node.spool_dir), settings.routes)
    try:
        with catalog.sessions() as session:
            verdicts = router.explain(session, study_uid)
    except NoResultFound as exc:
        err.print(f"[bold red]error:[/] no study {study_uid}", highlight=False)
        raise typer.Exit(1) from exc
    finally:
        catalog.dispose()
    if json_output:
        sys.stdout.write(json.dumps([asdict(v) for v in verdicts]) + "\n")
        return
    if not verdicts:
        out.print("no rules: every study is unrouted", highlight=False)
    for verdict in verdicts:
        mark = "[green]matched[/]" if verdict.matched else "[red]no match[/]"
        tree = Tree(f"rule [bold]{verdict.rule}[/]: {mark} ({verdict.reason})")
        for series in verdict.series:
            chosen = " [bold green](selected)[/]" if series.series_uid in verdict.selected else ""
            branch = tree.add(f"series {series.series_uid}{chosen}")
            for check in series.checks:
                sign = "[green]✓[/]" if check.passed else "[red]✗[/]"
                branch.add(f"{sign} {check.attribute}: {check.reason}")
        out.print(tree, highlight=False)
