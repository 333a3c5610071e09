"""The quality gate's state in the catalog: each job's verdict, and the held results an operator
releases or rejects.

A job whose result fails the gate under ``qa: hold`` has its deliveries created ``held`` with
``held_for = "quality"`` in the same transaction that stores the results, so the outbox never
sees them pending. ``release`` makes them due now (the outbox sends them); ``reject`` ends
them (``rejected``, never sent: :mod:`.reviews`, the one reject path). Both act on the job id,
since the gate judges one job's whole result, and both append a job event naming the actor.

A held result is never released once a newer job of the same study, model and series has gone out
(delivered, on its way, or released): the PACS would receive the stale result after the current
one. Such a release is refused (:class:`StaleRelease`); rejecting it stays allowed.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from sqlalchemy import select, update
from sqlalchemy.orm import Session

from pacs_node.actor import Actor
from pacs_node.catalog import reviews
from pacs_node.catalog.deliveries import HELD_FOR_QUALITY
from pacs_node.catalog.jobs import add_job_event
from pacs_node.catalog.models import Delivery, DeliveryState, Job, JobState, Result, utcnow
from pacs_node.errors import RequestError
from pacs_node.outputs import OutputKind
from pacs_node.redact import scrub_reason
from pacs_node.review import RejectionKind

REJECTED_TEXT = "rejected at the quality gate"
RELEASED = "released"
REJECTED = "rejected"
# a newer job's result with a delivery in one of these states has reached, or is reaching, the PACS
_GONE_OUT = (DeliveryState.PENDING, DeliveryState.SENDING, DeliveryState.DELIVERED)


class StaleRelease(RequestError):
    """Releasing this held result would send it after a newer result of the same study and
    model; the message names the newer job."""


def reasons_text(failures: Sequence[dict[str, Any]]) -> str:
    """The failed checks as one line: what a delivery's reason and a table show."""
    return "quality: " + "; ".join(f"{f['check']} {f['label']}: {f['message']}" for f in failures)


def record_verdict(
    session: Session, job_id: int, mode: str, verdict: str | None, failures: list[dict[str, Any]]
) -> None:
    """The gate's verdict on a job (``verdict`` None: the gate is off), kept on the job row
    and as a ``quality`` job event."""
    session.execute(
        update(Job)
        .where(Job.id == job_id)
        .values(
            qa_mode=mode,
            qa_verdict=verdict,
            qa_reasons=failures or None,
        )  # a person's decision, if one was recorded, stays: a re-run never undoes it
    )
    if verdict is not None:
        add_job_event(
            session,
            job_id,
            "quality",
            mode=mode,
            verdict=verdict,
            failed=[f"{f['check']}:{f['label']}" for f in failures],
        )


def hold_for_quality(
    session: Session,
    job_id: int,
    failures: Sequence[dict[str, Any]],
    result_ids: Sequence[int] | None = None,
) -> int:
    """The job's pending deliveries (only those of ``result_ids`` when given: the ones a store
    just created) -> held for quality; how many. Nothing is held once a person released the
    result: their decision stands for every part of it."""
    decision = session.scalar(select(Job.qa_decision).where(Job.id == job_id))
    if decision == RELEASED:
        return 0
    reason = scrub_reason(reasons_text(failures))
    which = [Delivery.job_id == job_id, Delivery.state == DeliveryState.PENDING]
    if result_ids is not None:
        which.append(Delivery.result_id.in_(list(result_ids)))
    result = session.execute(
        update(Delivery)
        .where(*which)
        .values(
            state=DeliveryState.HELD,
            held_for=HELD_FOR_QUALITY,
            last_error=reason,
            next_attempt_at=None,
            updated_at=utcnow(),
        )
    )
    count = int(result.rowcount)  # type: ignore[attr-defined]
    if count:
        add_job_event(session, job_id, "quality_held", deliveries=count)
    return count


def _held(job_id: int) -> Any:
    return (
        Delivery.job_id == job_id,
        Delivery.state == DeliveryState.HELD,
        Delivery.held_for == HELD_FOR_QUALITY,
    )


def newer_sent_job(session: Session, job_id: int) -> int | None:
    """The newest later job of the same study, model and series whose result has gone out (a
    delivery pending, sending or delivered, or released at the gate); None if there is none.

    The later jobs of that study and model are locked first (PostgreSQL), so a release decided
    at the same time is waited for and then seen."""
    job = session.get(Job, job_id)
    if job is None:
        return None
    gone_out = (
        select(Delivery.id).where(Delivery.job_id == Job.id, Delivery.state.in_(_GONE_OUT)).exists()
    )
    later = (Job.study_id == job.study_id, Job.model == job.model, Job.id > job_id)
    session.execute(select(Job.id).where(*later).with_for_update()).all()
    rows = session.execute(  # a statement of its own: it sees what the lock waited for
        select(Job.id, Job.series_uids, gone_out | (Job.qa_decision == RELEASED))
        .where(*later)
        .order_by(Job.id.desc())
    ).all()
    series = set(job.series_uids)  # compared here: PostgreSQL's json type has no equality
    return next((int(i) for i, uids, out in rows if out and set(uids) == series), None)


