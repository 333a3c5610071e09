"""The node's health as the catalog and the spool tell it (what ``status`` and a health
endpoint report): no patient data, only counts."""

from __future__ import annotations

import json
from dataclasses import dataclass, field

from sqlalchemy import func, select

from pacs_node.catalog.db import open_catalog
from pacs_node.catalog.models import QuarantineItem, QuarantineState, Study
from pacs_node.catalog.studies import counters
from pacs_node.config import Settings
from pacs_node.cpus import job_workers
from pacs_node.ingest.recorder import OUTAGE_FILE
from pacs_node.services.group import GroupView, JobQueueView, group_view, redact_url
from pacs_node.services.timeline import JsonValue


@dataclass(frozen=True, slots=True)
class CatalogCounts:
    counters: dict[str, int]
    studies: int
    quarantine_held: int


@dataclass(frozen=True, slots=True)
class NodeHealth:
    catalog: str  # the catalog's address, without credentials
    recorder: dict[str, JsonValue]  # the recorder's outage file, or that it is available
    counts: CatalogCounts | None  # None: the catalog could not be read
    catalog_error: str | None = None  # the exception's type when it could not
    # The job queue, the timer lease and the registered nodes (None: the catalog could not be
    # read; the job queue's backend and broker are still known from the configuration).
    group: GroupView | None = None
    configured_queue: JobQueueView | None = None
    healthy: bool = field(init=False)

    def __post_init__(self) -> None:
        available = self.counts is not None and self.recorder.get("catalog_available", True)
        healthy = bool(available) and not self.recorder.get("unrecorded")
        object.__setattr__(self, "healthy", healthy)

    def as_json(self) -> dict[str, JsonValue]:
        """The public shape of ``status --json``; fields are only ever added."""
        report: dict[str, JsonValue] = {"catalog": self.catalog, "recorder": self.recorder}
        if self.counts is not None:
            report["counters"] = dict(self.counts.counters)
            report["studies"] = self.counts.studies
            report["quarantine_held"] = self.counts.quarantine_held
        report["catalog_reachable"] = self.counts is not None
        if self.catalog_error is not None:
            report["catalog_error"] = self.catalog_error
        if self.group is not None:
            report.update(self.group.as_json())
        elif self.configured_queue is not None:
            report["job_queue"] = self.configured_queue.as_json()
        report["healthy"] = self.healthy
        return report


def recorder_state(settings: Settings) -> dict[str, JsonValue]:
    """The recorder's outage file (the catalog may be what is down, so it is not there)."""
    flag = settings.node.spool_dir / OUTAGE_FILE
    if not flag.exists():
        return {"catalog_available": True}
    try:
        state: dict[str, JsonValue] = json.loads(flag.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {"catalog_available": False, "last_error": "unreadable status file"}
    return state


def node_health(settings: Settings) -> NodeHealth:
    """Read the health; a catalog that cannot be opened or read is reported, never raised."""
    address = settings.node.catalog_url.split("@")[-1]
    recorder = recorder_state(settings)
    options = settings.node
    configured = JobQueueView(
        options.job_queue,
        redact_url(options.broker_url) if options.job_queue == "celery" else "",
        job_workers(options.job_workers)[0] if options.job_queue == "local" else 0,
        {},
    )
    try:
        catalog = open_catalog(settings.node.catalog_url, run_migrations=False)
        try:
            with catalog.sessions() as session:
                held = select(func.count(QuarantineItem.id)).where(
                    QuarantineItem.state == QuarantineState.HELD
                )
                counts = CatalogCounts(
                    counters=counters(session),
                    studies=session.scalar(select(func.count(Study.id))) or 0,
                    quarantine_held=session.scalar(held) or 0,
                )
                group = group_view(session, settings)
        finally:
            catalog.dispose()
    except Exception as exc:  # the point is to report it, not to fail on it
        return NodeHealth(address, recorder, None, type(exc).__name__, configured_queue=configured)
    return NodeHealth(address, recorder, counts, group=group, configured_queue=configured)
