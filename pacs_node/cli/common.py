"""What every command of the node shares: the ``--config`` and ``--json`` options, the one
settings loader and the catalog a command opens."""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Annotated

import typer

from pacs_node.actor import Actor
from pacs_node.cli.console import FAILED, fail
from pacs_node.config import Settings, load_settings
from pacs_node.datadir import make_private
from pacs_node.errors import PacsNodeError
from pacs_node.logs import configure_node_logging

if TYPE_CHECKING:  # the catalog (SQLAlchemy, alembic) loads only for commands that open it
    from pacs_node.catalog.db import Catalog

ConfigOption = Annotated[
    Path | None,
    typer.Option(
        "--config", help="Folder with node.yaml, peers.yaml and routes.yaml.", show_default=False
    ),
]
JsonOption = Annotated[bool, typer.Option("--json", help="Print JSON only, on stdout.")]
ModelsDirOption = Annotated[
    Path | None, typer.Option("--models-dir", help="Folder of model bundles.", show_default=False)
]
ModelArgument = Annotated[str, typer.Argument(help="Model bundle name (see `pacs-node models`).")]
Overrides = Mapping[str, str | int | float | bool | Path | None]


def settings_for(
    config: Path | None, overrides: Overrides | None = None, *, node_logging: bool = True
) -> Settings:
    """The settings a command runs with; a bad configuration ends it (exit 2) naming the file,
    key and reason. ``node_logging``: log as the node does (every command but ``routes``)."""
    try:
        settings = load_settings(config, dict(overrides) if overrides is not None else None)
    except PacsNodeError as exc:
        fail(f"configuration: {exc}")
    if node_logging:
        configure_node_logging(settings.node)
    return settings


@contextmanager
def opened_catalog(settings: Settings, *, migrate: bool = False) -> Iterator[Catalog]:
    """The node's catalog for one command, disposed after it; one that cannot be opened ends
    the command (exit 1). ``migrate``: bring the schema up to date (commands that write jobs
    or deliveries); the rest never change a schema a running node uses."""
    from pacs_node.catalog.db import open_catalog, sqlite_file

    url = settings.node.catalog_url
    try:
        if migrate:
            make_private(settings.node.data_dir, sqlite_file(url))
        catalog = open_catalog(url, run_migrations=migrate)
    except (PacsNodeError, OSError) as exc:
        fail(str(exc), FAILED)
    try:
        yield catalog
    finally:
        catalog.dispose()


def change(config: Path | None, action: Callable[[Catalog], int]) -> int:
    """Run one change by hand (a retry, a cancel, a decision) on the migrated catalog; how
    many rows it changed (0: the state did not allow it)."""
    with opened_catalog(settings_for(config), migrate=True) as catalog:
        return action(catalog)


def user(given: str | None = None) -> Actor:
    """The person at the keyboard, for the events a change records: ``--actor`` when given,
    else the login name from the environment (``operator`` when there is none)."""
    return Actor.user(given or os.environ.get("USER") or os.environ.get("LOGNAME") or "operator")
