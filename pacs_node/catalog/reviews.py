"""A person's review of a job's result in the catalog: accepted, or rejected with a reason.

A rejection is one transaction: the job's ``qa_decision`` becomes ``rejected`` (what the node's
own archive filters on), every delivery of it not yet gone out (pending, held, dead) becomes
``rejected`` (never sent), and a ``rejected`` job event keeps who, when, why (the person's words
as ``reason_text``, and the coded title), which model and version, and how many deliveries it
stopped. What already went out (delivered, or being sent) is listed by :func:`sent_results`, so
the caller can withdraw it there (:mod:`pacs_node.services.corrections`) through
:func:`queue_withdrawals`. The quality gate's reject of a held result is the same path.

An acceptance is an ``accepted`` job event (a result the quality gate holds is released by it,
:func:`pacs_node.catalog.quality.release_result`); :func:`review_counts` counts each job's
latest review per model and version.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from sqlalchemy import select, update
from sqlalchemy.orm import Session

from pacs_node.actor import Actor
from pacs_node.catalog.deliveries import JOB_REJECTED, create_deliveries
from pacs_node.catalog.jobs import add_job_event
from pacs_node.catalog.models import (
    Delivery,
    DeliveryState,
    Job,
    JobEvent,
    JobState,
    Result,
    Study,
    utcnow,
)
from pacs_node.catalog.results import StoredEncoding, add_result_rows
from pacs_node.errors import RequestError
from pacs_node.outputs import OutputKind
from pacs_node.review import RejectionKind

REJECTED = JOB_REJECTED
ACCEPTED = "accepted"
REVIEWED = (ACCEPTED, REJECTED)  # the job events a review appends
# deliveries that have not gone out: a rejection stops them for good
_NOT_SENT = (DeliveryState.PENDING, DeliveryState.HELD, DeliveryState.DEAD)
# deliveries that have gone out, or are going: a rejection withdraws them there
_SENT = (DeliveryState.DELIVERED, DeliveryState.SENDING)


MAX_REASON_TEXT = 1000


def _as_given(reason: str) -> str:
    """A person's reason, kept as written (one line, bounded) under ``reason_text``: the audit
    needs their words, which the whitelist scrubbing of system errors (``reason``) would
    reduce to gaps. The catalog holds patient data anyway; this text is never logged."""
    return " ".join(reason.split())[:MAX_REASON_TEXT]


class ReviewRefused(RequestError):
    """The job cannot be reviewed so (unknown, not done, already rejected); the message says
    why."""


class UnknownJob(ReviewRefused):
    """No job has this id."""


@dataclass(frozen=True)
class ReviewedJob:
    """The job a review is about, as the review records it."""

    job_id: int
    study_uid: str
    model: str
    model_version: str | None  # as its run recorded it; None for jobs run before that was kept
    decision: str | None  # jobs.qa_decision


@dataclass(frozen=True)
class SentResult:
    """A result of the job that reached (or is reaching) a destination."""

    result_id: int
    kind: str
    destination: str
    sop_class_uid: str | None  # None: the FHIR Bundle
    sop_instance_uid: str | None
    encodings: dict[str, str]
    patient_search: str | None


@dataclass(frozen=True)
class ReviewCount:
    model: str
    model_version: str | None
    accepted: int
    rejected: int

    def as_json(self) -> dict[str, Any]:
        return {
            "model": self.model,
            "model_version": self.model_version,
            "accepted": self.accepted,
            "rejected": self.rejected,
        }


def reviewed_job(session: Session, job_id: int) -> ReviewedJob:
    """The done job ``job_id`` (its row locked for this transaction); ReviewRefused if there
    is none, or it has no result yet."""
    # a write first: SQLite's write lock (PostgreSQL: this row's), so two reviews of one job
    # decided at once are taken one after the other
    session.execute(update(Job).where(Job.id == job_id).values(qa_decision=Job.qa_decision))
    row = session.execute(
        select(Job, Study.study_uid).join(Study, Study.id == Job.study_id).where(Job.id == job_id)
    ).one_or_none()
    if row is None:
        raise UnknownJob(f"no job {job_id}")
    job, study_uid = row
    if job.state is not JobState.DONE:
        raise ReviewRefused(f"job {job_id} is {job.state.value}: only a done job has a result")
    done = session.scalar(
        select(JobEvent.detail)
        .where(JobEvent.job_id == job_id, JobEvent.kind == "done")
        .order_by(JobEvent.id.desc())
        .limit(1)
    )
    version = (done or {}).get("model_version")
    return ReviewedJob(
        job_id=job.id,
        study_uid=study_uid,
        model=job.model,
        model_version=str(version) if version is not None else None,
        decision=job.qa_decision,
    )


def reject_job(
    session: Session,
    job: ReviewedJob,
    actor: Actor,
    reason: str,
    kind: RejectionKind,
    model_version: str | None = None,
    fhir_kept: Sequence[str] = (),
) -> int:
    """Reject ``job`` (from :func:`reviewed_job` in this transaction): its decision, its
    deliveries not yet sent stopped, the event; how many deliveries were stopped.
    ``model_version``: when the caller read it from the stored objects; ``fhir_kept``: the EHRs
    whose report a newer result holds (no withdrawal goes there). ReviewRefused when it is
    rejected already."""
    if job.decision == REJECTED:
        raise ReviewRefused(f"job {job.job_id} is rejected already")
    now = utcnow()
    session.execute(update(Job).where(Job.id == job.job_id).values(qa_decision=REJECTED))
    stopped = session.execute(
        update(Delivery)
        .where(Delivery.job_id == job.job_id, Delivery.state.in_(_NOT_SENT))
        .values(
            state=DeliveryState.REJECTED,
            last_error=f"rejected: {kind.meaning}",
            next_attempt_at=None,
            updated_at=now,
        )
    )
    count = int(stopped.rowcount)  # type: ignore[attr-defined]
    add_job_event(
        session,
        job.job_id,
        REJECTED,
        actor=actor,
        reason_text=_as_given(reason),
        rejection=str(kind),
        code=kind.code,
        meaning=kind.meaning,
        model=job.model,
        model_version=model_version or job.model_version,
        deliveries=count,
        fhir_kept=list(fhir_kept),
    )
    return count


def accept_job(session: Session, job: ReviewedJob, actor: Actor) -> None:
    """Record that a person judged ``job``'s result right. A rejected result stays rejected (a
    re-run makes a new one); ReviewRefused says so."""
    if job.decision == REJECTED:
        raise ReviewRefused(f"job {job.job_id} is rejected; re-run it for a new result")
    add_job_event(
        session,
        job.job_id,
        ACCEPTED,
        actor=actor,
        model=job.model,
        model_version=job.model_version,
    )


def job_results(session: Session, job_id: int) -> list[Result]:
    """The job's own result objects (not the notes that withdraw them), oldest first."""
    return list(
        session.scalars(
            select(Result)
            .where(Result.job_id == job_id, Result.kind != str(OutputKind.REJECTION))
            .order_by(Result.id)
        )
    )


