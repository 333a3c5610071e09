"""Quarantine by hand: list the instances kept apart, release, reassign or discard one.

The decision records the actor's name on the row (``resolved_by``) and in the study events.
"""

from __future__ import annotations

from pacs_node.actor import Actor
from pacs_node.catalog.db import Catalog
from pacs_node.catalog.quarantine import item_json, list_items
from pacs_node.config import Settings
from pacs_node.ingest import quarantine
from pacs_node.ingest.quarantine import Filed
from pacs_node.ingest.spool import Spool
from pacs_node.services.timeline import JsonValue


def list_quarantined(catalog: Catalog) -> list[dict[str, JsonValue]]:
    """Every quarantine row (held and resolved) in the public shape of ``quarantine --json``."""
    with catalog.sessions() as session:
        return [item_json(item) for item in list_items(session)]


def release(catalog: Catalog, settings: Settings, item_id: int, actor: Actor) -> Filed:
    """File the instance into a study of its own (new UIDs where its own collide)."""
    with catalog.sessions.begin() as session:
        return quarantine.release(session, Spool(settings.node.spool_dir), item_id, actor.name)


def reassign(
    catalog: Catalog, settings: Settings, item_id: int, study_uid: str, actor: Actor
) -> Filed:
    """File the instance into an existing study an operator names."""
    with catalog.sessions.begin() as session:
        spool = Spool(settings.node.spool_dir)
        return quarantine.reassign(session, spool, item_id, study_uid, actor.name)


def discard(catalog: Catalog, settings: Settings, item_id: int, actor: Actor) -> None:
    """Delete the instance's bytes; the row stays, discarded."""
    with catalog.sessions.begin() as session:
        quarantine.discard(session, Spool(settings.node.spool_dir), item_id, actor.name)
