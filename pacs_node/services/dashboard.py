"""What the dashboard pages read: a page of studies with their jobs and deliveries, the newest
jobs and deliveries, each model's card and held-out metrics, and the node's health with its
disk, queue depth, throughput and peers.

Queries only; the pages render them. Every list is bounded (a page, or the newest rows), so a
page that refreshes itself every few seconds stays cheap on a node holding years of studies.
"""

from __future__ import annotations

import json
import logging
import shutil
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import timedelta
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit, urlunsplit

from sqlalchemy import ColumnElement, func, or_, select

from pacs_node.catalog.db import Catalog
from pacs_node.catalog.deliveries import DeliverySummary, list_deliveries
from pacs_node.catalog.jobs import JobSummary, list_jobs
from pacs_node.catalog.models import (
    Delivery,
    DeliveryState,
    Instance,
    Job,
    JobState,
    Study,
    utcnow,
)
from pacs_node.catalog.studies import StudySummary, list_studies
from pacs_node.config import Settings
from pacs_node.destinations import DicomWebDestination, DimseDestination, FhirDestination
from pacs_node.services.models import ModelEntry, list_models
from pacs_node.services.status import NodeHealth, node_health

log = logging.getLogger(__name__)

PAGE_SIZE = 25
NEWEST = 200  # rows the jobs and deliveries pages show
HELDOUT_METRICS = Path("eval") / "heldout" / "metrics.json"
THROUGHPUT_WINDOW = timedelta(hours=1)


# A job's stages in the order they run (the worker's and the model runner's timings).
STAGE_ORDER = ("queued", "decode", "load", "preprocess", "infer", "postprocess", "build", "store")


def stage_seconds(timings: dict[str, float]) -> list[tuple[str, float]]:
    """A job's stage timings (``decode_s``: seconds) in the order the stages ran, without the
    total; a stage this list does not know comes last."""
    stages = {k.removesuffix("_s"): v for k, v in timings.items() if k != "total_s"}
    rank = {name: n for n, name in enumerate(STAGE_ORDER)}
    return sorted(stages.items(), key=lambda item: rank.get(item[0], len(rank)))


@dataclass(frozen=True, slots=True)
class StudyRow:
    """One line of the studies page: the study, the modalities of its series, its jobs and how
    many of its deliveries are in each state."""

    summary: StudySummary
    jobs: tuple[JobSummary, ...]
    deliveries: dict[str, int]

    @property
    def modalities(self) -> str:
        found = dict.fromkeys(s.modality for s in self.summary.series if s.modality)
        return ", ".join(found)

    @property
    def models(self) -> str:
        return ", ".join(dict.fromkeys(j.model for j in self.jobs))


@dataclass(frozen=True, slots=True)
class StudyPage:
    rows: tuple[StudyRow, ...]
    total: int  # studies matching the search, on every page
    offset: int
    limit: int

    @property
    def has_previous(self) -> bool:
        return self.offset > 0

    @property
    def has_next(self) -> bool:
        return self.offset + self.limit < self.total


def _like(text: str) -> str:
    escaped = text.replace("\\", "\\\\").replace("%", "\\%").replace("_", "\\_")
    return f"%{escaped}%"


def study_date_key(value: str) -> str:
    """A date as the catalog holds it (DICOM DA, YYYYMMDD) from YYYY-MM-DD or YYYYMMDD."""
    return value.strip().replace("-", "")


def study_page(
    catalog: Catalog, *, text: str = "", date: str = "", offset: int = 0, limit: int = PAGE_SIZE
) -> StudyPage:
    """Studies newest first, matching ``text`` (in patient name or ID, accession number, or
    the whole Study UID) and ``date`` (the study date), ``limit`` from ``offset``."""
    conditions: list[ColumnElement[bool]] = []
    text = text.strip()
    if text:
        pattern = _like(text)
        conditions.append(
            or_(
                Study.patient_name.ilike(pattern, escape="\\"),
                Study.patient_id.ilike(pattern, escape="\\"),
                Study.accession_number.ilike(pattern, escape="\\"),
                Study.study_uid == text,
            )
        )
    if date.strip():
        conditions.append(Study.study_date == study_date_key(date))
    offset, limit = max(0, offset), max(1, limit)
    with catalog.sessions() as session:
        total = session.scalar(select(func.count(Study.id)).where(*conditions)) or 0
        found = session.execute(
            select(Study.id, Study.study_uid)
            .where(*conditions)
            .order_by(Study.last_received_at.desc(), Study.id.desc())
            .offset(offset)
            .limit(limit)
        ).all()
        ids = [row.id for row in found]
        summaries = {s.study_uid: s for s in list_studies(session, [r.study_uid for r in found])}
        job_ids = list(session.scalars(select(Job.id).where(Job.study_id.in_(ids))))
        jobs: dict[str, list[JobSummary]] = {}
        for job in list_jobs(session, job_ids):
            jobs.setdefault(job.study_uid, []).append(job)
        counts: dict[int, dict[str, int]] = {}
        for study_id, state, count in session.execute(
            select(Job.study_id, Delivery.state, func.count(Delivery.id))
            .join(Job, Job.id == Delivery.job_id)
            .where(Job.study_id.in_(ids))
            .group_by(Job.study_id, Delivery.state)
        ).all():
            counts.setdefault(study_id, {})[str(state.value)] = int(count)
    rows = tuple(
        StudyRow(summaries[r.study_uid], tuple(jobs.get(r.study_uid, [])), counts.get(r.id, {}))
        for r in found
        if r.study_uid in summaries
    )
    return StudyPage(rows, total, offset, limit)


