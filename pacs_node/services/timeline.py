"""One timeline per study: its own events, its jobs' and its deliveries', in one shape.

The catalog keeps study events and job events apart (a delivery's events are its job's, naming
the delivery); this reads both and gives each a subject, so a reader sees one ordered list of
(time, kind, subject, actor, detail) whoever recorded it.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

from sqlalchemy import select
from sqlalchemy.orm import Session

from pacs_node.actor import Actor
from pacs_node.catalog.models import Job, JobEvent, StudyEvent

JsonScalar = str | int | float | bool | None
JsonValue = JsonScalar | list["JsonValue"] | dict[str, "JsonValue"]


class SubjectKind(enum.StrEnum):
    STUDY = "study"
    JOB = "job"
    DELIVERY = "delivery"


@dataclass(frozen=True, slots=True)
class Subject:
    """What an event happened to: a study (by UID), a job or a delivery (by id)."""

    kind: SubjectKind
    id: str

    def __str__(self) -> str:
        return f"{self.kind.value} {self.id}"


@dataclass(frozen=True, slots=True)
class TimelineEvent:
    at: datetime
    kind: str
    subject: Subject
    actor: Actor | None  # None: the event names no one (recorded before actors were, or by a stage)
    detail: dict[str, JsonValue] = field(default_factory=dict)

    def as_json(self) -> dict[str, JsonValue]:
        return {
            "at": self.at.isoformat(),
            "kind": self.kind,
            "subject": {"kind": self.subject.kind.value, "id": self.subject.id},
            "actor": str(self.actor) if self.actor else None,
            "detail": self.detail,
        }


def _event(
    at: datetime, kind: str, subject: Subject, stored: dict[str, Any] | None
) -> TimelineEvent:
    detail: dict[str, JsonValue] = dict(stored or {})  # a copy: the row's value stays as it is
    named = detail.pop("actor", None)
    if named is None:  # events recorded before actors were: who acted was kept as "by"
        named = detail.pop("by", None)
    actor: Actor | None = None
    if isinstance(named, str):
        try:
            actor = Actor.parse(named)
        except ValueError:  # a bare name: a person's (quarantine decisions record it so)
            actor = Actor.user(named)
    if subject.kind is SubjectKind.JOB and isinstance(detail.get("delivery"), int):
        subject = Subject(SubjectKind.DELIVERY, str(detail["delivery"]))
    return TimelineEvent(at, kind, subject, actor, detail)


def study_timeline(session: Session, study_id: int, study_uid: str) -> list[TimelineEvent]:
    """Every event of the study, its jobs and their deliveries, oldest first (ties in the
    order they were recorded: study events before job events)."""
    study = Subject(SubjectKind.STUDY, study_uid)
    events = [
        _event(e.at, e.kind, study, e.detail)
        for e in session.scalars(
            select(StudyEvent).where(StudyEvent.study_id == study_id).order_by(StudyEvent.id)
        )
    ]
    events += [
        _event(e.at, e.kind, Subject(SubjectKind.JOB, str(e.job_id)), e.detail)
        for e in session.scalars(
            select(JobEvent)
            .join(Job, Job.id == JobEvent.job_id)
            .where(Job.study_id == study_id)
            .order_by(JobEvent.id)
        )
    ]
    return sorted(events, key=lambda e: e.at)  # stable: each table's order kept within a time
