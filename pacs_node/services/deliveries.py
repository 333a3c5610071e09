"""The outbox by hand: list deliveries, retry one; release or reject a result the quality gate
held (a job's deliveries as a whole)."""

from __future__ import annotations

from collections.abc import Iterable

from pacs_node.actor import Actor
from pacs_node.catalog import deliveries as delivery_rows
from pacs_node.catalog import quality
from pacs_node.catalog.db import Catalog
from pacs_node.catalog.deliveries import DeliverySummary
from pacs_node.services.audit import audit_operation


def list_deliveries(catalog: Catalog, states: Iterable[str] | None = None) -> list[DeliverySummary]:
    """Deliveries (only those in ``states`` when given), oldest first."""
    with catalog.sessions() as session:
        return delivery_rows.list_deliveries(session, states=states)


def retry_delivery(catalog: Catalog, delivery_id: int, actor: Actor) -> bool:
    """held | dead -> pending now; False when it is in neither state, or the quality gate
    holds it (see :func:`release_result`)."""
    with catalog.sessions.begin() as session:
        done = delivery_rows.retry_delivery(session, delivery_id, actor)
    audit_operation(catalog, actor, "retry", delivery_id=delivery_id, ok=done)
    return done


def release_result(catalog: Catalog, job_id: int, actor: Actor) -> int:
    """Send a result the quality gate held: its deliveries become due now; how many."""
    with catalog.sessions.begin() as session:
        released = quality.release_result(session, job_id, actor)
    audit_operation(
        catalog, actor, "release", job_id=job_id, detail=f"released {released} deliveries"
    )
    return released


def reject_result(catalog: Catalog, job_id: int, actor: Actor, reason: str = "") -> int:
    """Reject a result the quality gate held: its deliveries are never sent; how many."""
    with catalog.sessions.begin() as session:
        rejected = quality.reject_result(session, job_id, actor, reason)
    audit_operation(catalog, actor, "reject", job_id=job_id, detail="rejected held result")
    return rejected
