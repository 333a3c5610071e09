"""The audit trail's rows: append, list, and the syslog forwarder's queue (unsent, in order).

Rows are appended and never removed (retention leaves this table alone); only
``forwarded_at`` changes, once, when the collector has taken the message.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime

from sqlalchemy import func, select, update
from sqlalchemy.orm import Session

from pacs_node.audit.events import AuditEvent, StudyObject, participants_json
from pacs_node.audit.message import build
from pacs_node.catalog.models import (
    AuditRecord,
    Delivery,
    Instance,
    Job,
    Result,
    Series,
    Study,
    StudyEvent,
    utcnow,
)

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class AuditRow:
    """One stored audit event, as the CLI and the API list it."""

    id: int
    event_id: str
    event_type: str | None
    action: str
    outcome: int
    time: str
    actor: str
    participants: list[str]
    description: str | None
    message: str
    forwarded: bool

    def as_json(self) -> dict[str, object]:
        return {
            "id": self.id,
            "event_id": self.event_id,
            "event_type": self.event_type,
            "action": self.action,
            "outcome": self.outcome,
            "time": self.time,
            "actor": self.actor,
            "participants": self.participants,
            "description": self.description,
            "forwarded": self.forwarded,
        }


def add_events(session: Session, items: Sequence[tuple[AuditEvent, bytes]]) -> None:
    """Append (event, its AuditMessage XML) pairs in order."""
    for event, xml in items:
        session.add(
            AuditRecord(
                at=event.at,
                event_time=event.at.isoformat(),
                event_id=event.event_id.code,
                event_type=event.types[0].code if event.types else None,
                action=event.action,
                outcome=int(event.outcome),
                actor=event.actor[:255],
                participants=participants_json(event),
                description=event.description,
                message=xml.decode("utf-8"),
            )
        )


def add_events_within(session: Session, events: Sequence[AuditEvent]) -> int:
    """Append ``events`` in the caller's transaction (a settle, a purge) without ever putting
    it at risk: each is built first, then all are written in a savepoint. One that cannot be
    built or written is logged at ERROR (its code and the error's class, never its content:
    that quotes patient IDs) and left out; what is audited commits. The count recorded."""
    built: list[tuple[AuditEvent, bytes]] = []
    for event in events:
        try:
            built.append((event, build(event)))
        except Exception as exc:  # a builder defect: never the settle's or the purge's fault
            _not_recorded(event, exc)
    if not built:
        return 0
    try:
        with session.begin_nested():
            add_events(session, built)
            session.flush()
    except Exception as exc:
        for event, _ in built:
            _not_recorded(event, exc)
        return 0
    return len(built)


def _not_recorded(event: AuditEvent, exc: BaseException) -> None:
    log.error(
        "audit event not recorded",
        extra={
            "event_id": event.event_id.code,
            "action": event.action,
            "error": type(exc).__name__,
        },
    )


def _row(record: AuditRecord) -> AuditRow:
    return AuditRow(
        id=record.id,
        event_id=record.event_id,
        event_type=record.event_type,
        action=record.action,
        outcome=record.outcome,
        time=record.event_time,
        actor=record.actor,
        participants=list(record.participants or []),
        description=record.description,
        message=record.message,
        forwarded=record.forwarded_at is not None,
    )


@dataclass(frozen=True)
class AuditPage:
    """A page of the trail, oldest first. ``truncated``: more matched than the limit let in:
    older ones (a page of the newest) or newer ones (a page after an id: go on from
    ``rows[-1].id``)."""

    rows: list[AuditRow]
    truncated: bool


def list_events(
    session: Session,
    since: datetime | None = None,
    limit: int = 1000,
    *,
    after_id: int | None = None,
) -> AuditPage:
    """The newest ``limit`` events from ``since`` (aware) on; with ``after_id``, the first
    ``limit`` after that id instead (a cursor: walk the trail from its start with 0)."""
    query = select(AuditRecord)
    if since is not None:
        query = query.where(AuditRecord.at >= since)
    if after_id is not None:
        query = query.where(AuditRecord.id > after_id).order_by(AuditRecord.id)
    else:
        query = query.order_by(AuditRecord.id.desc())
    found = [_row(r) for r in session.scalars(query.limit(limit + 1))]
    truncated = len(found) > limit
    rows = found[:limit]
    if after_id is None:
        rows.reverse()
    return AuditPage(rows, truncated)


def unsent(session: Session, limit: int = 100) -> list[tuple[int, str, datetime]]:
    """The oldest messages the collector has not yet taken: (id, XML, the event's time with
    its offset), in order."""
    query = (
        select(AuditRecord.id, AuditRecord.message, AuditRecord.event_time)
        .where(AuditRecord.forwarded_at.is_(None))
        .order_by(AuditRecord.id)
        .limit(limit)
    )
    return [(int(i), str(m), datetime.fromisoformat(t)) for i, m, t in session.execute(query)]


def mark_forwarded(session: Session, ids: Sequence[int]) -> None:
    if ids:
        session.execute(
            update(AuditRecord).where(AuditRecord.id.in_(ids)).values(forwarded_at=utcnow())
        )


def study_object(session: Session, study_uid: str) -> StudyObject | None:
    """A study as an audit event names it: UID, patient, instances per SOP class."""
    study = session.scalar(select(Study).where(Study.study_uid == study_uid))
    if study is None:
        return None
    counts = session.execute(
        select(Instance.sop_class_uid, func.count())
        .join(Series, Instance.series_id == Series.id)
        .where(Series.study_id == study.id)
        .group_by(Instance.sop_class_uid)
        .order_by(Instance.sop_class_uid)
    )
    return StudyObject(
        study.study_uid,
        study.patient_id,
        tuple((str(uid), int(n)) for uid, n in counts),
        study.accession_number,
        study.patient_name,
    )


def job_study(session: Session, job_id: int) -> StudyObject | None:
    """The study a job's results belong to (no instance counts: results are counted apart)."""
    row = session.execute(
        select(Study.study_uid, Study.patient_id, Study.accession_number, Study.patient_name)
        .join(Job, Job.study_id == Study.id)
        .where(Job.id == job_id)
    ).first()
    if row is None:
        return None
    return StudyObject(str(row[0]), row[1], accession=row[2], patient_name=row[3])


def delivery_study(session: Session, delivery_id: int) -> StudyObject | None:
    """The study a delivery's result belongs to."""
    job_id = session.scalar(
        select(Result.job_id)
        .join(Delivery, Delivery.result_id == Result.id)
        .where(Delivery.id == delivery_id)
    )
    return None if job_id is None else job_study(session, int(job_id))


def study_source(session: Session, study_uid: str) -> str:
    """Who sent a study: its calling AE, else the STOW-RS user its first receipt names."""
    study = session.scalar(select(Study).where(Study.study_uid == study_uid))
    if study is None:
        return "unknown"
    if study.calling_ae:
        return study.calling_ae
    details = session.scalars(
        select(StudyEvent.detail)
        .where(StudyEvent.study_id == study.id, StudyEvent.kind == "receiving")
        .order_by(StudyEvent.id)
    )
    for detail in details:
        if detail and detail.get("sender"):
            return str(detail["sender"])
    return "unknown"
