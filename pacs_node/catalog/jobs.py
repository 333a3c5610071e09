"""The job state machine: queued -> running -> done | failed; queued | running -> cancelled;
failed | cancelled -> queued (by hand). Every transition is a compare-and-set on ``state`` and
appends a :class:`JobEvent`, so two workers never run one job and the timeline is complete.

Claiming: on PostgreSQL ``SELECT ... FOR UPDATE SKIP LOCKED`` hands each worker a different
row; SQLite has one writer at a time, so an ``UPDATE ... WHERE state = 'queued'`` whose row
count says who won is enough there (the loser tries the next row).

Leases (Celery workers, :mod:`pacs_node.jobs.celery_queue`): a broker task names one job, and
:func:`claim_job_id` takes exactly that job with the same compare-and-set, setting
``lease_expires_at``; the worker renews it (:func:`renew_lease`) while the job runs. A second
delivery of the task finds the job no longer queued and runs nothing. :func:`requeue_expired`
puts back jobs whose lease ran out (their worker was killed), and :func:`take_unpublished`
picks the queued jobs to hand to the broker (new ones, re-queued ones, and ones the broker
may have lost), marking each so that several nodes hand it over once per interval.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any

from sqlalchemy import and_, case, or_, select, update
from sqlalchemy.orm import Session
from sqlalchemy.sql.elements import ColumnElement

from pacs_node.actor import ROUTING, Actor
from pacs_node.catalog.clock import db_now
from pacs_node.catalog.models import Delivery, DeliveryState, Job, JobEvent, JobState, Study, utcnow
from pacs_node.redact import scrub_detail, scrub_reason

CLAIM_CANDIDATES = 8  # rows a SQLite claimer tries before saying the queue is empty
REPUBLISH_BACKOFF_MAX = 16  # a waiting job is handed over again at most every 16 intervals


def add_job_event(
    session: Session, job_id: int, kind: str, *, actor: Actor | None = None, **detail: Any
) -> None:
    """Append one event to the job's timeline; ``actor``: who asked for it, when someone did
    (kept in the detail as ``"kind:name"``)."""
    if actor is not None:
        detail["actor"] = str(actor)
    detail = scrub_detail(detail)  # error text may quote patient data
    session.add(
        JobEvent(
            job_id=job_id,
            at=utcnow(),
            kind=kind,
            detail=dict(sorted(detail.items())) or None,
        )
    )


def queue_job(
    session: Session,
    study_id: int,
    model: str,
    series_uids: Sequence[str],
    destinations: Mapping[str, Sequence[str]],
    *,
    rule: str | None = None,
    actor: Actor = ROUTING,
) -> int:
    """A new queued job, and its ``queued`` event naming the actor, the model and the rule
    (None: by hand); ``destinations`` maps output kinds to destination names. Routing and every
    door queue through here, so a job's timeline does not depend on who queued it."""
    job = Job(
        study_id=study_id,
        rule=rule,
        model=model,
        series_uids=list(series_uids),
        destinations={k: list(v) for k, v in sorted(destinations.items())},
        state=JobState.QUEUED,
        attempts=0,
        progress=0.0,
        timings={},
        created_at=utcnow(),
    )
    session.add(job)
    session.flush()
    add_job_event(session, job.id, "queued", actor=actor, model=model, rule=rule)
    return job.id


def _claimed(worker_id: str, now: datetime, lease_expires_at: datetime | None) -> dict[str, Any]:
    """The columns of a job just claimed by ``worker_id``, whichever way it was claimed."""
    return {
        "state": JobState.RUNNING,
        "claimed_by": worker_id,
        "attempts": Job.attempts + 1,
        "started_at": now,
        "finished_at": None,
        "stage": "claimed",
        "progress": 0.0,
        "error": None,
        "lease_expires_at": lease_expires_at,
    }