def newest_jobs(catalog: Catalog, limit: int = NEWEST) -> list[JobSummary]:
    """The ``limit`` newest jobs, newest first."""
    with catalog.sessions() as session:
        ids = list(session.scalars(select(Job.id).order_by(Job.id.desc()).limit(limit)))
        return sorted(list_jobs(session, ids), key=lambda j: -j.id)


def newest_deliveries(
    catalog: Catalog, states: Sequence[str] | None = None, limit: int = NEWEST
) -> list[DeliverySummary]:
    """The ``limit`` newest deliveries (in ``states`` when given), newest first."""
    with catalog.sessions() as session:
        query = select(Delivery.job_id).order_by(Delivery.id.desc()).limit(limit)
        if states:
            query = query.where(Delivery.state.in_([DeliveryState(s) for s in states]))
        job_ids = set(session.scalars(query))
        found = [
            d
            for job_id in sorted(job_ids)
            for d in list_deliveries(session, job_id=job_id, states=states or None)
        ]
    return sorted(found, key=lambda d: -d.id)[:limit]


@dataclass(frozen=True, slots=True)
class ModelCard:
    """A model as its page shows it: the bundle, its card's text, held-out metrics per label."""

    entry: ModelEntry
    card: str  # docs/README.md, "" when the bundle has none
    metrics: dict[str, dict[str, float]] = field(default_factory=dict)
    metrics_cases: int = 0


def _heldout(root: Path) -> tuple[dict[str, dict[str, float]], int]:
    path = root / HELDOUT_METRICS
    if not path.is_file():
        return {}, 0
    try:
        document: dict[str, Any] = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        log.warning("unreadable held-out metrics", extra={"path": str(path)})
        return {}, 0
    summary = document.get("summary", {})
    metrics = {
        str(label): {k: float(v) for k, v in values.items() if isinstance(v, int | float)}
        for label, values in summary.items()
        if isinstance(values, dict)
    }
    return metrics, int(document.get("cases", 0))


def model_cards(settings: Settings) -> list[ModelCard]:
    """Every installed bundle with its model card and held-out metrics."""
    cards = []
    for entry in list_models(settings):
        path = entry.bundle.model_card
        text = path.read_text(encoding="utf-8") if path is not None else ""
        metrics, cases = _heldout(entry.bundle.root)
        cards.append(ModelCard(entry, text, metrics, cases))
    return cards


@dataclass(frozen=True, slots=True)
class Peer:
    """A configured peer or destination, as the health page lists it (no secrets)."""

    name: str
    kind: str
    address: str


@dataclass(frozen=True, slots=True)
class NodeOverview:
    """The health page: the node's health, its disk, queue depth and recent throughput."""

    health: NodeHealth
    disk_total_bytes: int
    disk_free_bytes: int
    jobs_by_state: dict[str, int]
    deliveries_by_state: dict[str, int]
    jobs_done_last_hour: int
    instances_last_hour: int
    peers: tuple[Peer, ...]

    @property
    def disk_used_percent(self) -> float:
        if not self.disk_total_bytes:
            return 0.0
        return 100.0 * (1 - self.disk_free_bytes / self.disk_total_bytes)

    @property
    def rejected_associations(self) -> int:
        counts = self.health.counts
        return 0 if counts is None else counts.counters.get("rejected_associations", 0)


def _without_credentials(url: str) -> str:
    parts = urlsplit(url)
    host = parts.netloc.rpartition("@")[2]
    return urlunsplit((parts.scheme, host, parts.path, "", ""))


def _peers(settings: Settings) -> tuple[Peer, ...]:
    peers = [
        Peer(p.ae_title, "peer", f"{p.host or 'any host'}:{p.port}" if p.port else "sends only")
        for p in settings.peers
    ]
    for name, destination in settings.destinations.items():
        if isinstance(destination, DimseDestination):
            address = (
                f"peer {destination.peer}"
                if destination.peer
                else f"{destination.ae_title}@{destination.host}:{destination.port}"
            )
        elif isinstance(destination, DicomWebDestination):
            address = _without_credentials(str(destination.url))
        elif isinstance(destination, FhirDestination):
            address = _without_credentials(str(destination.base_url))
        else:
            address = ""
        peers.append(Peer(name, str(destination.type), address))
    return tuple(peers)


def node_overview(catalog: Catalog, settings: Settings) -> NodeOverview:
    """Health (as ``pacs-node status``), the data folder's disk, jobs and deliveries by
    state, and what the last hour received and finished."""
    health = node_health(settings)
    folder = settings.node.data_dir
    probe = folder if folder.exists() else folder.resolve().parent
    while not probe.exists() and probe != probe.parent:
        probe = probe.parent
    disk = shutil.disk_usage(probe)
    since = utcnow() - THROUGHPUT_WINDOW
    with catalog.sessions() as session:
        jobs = {
            str(state.value): int(count)
            for state, count in session.execute(
                select(Job.state, func.count(Job.id)).group_by(Job.state)
            ).all()
        }
        deliveries = {
            str(state.value): int(count)
            for state, count in session.execute(
                select(Delivery.state, func.count(Delivery.id)).group_by(Delivery.state)
            ).all()
        }
        done = session.scalar(
            select(func.count(Job.id)).where(Job.state == JobState.DONE, Job.finished_at >= since)
        )
        received = session.scalar(
            select(func.count(Instance.id)).where(Instance.received_at >= since)
        )
    return NodeOverview(
        health=health,
        disk_total_bytes=disk.total,
        disk_free_bytes=disk.free,
        jobs_by_state=jobs,
        deliveries_by_state=deliveries,
        jobs_done_last_hour=int(done or 0),
        instances_last_hour=int(received or 0),
        peers=_peers(settings),
    )
