"""The outbox rows and their state machine.

::

    pending --claim--> sending --ok--------------> delivered
       ^                  |----transient---------> pending (next_attempt_at later)
       |                  |----too many / permanent> dead
       |                  '----needs a person-----> held (held_for: destination | patient)
       '-- retry by hand (held | dead), a hold's cause gone, or a claim taken back (sending) --'

A claim has an owner (``claimed_by``: one outbox process, ``<node id>/<pid>/<token>``) and a
lease (``lease_expires_at``) its owner renews while it sends. A settle only applies while the
claim is still the owner's (:func:`hold_claim`), so a row is never settled twice:

- an expired lease (its process died, or could not settle) is taken back by any node while it
  runs (:func:`reclaim_expired`);
- at start a process takes back at once the claims of its own node's earlier processes (same
  node id, process gone: :func:`reset_own_claims`), never another node's on a shared catalog.

A delivery of a result a person rejected is never claimed again, whatever made it pending: the
claim turns it ``rejected`` instead (only the withdrawal, a ``rejection`` result, goes out), and
a retry by hand refuses it.

Rows are never deleted: a delivery that cannot go anywhere stays listed with its reason.
"""

from __future__ import annotations

import ipaddress
import logging
from collections.abc import Callable, Collection, Iterable, Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from sqlalchemy import and_, func, not_, or_, select, update
from sqlalchemy.orm import Session

from pacs_node.actor import Actor
from pacs_node.catalog.jobs import add_job_event
from pacs_node.catalog.models import (
    Commitment,
    CommitmentReportRow,
    Delivery,
    DeliveryState,
    Job,
    Result,
    Study,
    utcnow,
)
from pacs_node.catalog.studies import increment
from pacs_node.outputs import OutputKind
from pacs_node.redact import scrub_reason
from pacs_node.refs import CommitmentReport

log = logging.getLogger(__name__)

REFUSED_REPORTS_COUNTER = "commitment_reports_refused"
HELD_FOR_DESTINATION = "destination"
HELD_FOR_PATIENT = "patient"
HELD_FOR_QUALITY = "quality"  # see pacs_node.catalog.quality
JOB_REJECTED = "rejected"  # jobs.qa_decision of a result a person rejected (see .reviews)


@dataclass(frozen=True)
class Outgoing:
    """One claimed delivery as a handler needs it: what to send, from which stored files."""

    delivery_id: int
    job_id: int
    destination: str
    kind: str
    sop_class_uid: str | None
    sop_instance_uid: str | None
    encodings: dict[str, str]  # transfer syntax UID or media type -> path under results dir
    patient_search: str | None
    attempts: int
    claimed_by: str | None = None  # the claim's owner; None: not claimed through claim_due


def create_deliveries(
    session: Session,
    job_id: int,
    results: Sequence[tuple[int, str]],
    destinations: dict[str, list[str]],
) -> int:
    """One pending row per (result, destination) named for the result's kind; idempotent."""
    now = utcnow()
    existing: set[tuple[int, str]] = {
        (result_id, name)
        for result_id, name in session.execute(
            select(Delivery.result_id, Delivery.destination).where(Delivery.job_id == job_id)
        ).all()
    }
    only: dict[int, str | None] = {
        result_id: destination
        for result_id, destination in session.execute(
            select(Result.id, Result.destination).where(Result.id.in_([r for r, _ in results]))
        ).all()
    }
    own = {(kind, only[r]) for r, kind in results if only.get(r)}
    created = 0
    for result_id, kind in results:
        for name in destinations.get(kind, []):
            built_for = only.get(result_id)
            if built_for not in (None, name):  # built for another destination
                continue
            if built_for is None and (kind, name) in own:  # that destination has its own
                continue
            if (result_id, name) in existing:
                continue
            existing.add((result_id, name))
            session.add(
                Delivery(
                    result_id=result_id,
                    job_id=job_id,
                    destination=name,
                    state=DeliveryState.PENDING,
                    attempts=0,
                    next_attempt_at=now,
                    created_at=now,
                    updated_at=now,
                )
            )
            created += 1
    return created


def due_destinations(session: Session, now: datetime) -> list[str]:
    """Destinations with at least one pending delivery whose time has come."""
    return list(
        session.scalars(
            select(Delivery.destination)
            .where(Delivery.state == DeliveryState.PENDING, Delivery.next_attempt_at <= now)
            .distinct()
            .order_by(Delivery.destination)
        )
    )