def claim_job(session: Session, worker_id: str) -> int | None:
    """Take the oldest queued job for ``worker_id``; None when there is none to take."""
    postgres = session.get_bind().dialect.name == "postgresql"
    query = select(Job.id).where(Job.state == JobState.QUEUED).order_by(Job.id)
    if postgres:
        candidates = list(session.scalars(query.limit(1).with_for_update(skip_locked=True)))
    else:
        candidates = list(session.scalars(query.limit(CLAIM_CANDIDATES)))
    now = utcnow()
    for job_id in candidates:
        won = session.execute(
            update(Job)
            .where(Job.id == job_id, Job.state == JobState.QUEUED)
            .values(**_claimed(worker_id, now, lease_expires_at=None))
        )
        if won.rowcount == 1:  # type: ignore[attr-defined]
            add_job_event(session, job_id, "running", worker=worker_id)
            return job_id
    return None


def claim_job_id(session: Session, job_id: int, worker_id: str, lease_s: float) -> int | None:
    """Take this one job for ``worker_id`` with a lease of ``lease_s``: the claim's attempt
    number, read from the claiming UPDATE itself (a stale run never sees another's); None when
    it is not queued (already claimed, done, cancelled or gone): a duplicate delivery runs
    nothing. Lease times are the database's clock, shared by every worker and node."""
    now = db_now(session)
    attempt = session.scalar(
        update(Job)
        .where(Job.id == job_id, Job.state == JobState.QUEUED)
        .values(**_claimed(worker_id, now, now + timedelta(seconds=lease_s)))
        .returning(Job.attempts)
    )
    if attempt is None:
        return None
    add_job_event(session, job_id, "running", worker=worker_id)
    return int(attempt)


def renew_lease(session: Session, job_id: int, worker_id: str, lease_s: float) -> bool:
    """Extend a running job's lease; False when the job is no longer this worker's."""
    result = session.execute(
        update(Job)
        .where(Job.id == job_id, Job.state == JobState.RUNNING, Job.claimed_by == worker_id)
        .values(lease_expires_at=db_now(session) + timedelta(seconds=lease_s))
    )
    return bool(result.rowcount == 1)  # type: ignore[attr-defined]


def _skip_locked(session: Session, query: Any) -> Any:
    """On PostgreSQL a row another transaction holds is left for the next sweep instead of
    blocking this one."""
    if session.get_bind().dialect.name == "postgresql":
        return query.with_for_update(skip_locked=True)
    return query


def requeue_expired(session: Session, max_attempts: int) -> tuple[int, int]:
    """Running jobs whose lease ran out go back to the queue (or fail after ``max_attempts``
    claims): their worker stopped renewing, it was killed or cut off. Returns (queued, failed)."""
    now = db_now(session)
    expired = Job.lease_expires_at < now
    query = select(Job.id, Job.attempts, Job.stage, Job.claimed_by).where(
        Job.state == JobState.RUNNING, Job.lease_expires_at.is_not(None), expired
    )
    rows = session.execute(_skip_locked(session, query)).all()
    # the UPDATE checks the expiry again: a lease renewed since the SELECT stays
    return _requeue(session, rows, max_attempts, "lease expired", stopped=False, only=(expired,))


def take_unpublished(
    session: Session, republish_after_s: float, limit: int = 100
) -> list[tuple[int, str]]:
    """Queued jobs to hand to the broker, as (job id, model): never handed over, or handed over
    and still not claimed ``republish_after_s`` later (the broker lost the task, or a worker
    took it and died before claiming), then twice, four times ... (at most
    ``REPUBLISH_BACKOFF_MAX`` times) as long after each further hand-over, so a long backlog
    does not fill the broker with copies. Each is marked as handed over now, with a
    compare-and-set, so that of several nodes one hands it over."""
    now = db_now(session)
    due: list[ColumnElement[bool]] = [Job.published_at.is_(None)]
    count, factor = 1, 1  # handed over once: wait 1 interval, twice: 2, three times: 4 ...
    while factor < REPUBLISH_BACKOFF_MAX:
        handed = Job.publish_count <= 1 if count == 1 else Job.publish_count == count
        due.append(
            and_(handed, Job.published_at < now - timedelta(seconds=republish_after_s * factor))
        )
        count, factor = count + 1, factor * 2
    longest = timedelta(seconds=republish_after_s * REPUBLISH_BACKOFF_MAX)
    due.append(and_(Job.publish_count >= count, Job.published_at < now - longest))
    query = (
        select(Job.id, Job.model, Job.published_at, Job.publish_count)
        .where(Job.state == JobState.QUEUED, or_(*due))
        .order_by(Job.id)
        .limit(limit)
    )
    taken: list[tuple[int, str]] = []
    for job_id, model, before, count in session.execute(_skip_locked(session, query)).all():
        same = Job.published_at.is_(None) if before is None else Job.published_at == before
        won = session.execute(
            update(Job)
            .where(Job.id == job_id, Job.state == JobState.QUEUED, same)
            .values(published_at=now, publish_count=count + 1)
        )
        if won.rowcount == 1:  # type: ignore[attr-defined]
            taken.append((job_id, model))
    return taken