def sent_results(session: Session, job_id: int) -> list[SentResult]:
    """The job's results that were delivered, or are being sent, with where to."""
    rows = session.execute(
        select(Delivery.destination, Result)
        .join(Result, Result.id == Delivery.result_id)
        .where(
            Delivery.job_id == job_id,
            Delivery.state.in_(_SENT),
            Result.kind != str(OutputKind.REJECTION),
        )
        .order_by(Delivery.id)
    ).all()
    return [
        SentResult(
            result_id=r.id,
            kind=r.kind,
            destination=destination,
            sop_class_uid=r.sop_class_uid,
            sop_instance_uid=r.sop_instance_uid,
            encodings=dict(r.encodings),
            patient_search=r.patient_search,
        )
        for destination, r in rows
    ]


def queue_withdrawals(
    session: Session,
    job_id: int,
    items: Sequence[tuple[StoredEncoding, Sequence[str]]],
    relpaths: Sequence[str],
) -> int:
    """Rows for the stored withdrawal objects (``relpaths`` under the results folder) and one
    pending delivery of each to each of its destinations; how many deliveries."""
    results = add_result_rows(session, job_id, [item for item, _ in items], list(relpaths))
    created = 0
    for (result_id, kind), (_, names) in zip(results, items, strict=True):
        created += create_deliveries(session, job_id, [(result_id, kind)], {kind: list(names)})
    return created


def note_not_withdrawn(session: Session, job_id: int, destinations: Sequence[str]) -> None:
    """A ``not_withdrawn`` job event: these destinations got the rejected result, but no
    withdrawal could be built for them (a stored object cannot be read); a person must act."""
    add_job_event(session, job_id, "not_withdrawn", destinations=list(destinations))


def review_counts(session: Session) -> list[ReviewCount]:
    """Per model and version: the jobs whose latest review accepted, and rejected, them."""
    rows = session.execute(
        select(JobEvent.job_id, JobEvent.kind, JobEvent.detail, Job.model)
        .join(Job, Job.id == JobEvent.job_id)
        .where(JobEvent.kind.in_(REVIEWED))
        .order_by(JobEvent.id)
    ).all()
    latest: dict[int, tuple[str, str, str | None]] = {}
    for job_id, kind, detail, model in rows:
        version = (detail or {}).get("model_version")
        latest[job_id] = (kind, model, str(version) if version is not None else None)
    counts: dict[tuple[str, str | None], list[int]] = {}
    for kind, model, version in latest.values():
        pair = counts.setdefault((model, version), [0, 0])
        pair[0 if kind == ACCEPTED else 1] += 1
    return [
        ReviewCount(model, version, accepted, rejected)
        for (model, version), (accepted, rejected) in sorted(
            counts.items(), key=lambda item: (item[0][0], item[0][1] or "")
        )
    ]