def next_due_at(session: Session) -> datetime | None:
    return session.scalar(
        select(func.min(Delivery.next_attempt_at)).where(Delivery.state == DeliveryState.PENDING)
    )


def _withdrawn() -> Any:
    """A delivery of a result a person rejected (see :mod:`.reviews`), not the withdrawal
    itself: it must never go out, whichever path made it pending again (a claim taken back, a
    hold released, a retry)."""
    return and_(
        Delivery.job_id.in_(select(Job.id).where(Job.qa_decision == JOB_REJECTED)),
        Delivery.result_id.in_(select(Result.id).where(Result.kind != str(OutputKind.REJECTION))),
    )


def claim_due(
    session: Session,
    destination: str,
    limit: int,
    now: datetime,
    owner: str | None = None,
    lease_until: datetime | None = None,
) -> list[Outgoing]:
    """pending -> sending for up to ``limit`` due deliveries of one destination, oldest first,
    claimed by ``owner`` until ``lease_until``. Due deliveries of a rejected result become
    ``rejected`` instead, in the same transaction."""
    due = (
        Delivery.destination == destination,
        Delivery.state == DeliveryState.PENDING,
        Delivery.next_attempt_at <= now,
    )
    session.execute(
        update(Delivery)
        .where(*due, _withdrawn())
        .values(
            state=DeliveryState.REJECTED,
            last_error="rejected: the result was rejected",
            claimed_by=None,
            lease_expires_at=None,
            next_attempt_at=None,
            updated_at=now,
        )
    )
    ids = list(
        session.scalars(
            select(Delivery.id)
            .where(*due, not_(_withdrawn()))
            .order_by(Delivery.next_attempt_at, Delivery.id)
            .limit(limit)
        )
    )
    claimed: list[int] = []
    for delivery_id in ids:
        won = session.execute(
            update(Delivery)
            .where(
                Delivery.id == delivery_id,
                Delivery.state == DeliveryState.PENDING,
                not_(_withdrawn()),
            )
            .values(
                state=DeliveryState.SENDING,
                attempts=Delivery.attempts + 1,
                updated_at=now,
                claimed_by=owner,
                lease_expires_at=lease_until,
            )
        )
        if won.rowcount == 1:  # type: ignore[attr-defined]
            claimed.append(delivery_id)
    if not claimed:
        return []
    rows = session.execute(
        select(Delivery, Result)
        .join(Result, Result.id == Delivery.result_id)
        .where(Delivery.id.in_(claimed))
        .order_by(Delivery.id)
    ).all()
    return [
        Outgoing(
            delivery_id=d.id,
            job_id=d.job_id,
            destination=d.destination,
            kind=r.kind,
            sop_class_uid=r.sop_class_uid,
            sop_instance_uid=r.sop_instance_uid,
            encodings=r.encodings,
            patient_search=r.patient_search,
            attempts=d.attempts,
            claimed_by=owner,
        )
        for d, r in rows
    ]


def hold_claim(session: Session, item: Outgoing) -> bool:
    """Whether ``item``'s claim is still its owner's; if so the row stays locked to this
    transaction (a write on it), so no other node can take it back before the settle commits."""
    result = session.execute(
        update(Delivery)
        .where(
            Delivery.id == item.delivery_id,
            Delivery.state == DeliveryState.SENDING,
            Delivery.attempts == item.attempts,
            Delivery.claimed_by == item.claimed_by
            if item.claimed_by is not None
            else Delivery.claimed_by.is_(None),
        )
        .values(lease_expires_at=None)
    )
    return bool(result.rowcount == 1)  # type: ignore[attr-defined]


def renew_leases(session: Session, owner: str, ids: Collection[int], until: datetime) -> int:
    """The owner still sends these: their claims hold until ``until``."""
    if not ids:
        return 0
    result = session.execute(
        update(Delivery)
        .where(
            Delivery.id.in_(list(ids)),
            Delivery.state == DeliveryState.SENDING,
            Delivery.claimed_by == owner,
        )
        .values(lease_expires_at=until)
    )
    return int(result.rowcount)  # type: ignore[attr-defined]


def _take_back(session: Session, *conditions: Any) -> int:
    now = utcnow()
    result = session.execute(
        update(Delivery)
        .where(Delivery.state == DeliveryState.SENDING, *conditions)
        .values(
            state=DeliveryState.PENDING,
            claimed_by=None,
            lease_expires_at=None,
            next_attempt_at=now,
            updated_at=now,
        )
    )
    return int(result.rowcount)  # type: ignore[attr-defined]