def forget_published(session: Session) -> int:
    """The broker lost every task it held (it restarted without persistence): every queued
    job is due to be handed over again at once. Returns how many."""
    result = session.execute(
        update(Job)
        .where(Job.state == JobState.QUEUED, Job.published_at.is_not(None))
        .values(published_at=None, publish_count=0)
    )
    return int(result.rowcount)  # type: ignore[attr-defined]


def unpublish(session: Session, job_ids: Sequence[int]) -> None:
    """The broker refused these: hand them over again at the next chance (the refused
    hand-over does not count)."""
    if job_ids:
        session.execute(
            update(Job)
            .where(Job.id.in_(list(job_ids)), Job.state == JobState.QUEUED)
            .values(
                published_at=None,
                publish_count=case((Job.publish_count > 0, Job.publish_count - 1), else_=0),
            )
        )


def set_progress(
    session: Session, job_id: int, worker_id: str, stage: str, progress: float
) -> bool:
    """Record the stage a running job reached; False when it is no longer ours (cancelled)."""
    result = session.execute(
        update(Job)
        .where(Job.id == job_id, Job.state == JobState.RUNNING, Job.claimed_by == worker_id)
        .values(stage=stage, progress=progress)
    )
    return bool(result.rowcount == 1)  # type: ignore[attr-defined]


def finish_job(
    session: Session, job_id: int, worker_id: str, timings: dict[str, float], **detail: Any
) -> bool:
    """running -> done, only if still ours; False when it was cancelled meanwhile."""
    result = session.execute(
        update(Job)
        .where(Job.id == job_id, Job.state == JobState.RUNNING, Job.claimed_by == worker_id)
        .values(
            state=JobState.DONE,
            stage="done",
            progress=1.0,
            timings=dict(sorted(timings.items())),
            finished_at=utcnow(),
        )
    )
    if result.rowcount != 1:  # type: ignore[attr-defined]
        return False
    add_job_event(session, job_id, "done", **detail)
    return True


def fail_job(
    session: Session, job_id: int, worker_id: str, error: str, timings: dict[str, float]
) -> bool:
    """running -> failed with the reason (scrubbed: see :mod:`pacs_node.redact`); the stage
    it failed in stays recorded."""
    model = session.scalar(select(Job.model).where(Job.id == job_id))
    error = scrub_reason(error, known=(model or "",))
    result = session.execute(
        update(Job)
        .where(Job.id == job_id, Job.state == JobState.RUNNING, Job.claimed_by == worker_id)
        .values(
            state=JobState.FAILED,
            error=error,
            timings=dict(sorted(timings.items())),
            finished_at=utcnow(),
        )
    )
    if result.rowcount != 1:  # type: ignore[attr-defined]
        return False
    add_job_event(session, job_id, "failed", error=error, model=model or "")
    return True


