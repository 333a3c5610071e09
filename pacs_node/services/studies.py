"""Studies: the list, and one study with its series, jobs, results, deliveries and timeline."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime

from sqlalchemy import select

from pacs_node.catalog.db import Catalog
from pacs_node.catalog.deliveries import DeliverySummary, list_deliveries
from pacs_node.catalog.jobs import JobSummary, list_jobs
from pacs_node.catalog.models import Job, Result, Study
from pacs_node.catalog.studies import StudySummary
from pacs_node.catalog.studies import list_studies as study_summaries
from pacs_node.services.timeline import JsonValue, TimelineEvent, study_timeline


@dataclass(frozen=True, slots=True)
class ResultSummary:
    """One stored result object of a job."""

    id: int
    job_id: int
    kind: str
    sop_class_uid: str | None
    sop_instance_uid: str | None
    series_uid: str | None
    size_bytes: int
    destination: str | None
    created_at: datetime

    def as_json(self) -> dict[str, JsonValue]:
        return {
            "id": self.id,
            "job_id": self.job_id,
            "kind": self.kind,
            "sop_class_uid": self.sop_class_uid,
            "sop_instance_uid": self.sop_instance_uid,
            "series_uid": self.series_uid,
            "size_bytes": self.size_bytes,
            "destination": self.destination,
            "created_at": self.created_at.isoformat(),
        }


@dataclass(frozen=True, slots=True)
class StudyDetail:
    """A study as a page shows it: its summary (with series), jobs, results, deliveries and
    one timeline of everything that happened to it."""

    summary: StudySummary
    jobs: tuple[JobSummary, ...]
    results: tuple[ResultSummary, ...]
    deliveries: tuple[DeliverySummary, ...]
    timeline: tuple[TimelineEvent, ...]

    def as_json(self) -> dict[str, JsonValue]:
        return {
            **self.summary.as_json(),
            "jobs": [j.as_json() for j in self.jobs],
            "results": [r.as_json() for r in self.results],
            "deliveries": [d.as_json() for d in self.deliveries],
            "timeline": [e.as_json() for e in self.timeline],
        }


def list_studies(catalog: Catalog) -> list[StudySummary]:
    """Every received study with its series, assembly state and processing status."""
    with catalog.sessions() as session:
        return study_summaries(session)


def study_detail(catalog: Catalog, study_uid: str) -> StudyDetail | None:
    """One study in full; None when the catalog has no such study."""
    with catalog.sessions() as session:
        study = session.scalars(select(Study).where(Study.study_uid == study_uid)).first()
        if study is None:
            return None
        (summary,) = study_summaries(session, [study_uid])
        job_ids = list(session.scalars(select(Job.id).where(Job.study_id == study.id)))
        results = tuple(
            ResultSummary(
                id=r.id,
                job_id=r.job_id,
                kind=r.kind,
                sop_class_uid=r.sop_class_uid,
                sop_instance_uid=r.sop_instance_uid,
                series_uid=r.series_uid,
                size_bytes=r.size_bytes,
                destination=r.destination,
                created_at=r.created_at,
            )
            for r in session.scalars(
                select(Result).where(Result.job_id.in_(job_ids)).order_by(Result.id)
            )
        )
        deliveries = tuple(d for job_id in job_ids for d in list_deliveries(session, job_id=job_id))
        return StudyDetail(
            summary=summary,
            jobs=tuple(list_jobs(session, job_ids)),
            results=results,
            deliveries=deliveries,
            timeline=tuple(study_timeline(session, study.id, study_uid)),
        )