def reclaim_expired(session: Session, now: datetime) -> int:
    """Claims whose lease ran out (or that never had one: rows claimed before leases existed)
    go out again; the receivers de-duplicate by UID. Looks first, so the usual pass with none
    expired takes no write lock."""
    expired = or_(Delivery.lease_expires_at.is_(None), Delivery.lease_expires_at < now)
    found = session.scalar(
        select(Delivery.id).where(Delivery.state == DeliveryState.SENDING, expired).limit(1)
    )
    return 0 if found is None else _take_back(session, expired)


def claim_owners(session: Session, node_id: str) -> list[str]:
    """The owners of this node's current claims (``<node id>/...``)."""
    return list(
        session.scalars(
            select(Delivery.claimed_by)
            .where(
                Delivery.state == DeliveryState.SENDING,
                Delivery.claimed_by.startswith(f"{node_id}/", autoescape=True),
            )
            .distinct()
        )
    )


def reset_claims(session: Session, owners: Collection[str]) -> int:
    """At start: the claims of these owners (earlier processes of this node) go out again."""
    if not owners:
        return 0
    return _take_back(session, Delivery.claimed_by.in_(list(owners)))


def _leave_sending(session: Session, delivery_id: int, **values: Any) -> bool:
    result = session.execute(
        update(Delivery)
        .where(Delivery.id == delivery_id, Delivery.state == DeliveryState.SENDING)
        .values(updated_at=utcnow(), **values)
    )
    return bool(result.rowcount == 1)  # type: ignore[attr-defined]


def mark_delivered(
    session: Session,
    item: Outgoing,
    transfer_syntax_uid: str | None,
    commitment: str | None = None,
    commitment_uid: str | None = None,
) -> None:
    now = utcnow()
    if _leave_sending(
        session,
        item.delivery_id,
        state=DeliveryState.DELIVERED,
        delivered_at=now,
        last_error=None,
        held_for=None,
        transfer_syntax_uid=transfer_syntax_uid,
        commitment=commitment,
        commitment_uid=commitment_uid,
        committed_at=now if commitment == Commitment.COMMITTED else None,
    ):
        if commitment == Commitment.REQUESTED and commitment_uid:
            _settle_reports(session, commitment_uid, now)  # it may have come first
        add_job_event(
            session,
            item.job_id,
            "delivered",
            delivery=item.delivery_id,
            destination=item.destination,
            output=item.kind,
        )


def commitment_refusal(reason: int) -> str:
    """What a delivery's last error says when the PACS will not commit to keep it."""
    return f"storage commitment failed (reason 0x{reason:04X})"


def settle_commitment(
    row: Delivery, state: str, now: datetime, reason: str = "storage commitment failed"
) -> None:
    """A delivered row's Storage Commitment answer: committed, or refused (then it is sent
    again and committed again)."""
    if state == Commitment.FAILED:
        row.state = DeliveryState.PENDING
        row.next_attempt_at = now
        row.last_error = scrub_reason(reason)
    elif state == Commitment.COMMITTED:
        row.committed_at = now
    row.commitment = state
    row.updated_at = now


def record_commitment_report(session: Session, report: CommitmentReport, now: datetime) -> int:
    """Keep a report a destination sent on its own association and settle what it can now;
    how many deliveries it settled. The rest waits for :func:`mark_delivered` to give rows
    its Transaction UID (the report may come while the node still waits on the results
    association)."""
    row = CommitmentReportRow(
        transaction_uid=report.transaction_uid,
        calling_ae=report.calling_ae,
        peer_address=report.peer_address,
        committed=list(report.committed),
        failed=[[uid, reason] for uid, reason in report.failed],
        received_at=now,
    )
    session.add(row)
    session.flush()
    return _settle_reports(session, report.transaction_uid, now)


def note_commitment_peer(
    session: Session, delivery_id: int, ae_title: str, hosts: Collection[str] | None
) -> None:
    """Who may answer this delivery's commitment request on an association of its own: the
    destination's AE title, from one of ``hosts`` (its addresses; None: any host)."""
    session.execute(
        update(Delivery)
        .where(Delivery.id == delivery_id)
        .values(commitment_ae=ae_title, commitment_hosts=" ".join(hosts) if hosts else None)
    )


def _address(text: str) -> str:
    try:
        ip = ipaddress.ip_address(text)
    except ValueError:
        return text
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        return str(ip.ipv4_mapped)
    return str(ip)