def cancel_job(session: Session, job_id: int, actor: Actor | None = None) -> bool:
    """queued | running -> cancelled; a running worker notices at its next stage.

    The job's deliveries not yet on their way (pending, or held) end ``cancelled`` in the same
    transaction: the SEG and SR a job stores before its extras are never sent after it was
    cancelled. One already being sent or delivered stays as it is: what reached a PACS is
    taken back only by rejecting the result (:mod:`.reviews`, its withdrawal note)."""
    now = utcnow()
    result = session.execute(
        update(Job)
        .where(Job.id == job_id, Job.state.in_([JobState.QUEUED, JobState.RUNNING]))
        .values(state=JobState.CANCELLED, finished_at=now)
    )
    if result.rowcount != 1:  # type: ignore[attr-defined]
        return False
    stopped = session.execute(
        update(Delivery)
        .where(
            Delivery.job_id == job_id,
            Delivery.state.in_([DeliveryState.PENDING, DeliveryState.HELD]),
        )
        .values(state=DeliveryState.CANCELLED, next_attempt_at=None, updated_at=now)
    )
    add_job_event(
        session,
        job_id,
        "cancelled",
        actor=actor,
        deliveries=int(stopped.rowcount),  # type: ignore[attr-defined]
    )
    return True


def retry_job(session: Session, job_id: int, actor: Actor | None = None) -> bool:
    """failed | cancelled -> queued, attempts counted afresh (a person decided to try again)."""
    result = session.execute(
        update(Job)
        .where(Job.id == job_id, Job.state.in_([JobState.FAILED, JobState.CANCELLED]))
        .values(
            state=JobState.QUEUED,
            attempts=0,
            error=None,
            stage=None,
            progress=0.0,
            claimed_by=None,
            finished_at=None,
            lease_expires_at=None,
            published_at=None,
            publish_count=0,
        )
    )
    if result.rowcount != 1:  # type: ignore[attr-defined]
        return False
    # the deliveries its cancellation stopped go on as they were: held ones held again (held_for
    # was kept), the rest due now; a re-run stores only what is missing, so it never makes them
    now = utcnow()
    cancelled = (Delivery.job_id == job_id, Delivery.state == DeliveryState.CANCELLED)
    session.execute(
        update(Delivery)
        .where(*cancelled, Delivery.held_for.is_not(None))
        .values(state=DeliveryState.HELD, updated_at=now)
    )
    session.execute(
        update(Delivery)
        .where(*cancelled)
        .values(state=DeliveryState.PENDING, next_attempt_at=now, updated_at=now)
    )
    add_job_event(session, job_id, "queued", actor=actor, by="retry")
    return True


def time_out_job(
    session: Session, job_id: int, worker_id: str, timeout_s: float, max_attempts: int
) -> bool:
    """A run went past ``job_timeout_s``: its claim ends, and the job goes back to the queue
    or fails after ``max_attempts`` claims; the run notices at its next stage. False when the
    job was no longer this worker's."""
    rows = session.execute(
        select(Job.id, Job.attempts, Job.stage, Job.claimed_by).where(
            Job.id == job_id, Job.state == JobState.RUNNING, Job.claimed_by == worker_id
        )
    ).all()
    by = f"timed out after {timeout_s:g} s"
    return _requeue(session, rows, max_attempts, by, stopped=False, reason=by) != (0, 0)


def requeue_orphans(
    session: Session,
    owner_prefix: str,
    max_attempts: int,
    by: str = "restart",
    *,
    stopped: bool = False,
) -> tuple[int, int]:
    """Jobs left ``running`` by a dead process of ours go back to the queue, unless they
    already took ``max_attempts`` workers down with them: those fail. Returns (queued, failed).
    Only claims without a lease (local workers'): a Celery worker on the same host is not
    ours, its lease says when its job is lost.

    ``stopped``: the node stopped the worker itself (a graceful stop's deadline); that is no
    fault of the job, so its claim's attempt is given back and it never fails for it."""
    rows = session.execute(
        select(Job.id, Job.attempts, Job.stage, Job.claimed_by).where(
            Job.state == JobState.RUNNING,
            Job.claimed_by.startswith(owner_prefix),
            Job.lease_expires_at.is_(None),  # a leased claim is a Celery worker's: see above
        )
    ).all()
    return _requeue(session, rows, max_attempts, by, stopped=stopped)