def newer_reports(session: Session, job_id: int) -> set[str]:
    """The EHRs whose report a later job of the same study, model and series has reached: its
    FHIR Bundle delivered there, or being sent. (A pending or released one has not: the report
    there still holds what this job sent.) Later jobs are locked as :func:`newer_sent_job`
    does."""
    job = session.get(Job, job_id)
    if job is None:
        return set()
    later = (Job.study_id == job.study_id, Job.model == job.model, Job.id > job_id)
    session.execute(select(Job.id).where(*later).with_for_update()).all()
    rows = session.execute(
        select(Job.series_uids, Delivery.destination)
        .join(Delivery, Delivery.job_id == Job.id)
        .join(Result, Result.id == Delivery.result_id)
        .where(
            *later,
            Result.kind == str(OutputKind.FHIR),
            Delivery.state.in_((DeliveryState.SENDING, DeliveryState.DELIVERED)),
        )
    ).all()
    series = set(job.series_uids)
    return {str(destination) for uids, destination in rows if set(uids) == series}


def release_result(session: Session, job_id: int, actor: Actor) -> int:
    """A person judged the held result fit to send: its deliveries go out now; how many.

    Raises :class:`StaleRelease`, changing nothing, when a newer result of the same study, model
    and series has gone out.
    """
    # the job's own row first: SQLite's write lock (PostgreSQL: this row's), so two releases
    # decided at once are checked one after the other
    session.execute(update(Job).where(Job.id == job_id).values(qa_decision=Job.qa_decision))
    _require_done(session, job_id, "released")
    if session.scalar(select(Delivery.id).where(*_held(job_id)).limit(1)) is not None:
        newer = newer_sent_job(session, job_id)
        if newer is not None:
            raise StaleRelease(
                f"job {newer}, a newer result of the same study, model and series, has "
                f"already been sent or released; releasing job {job_id} would send a stale "
                "result after it (reject it instead)"
            )
    now = utcnow()
    result = session.execute(
        update(Delivery)
        .where(*_held(job_id))
        .values(
            state=DeliveryState.PENDING,
            held_for=None,
            last_error=None,
            attempts=0,
            next_attempt_at=now,
            updated_at=now,
        )
    )
    count = int(result.rowcount)  # type: ignore[attr-defined]
    if count:
        _decide(session, job_id, RELEASED)
        add_job_event(session, job_id, "quality_released", actor=actor, deliveries=count)
    return count


def reject_result(session: Session, job_id: int, actor: Actor, reason: str = "") -> int:
    """A person rejected the held result: its deliveries are never sent; how many (0: none is
    held). The one reject path: :func:`pacs_node.catalog.reviews.reject_job`, for quality
    reasons."""
    if session.scalar(select(Delivery.id).where(*_held(job_id)).limit(1)) is None:
        return 0
    _require_done(session, job_id, "rejected")
    job = reviews.reviewed_job(session, job_id)
    return reviews.reject_job(session, job, actor, reason or REJECTED_TEXT, RejectionKind.QUALITY)


class JobNotDone(RequestError):
    """The job is still running (or failed, or was cancelled): its result is not complete, so
    a person cannot judge it yet; the message names the job's state."""


def _require_done(session: Session, job_id: int, verb: str) -> None:
    """Refuse a decision on a job that has not finished: under ``qa: hold`` its SEG and SR
    are held while the rest is still being built, and the rest would be held after it."""
    state = session.scalar(select(Job.state).where(Job.id == job_id))
    if state is not None and state != JobState.DONE:
        raise JobNotDone(
            f"job {job_id} is {state}: its result can be {verb} only once the job is done"
        )


def _decide(session: Session, job_id: int, decision: str) -> None:
    session.execute(
        update(Job).where(Job.id == job_id, Job.state == JobState.DONE).values(qa_decision=decision)
    )


def held_jobs(session: Session) -> list[int]:
    """Jobs with deliveries held for quality, oldest first."""
    return list(
        session.scalars(
            select(Delivery.job_id)
            .where(Delivery.state == DeliveryState.HELD, Delivery.held_for == HELD_FOR_QUALITY)
            .distinct()
            .order_by(Delivery.job_id)
        )
    )