def answers(report: CommitmentReportRow, delivery: Delivery) -> bool:
    """Whether ``report`` comes from the destination ``delivery`` asked: its AE title, and one of
    its host's addresses when it names a host. A row delivered before the asked AE was kept
    accepts a report from an AE titled as its destination."""
    if delivery.commitment_ae is None:
        return report.calling_ae == delivery.destination
    if report.calling_ae != delivery.commitment_ae:
        return False
    if not delivery.commitment_hosts:
        return True
    hosts = {_address(h) for h in delivery.commitment_hosts.split()}
    return report.peer_address is not None and _address(report.peer_address) in hosts


def _settle_reports(session: Session, transaction_uid: str, now: datetime) -> int:
    """Apply the stored reports of a transaction to its deliveries still ``requested`` (rows
    are marked delivered one by one, so a report may settle them over several calls). A report
    from another AE or host than the destination asked settles nothing: it is marked refused,
    logged and counted."""
    reports = session.scalars(
        select(CommitmentReportRow).where(
            CommitmentReportRow.transaction_uid == transaction_uid,
            CommitmentReportRow.refused_at.is_(None),
        )
    ).all()
    if not reports:
        return 0
    rows = session.execute(
        select(Delivery, Result.sop_instance_uid)
        .join(Result, Result.id == Delivery.result_id)
        .where(
            Delivery.commitment_uid == transaction_uid,
            Delivery.state == DeliveryState.DELIVERED,
            Delivery.commitment == Commitment.REQUESTED.value,
        )
    ).all()
    if not rows:
        return 0
    trusted = []
    for report in reports:
        if all(answers(report, delivery) for delivery, _ in rows):
            trusted.append(report)
            continue
        report.refused_at = now
        increment(session, REFUSED_REPORTS_COUNTER)
        log.warning(
            "storage commitment report from another AE or host than the destination asked; "
            "it settles nothing",
            extra={
                "calling_ae": report.calling_ae,
                "address": report.peer_address,
                "transaction_uid": transaction_uid,
                "destination": rows[0][0].destination,
            },
        )
    states: dict[str, tuple[str, str]] = {}
    for report in trusted:
        for uid in report.committed:
            states[uid] = (Commitment.COMMITTED.value, "")
        for failed_uid, reason in report.failed:
            states[str(failed_uid)] = (Commitment.FAILED.value, commitment_refusal(int(reason)))
    settled = 0
    for delivery, sop_instance_uid in rows:
        answer = states.get(str(sop_instance_uid))
        if answer is not None:
            settle_commitment(delivery, answer[0], now, answer[1])
            settled += 1
    if settled:
        for report in trusted:
            report.settled_at = report.settled_at or now
    return settled


def _rejected_meanwhile(session: Session, item: Outgoing) -> bool:
    """Whether a person rejected the job's result while ``item`` of it was being sent (see
    :mod:`.reviews`): a failed attempt then ends it, never to be sent again."""
    if item.kind == OutputKind.REJECTION:  # the note that withdraws the result goes on trying
        return False
    decision = session.scalar(select(Job.qa_decision).where(Job.id == item.job_id))
    return decision == JOB_REJECTED


def mark_retry(session: Session, item: Outgoing, error: str, at: datetime) -> None:
    """A transient failure: back to pending, not before ``at`` (rejected, when the job's
    result was rejected meanwhile)."""
    # an EHR's error body or a library's message may name a patient
    error = scrub_reason(error, known=(item.destination,))
    if _rejected_meanwhile(session, item):
        _leave_sending(
            session,
            item.delivery_id,
            state=DeliveryState.REJECTED,
            last_error=error,
            next_attempt_at=None,
        )
        return
    _leave_sending(
        session, item.delivery_id, state=DeliveryState.PENDING, last_error=error, next_attempt_at=at
    )


def mark_dead(session: Session, item: Outgoing, error: str) -> None:
    error = scrub_reason(error, known=(item.destination,))
    if _leave_sending(
        session, item.delivery_id, state=DeliveryState.DEAD, last_error=error, next_attempt_at=None
    ):
        add_job_event(
            session,
            item.job_id,
            "delivery_dead",
            delivery=item.delivery_id,
            destination=item.destination,
            error=error,
        )


def mark_held(session: Session, item: Outgoing, reason: str, held_for: str) -> None:
    reason = scrub_reason(reason, known=(item.destination,))
    if _leave_sending(
        session,
        item.delivery_id,
        state=DeliveryState.HELD,
        last_error=reason,
        held_for=held_for,
        next_attempt_at=None,
    ):
        add_job_event(
            session,
            item.job_id,
            "delivery_held",
            delivery=item.delivery_id,
            destination=item.destination,
            reason=reason,
        )