def _requeue(
    session: Session,
    rows: Sequence[Any],
    max_attempts: int,
    by: str,
    *,
    stopped: bool,
    only: tuple[Any, ...] = (),
    reason: str = "the worker died",
) -> tuple[int, int]:
    """(id, attempts, stage, claimed_by) rows of running jobs whose worker is gone: back to the
    queue, or failed; each only if still held by that same claim and ``only`` still holds."""
    queued = failed = 0
    for job_id, attempts, stage, holder in rows:
        still_held = (
            Job.id == job_id,
            Job.state == JobState.RUNNING,
            Job.claimed_by == holder,
            *only,
        )
        if not stopped and attempts >= max_attempts:
            error = f"{reason} {attempts} times (last in stage {stage}); giving up"
            won = session.execute(
                update(Job)
                .where(*still_held)
                .values(state=JobState.FAILED, error=error, finished_at=utcnow())
            )
            if won.rowcount == 1:  # type: ignore[attr-defined]
                add_job_event(session, job_id, "failed", error=error)
                failed += 1
        else:
            won = session.execute(
                update(Job)
                .where(*still_held)
                .values(
                    state=JobState.QUEUED,
                    claimed_by=None,
                    stage=None,
                    progress=0.0,
                    attempts=max(0, attempts - 1) if stopped else attempts,
                    lease_expires_at=None,
                    published_at=None,
                    publish_count=0,
                )
            )
            if won.rowcount == 1:  # type: ignore[attr-defined]
                add_job_event(session, job_id, "queued", by=by, interrupted_stage=stage)
                queued += 1
    return queued, failed


@dataclass(frozen=True)
class JobSummary:
    id: int
    study_uid: str
    rule: str | None
    model: str
    series_uids: list[str]
    destinations: dict[str, list[str]]
    state: str
    attempts: int
    stage: str | None
    progress: float
    timings: dict[str, float]
    error: str | None
    created_at: datetime
    started_at: datetime | None
    finished_at: datetime | None
    qa_mode: str | None = None
    qa_verdict: str | None = None
    qa_reasons: list[dict[str, Any]] | None = None
    qa_decision: str | None = None

    def as_json(self) -> dict[str, Any]:
        """The public shape of ``jobs --json``; fields are only ever added."""
        return {
            "id": self.id,
            "study_uid": self.study_uid,
            "rule": self.rule,
            "model": self.model,
            "series_uids": self.series_uids,
            "destinations": self.destinations,
            "state": self.state,
            "attempts": self.attempts,
            "stage": self.stage,
            "progress": round(self.progress, 3),
            "timings": self.timings,
            "error": self.error,
            "created_at": self.created_at.isoformat(),
            "started_at": self.started_at.isoformat() if self.started_at else None,
            "finished_at": self.finished_at.isoformat() if self.finished_at else None,
            "quality": {
                "mode": self.qa_mode,
                "verdict": self.qa_verdict,
                "failures": self.qa_reasons or [],
                "decision": self.qa_decision,
            },
        }

    @property
    def quality_text(self) -> str:
        """The gate's state in a few words: a table cell."""
        if self.qa_verdict is None:
            return "off" if self.qa_mode == "off" else ""
        text = self.qa_verdict
        if self.qa_verdict == "fail":
            text = f"fail ({self.qa_mode})" + (f" {self.qa_decision}" if self.qa_decision else "")
            failed = ", ".join(f"{r['check']} {r['label']}".strip() for r in self.qa_reasons or [])
            text += f": {failed}"
        return text


def list_jobs(session: Session, job_ids: Sequence[int] | None = None) -> list[JobSummary]:
    query = select(Job, Study.study_uid).join(Study, Study.id == Job.study_id).order_by(Job.id)
    if job_ids is not None:
        query = query.where(Job.id.in_(list(job_ids)))
    return [
        JobSummary(
            id=job.id,
            study_uid=study_uid,
            rule=job.rule,
            model=job.model,
            series_uids=job.series_uids,
            destinations=job.destinations,
            state=job.state.value,
            attempts=job.attempts,
            stage=job.stage,
            progress=job.progress,
            timings=job.timings,
            error=job.error,
            created_at=job.created_at,
            started_at=job.started_at,
            finished_at=job.finished_at,
            qa_mode=job.qa_mode,
            qa_verdict=job.qa_verdict,
            qa_reasons=job.qa_reasons or None,
            qa_decision=job.qa_decision,
        )
        for job, study_uid in session.execute(query).all()
    ]