def release_destination_holds(session: Session, resolvable: Callable[[str], bool]) -> int:
    """Deliveries held for want of a destination go out once their name leads somewhere."""
    names = set(
        session.scalars(
            select(Delivery.destination).where(
                Delivery.state == DeliveryState.HELD, Delivery.held_for == HELD_FOR_DESTINATION
            )
        )
    )
    ready = [name for name in names if resolvable(name)]
    if not ready:
        return 0
    now = utcnow()
    result = session.execute(
        update(Delivery)
        .where(
            Delivery.state == DeliveryState.HELD,
            Delivery.held_for == HELD_FOR_DESTINATION,
            Delivery.destination.in_(ready),
        )
        .values(state=DeliveryState.PENDING, held_for=None, next_attempt_at=now, updated_at=now)
    )
    return int(result.rowcount)  # type: ignore[attr-defined]


def retry_delivery(session: Session, delivery_id: int, actor: Actor | None = None) -> bool:
    """held | dead -> pending now, attempts counted afresh (a person decided to try again).
    A result held by the quality gate is released as a whole (``results release``), not here;
    a rejected result is never sent again."""
    now = utcnow()
    result = session.execute(
        update(Delivery)
        .where(
            Delivery.id == delivery_id,
            Delivery.state.in_([DeliveryState.HELD, DeliveryState.DEAD]),
            or_(Delivery.held_for.is_(None), Delivery.held_for != HELD_FOR_QUALITY),
            not_(_withdrawn()),
        )
        .values(
            state=DeliveryState.PENDING,
            attempts=0,
            held_for=None,
            next_attempt_at=now,
            updated_at=now,
        )
    )
    if result.rowcount != 1:  # type: ignore[attr-defined]
        return False
    job_id = session.scalar(select(Delivery.job_id).where(Delivery.id == delivery_id))
    if job_id is not None:
        add_job_event(session, job_id, "delivery_retry", actor=actor, delivery=delivery_id)
    return True


@dataclass(frozen=True)
class DeliverySummary:
    id: int
    job_id: int
    study_uid: str
    destination: str
    kind: str
    sop_instance_uid: str | None
    state: str
    attempts: int
    next_attempt_at: datetime | None
    last_error: str | None
    held_for: str | None
    transfer_syntax_uid: str | None
    created_at: datetime
    delivered_at: datetime | None
    commitment: str | None = None

    def as_json(self) -> dict[str, Any]:
        """The public shape of ``deliveries --json``; fields are only ever added."""
        return {
            "id": self.id,
            "job_id": self.job_id,
            "study_uid": self.study_uid,
            "destination": self.destination,
            "kind": self.kind,
            "sop_instance_uid": self.sop_instance_uid,
            "state": self.state,
            "attempts": self.attempts,
            "next_attempt_at": self.next_attempt_at.isoformat() if self.next_attempt_at else None,
            "last_error": self.last_error,
            "held_for": self.held_for,
            "transfer_syntax_uid": self.transfer_syntax_uid,
            "created_at": self.created_at.isoformat(),
            "delivered_at": self.delivered_at.isoformat() if self.delivered_at else None,
            "commitment": self.commitment,
        }


def list_deliveries(
    session: Session,
    *,
    states: Iterable[str] | None = None,
    job_id: int | None = None,
    ids: Collection[int] | None = None,
) -> list[DeliverySummary]:
    query = (
        select(Delivery, Result.kind, Result.sop_instance_uid, Study.study_uid)
        .join(Result, Result.id == Delivery.result_id)
        .join(Job, Job.id == Delivery.job_id)
        .join(Study, Study.id == Job.study_id)
        .order_by(Delivery.id)
    )
    if states is not None:
        query = query.where(or_(*(Delivery.state == s for s in states)))
    if job_id is not None:
        query = query.where(Delivery.job_id == job_id)
    if ids is not None:
        query = query.where(Delivery.id.in_(list(ids)))
    return [
        DeliverySummary(
            id=d.id,
            job_id=d.job_id,
            study_uid=study_uid,
            destination=d.destination,
            kind=kind,
            sop_instance_uid=sop_uid,
            state=d.state.value,
            attempts=d.attempts,
            next_attempt_at=d.next_attempt_at,
            last_error=d.last_error,
            held_for=d.held_for,
            transfer_syntax_uid=d.transfer_syntax_uid,
            created_at=d.created_at,
            delivered_at=d.delivered_at,
            commitment=d.commitment,
        )
        for d, kind, sop_uid, study_uid in session.execute(query).all()
    ]
