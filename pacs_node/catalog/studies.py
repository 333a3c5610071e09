"""Study, series and instance rows: recording received instances, assembly transitions, listings."""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import Any

from sqlalchemy import func, select, update
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.orm import Session

from pacs_node.catalog.clock import db_clock
from pacs_node.catalog.identity import REASON_TEXT, Held, Verdict, decide, header_key
from pacs_node.catalog.models import (
    Counter,
    Instance,
    Job,
    JobState,
    QuarantineItem,
    QuarantineState,
    RouteOutcome,
    Series,
    Study,
    StudyEvent,
    StudyState,
    utcnow,
)
from pacs_node.catalog.quarantine import held_counts, lookup_held
from pacs_node.redact import scrub_detail
from pacs_node.refs import InstanceRef, RoutingHeader, header_order

RECEIVED_INSTANCES = "received_instances"  # counters: instances recorded into studies
RECEIVED_BYTES = "received_bytes"  # and their bytes


@dataclass(frozen=True, slots=True)
class StudyTouch:
    """A study that received instances in one recorded batch (what assembly needs to know)."""

    study_uid: str
    last_received_at: datetime
    receiving_since: datetime
    calling_ae: str | None
    reopened: bool


@dataclass(slots=True)
class RecordOutcome:
    touches: list[StudyTouch] = field(default_factory=list)
    recorded: int = 0
    quarantined: int = 0
    replaced: int = 0
    # Spool files whose bytes now live in the quarantine area (linked there before the commit):
    # the recorder removes these names once the transaction is committed.
    release_paths: list[str] = field(default_factory=list)


@dataclass(frozen=True, slots=True)
class SeriesEnd:
    """The instance that leads or ends a series in :func:`~pacs_node.refs.header_order`, with
    the header routing reads of it (None where the recorder was given none): what a series row
    keeps in ``routing_first`` and ``routing_last``, so routing reads no file for it."""

    sop_instance_uid: str
    instance_number: int | None
    calling_ae: str | None
    header: RoutingHeader | None

    @classmethod
    def of(cls, ref: InstanceRef) -> SeriesEnd:
        return cls(ref.sop_instance_uid, ref.header.instance_number, ref.calling_ae, ref.routing)

    def order(self) -> tuple[bool, int, str]:
        return header_order(self.instance_number, self.sop_instance_uid)

    def to_json(self) -> dict[str, Any]:
        return {
            "sop": self.sop_instance_uid,
            "number": self.instance_number,
            "calling_ae": self.calling_ae,
            "header": None if self.header is None else self.header.to_json(),
        }

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> SeriesEnd:
        header = data.get("header")
        return cls(
            str(data["sop"]),
            data.get("number"),
            data.get("calling_ae"),
            None if header is None else RoutingHeader.from_json(header),
        )


@dataclass(frozen=True, slots=True)
class SeriesHeaders:
    """The routing headers of a series' leading and ending instances, as recorded, and the
    calling AE of the leading one."""

    first: RoutingHeader
    last: RoutingHeader
    calling_ae: str | None


def series_headers(series: Series) -> SeriesHeaders | None:
    """What the catalog recorded of a series for routing, or None where it has not both headers
    (a series recorded before they were kept, or an end recorded without one): routing then
    reads the spooled files."""
    if series.routing_first is None or series.routing_last is None:
        return None
    first = SeriesEnd.from_json(series.routing_first)
    last = SeriesEnd.from_json(series.routing_last)
    if first.header is None or last.header is None:
        return None
    return SeriesHeaders(first.header, last.header, first.calling_ae)


def _record_series_ends(
    session: Session,
    series_before: set[str],
    accepted: Sequence[InstanceRef],
    replaced: Sequence[InstanceRef],
) -> None:
    """Keep each touched series' leading and ending instance (see :class:`SeriesEnd`).

    A series new in this batch takes the ends of its accepted instances; an older one moves an
    end only when a new instance sorts before its first or after its last, and keeps NULL ends
    (recorded before they were kept) as they are, for its other instances were never read. A
    replacement (``resend_policy: replace``) that is an end gives that end its header; when it
    changed its Instance Number, the instance now at that end is not known without reading the
    others, so the series' ends are set NULL (routing reads its files). A replacement that is no
    end moves an end as a new instance does. Quarantined instances join no series
    and never get here. Instances leave only with their whole study (retention purges a study
    and its series with it), so an end never names an instance the catalog no longer holds.
    """
    added: dict[str, list[InstanceRef]] = {}
    for ref in accepted:
        added.setdefault(ref.series_uid, []).append(ref)
    touched = set(added) | {ref.series_uid for ref in replaced}
    if not touched:
        return
    for series in session.scalars(select(Series).where(Series.series_uid.in_(touched))):
        held: list[SeriesEnd] = []
        if series.series_uid in series_before:
            if series.routing_first is None or series.routing_last is None:
                continue
            held = [
                SeriesEnd.from_json(series.routing_first),
                SeriesEnd.from_json(series.routing_last),
            ]
        new = held + [SeriesEnd.of(ref) for ref in added.get(series.series_uid, [])]
        ends = [min(new, key=SeriesEnd.order), max(new, key=SeriesEnd.order)] if new else []
        moved = False
        for ref in replaced:
            if ref.series_uid != series.series_uid or not ends:
                continue
            at = [i for i, end in enumerate(ends) if end.sop_instance_uid == ref.sop_instance_uid]
            if any(ends[i].instance_number != ref.header.instance_number for i in at):
                moved = True  # an end moved inside the series: its new end is not known
            for index in at:
                ends[index] = SeriesEnd.of(ref)
            if not at:
                candidate = SeriesEnd.of(ref)
                ends = [
                    min(ends[0], candidate, key=SeriesEnd.order),
                    max(ends[1], candidate, key=SeriesEnd.order),
                ]
        if moved:
            series.routing_first = series.routing_last = None
            continue
        if not ends or ends == held:
            continue  # unchanged: the row is not written again
        series.routing_first, series.routing_last = ends[0].to_json(), ends[1].to_json()


Hold = Callable[[InstanceRef], tuple[str, str, int]]
"""Keep a spooled instance's bytes in the quarantine area: ref -> (path, sha256, size)."""


def _insert_ignore(session: Session, table: Any, rows: list[dict[str, Any]], key: str) -> None:
    """``INSERT ... ON CONFLICT (key) DO NOTHING`` on SQLite and PostgreSQL."""
    if not rows:
        return
    name = session.get_bind().dialect.name
    dialect_insert = postgresql.insert if name == "postgresql" else sqlite.insert
    session.execute(dialect_insert(table).on_conflict_do_nothing(index_elements=[key]), rows)


def add_event(session: Session, study_id: int, kind: str, at: datetime, **detail: Any) -> None:
    detail = scrub_detail(detail)  # a reason or error may quote patient data
    session.add(
        StudyEvent(
            study_id=study_id,
            at=at,
            kind=kind,
            detail=dict(sorted(detail.items())) or None,
        )
    )


def increment(session: Session, name: str, by: int = 1) -> None:
    if by == 0:
        return
    _insert_ignore(session, Counter, [{"name": name, "value": 0}], "name")
    session.execute(update(Counter).where(Counter.name == name).values(value=Counter.value + by))


def counters(session: Session) -> dict[str, int]:
    return {row.name: row.value for row in session.scalars(select(Counter))}


def add_quarantined(
    session: Session,
    ref: InstanceRef,
    *,
    reason: str,
    path: str,
    sha256: str | None,
    size_bytes: int,
    collided_study_uid: str | None,
) -> int | None:
    """A quarantine row (idempotent on its path); its id, or None when it was held already."""
    name = session.get_bind().dialect.name
    dialect_insert = postgresql.insert if name == "postgresql" else sqlite.insert
    row = {
        "reason": reason,
        "reason_text": REASON_TEXT.get(reason, reason)[:256],
        "study_uid": ref.study_uid,
        "series_uid": ref.series_uid,
        "sop_instance_uid": ref.sop_instance_uid,
        "sop_class_uid": ref.header.sop_class_uid,
        "transfer_syntax_uid": ref.transfer_syntax_uid,
        "collided_study_uid": collided_study_uid,
        "patient_key": header_key(ref.header),
        "path": path,
        "size_bytes": size_bytes,
        "sha256": sha256,
        "calling_ae": ref.calling_ae,
        "received_at": ref.received_at,
        "state": QuarantineState.HELD,
    }
    # The same bytes kept again after their row was resolved (discarded, released) are held
    # again: the row goes back to ``held`` rather than the copy having none.
    again = {key: row[key] for key in ("reason", "reason_text", "collided_study_uid", "state")}
    again |= {
        "received_at": ref.received_at,
        "calling_ae": ref.calling_ae,
        "resolved_at": None,
        "resolved_by": None,
        "resolved_study_uid": None,
        "resolved_sop_instance_uid": None,
    }
    inserted = session.execute(
        dialect_insert(QuarantineItem)
        .values(row)
        .on_conflict_do_update(
            index_elements=["path"],
            set_=again,
            where=QuarantineItem.state != QuarantineState.HELD,
        )
        .returning(QuarantineItem.id)
    ).first()
    if inserted is None:
        return None
    increment(session, "quarantined_instances")
    increment(session, f"quarantined_{reason}")
    return int(inserted[0])


def record_instances(
    session: Session, refs: Sequence[InstanceRef], *, hold: Hold | None = None
) -> RecordOutcome:
    """Record a batch of spooled instances; idempotent (reconciliation replays it safely).

    Each instance passes the identity check (:mod:`pacs_node.catalog.identity`) in the order it
    was acknowledged, against the catalog and the instances before it in the batch: one that
    collides is recorded in quarantine (its bytes linked there by ``hold``) and joins no study.
    """
    outcome = RecordOutcome()
    if not refs:
        return outcome
    _lock_for_write(session)
    # Arrival times by the database's clock where several nodes share it (PostgreSQL), so a
    # node whose clock runs ahead or behind neither shortens nor stretches a quiet period.
    arrived = db_clock(session)
    held = lookup_held(
        session,
        {r.study_uid for r in refs},
        {r.series_uid for r in refs},
        {r.sop_instance_uid for r in refs},
    )
    existed_before = set(held.studies)
    series_before = set(held.series)
    accepted: list[InstanceRef] = []
    replaced: list[InstanceRef] = []
    events: list[tuple[str, str, dict[str, Any]]] = []  # (study UID, kind, detail)
    for ref in refs:
        sop_held = held.sops.get(ref.sop_instance_uid)
        if sop_held is not None and sop_held[0] == ref.path and not ref.replaces:
            continue  # a replay: the row holds this very file
        key = header_key(ref.header)
        decision = decide(
            ref.study_uid,
            ref.series_uid,
            key,
            ref.sha256,
            Held.of(held, ref.study_uid, ref.series_uid, ref.sop_instance_uid),
        )
        reason: str | None = ref.quarantine_reason
        if reason is None and decision.verdict == Verdict.CONFLICT:
            reason = decision.reason
        if reason is not None:
            collided = decision.collided_study_uid or (
                ref.study_uid if ref.study_uid in held.studies else None
            )
            if ref.quarantine_reason is None:  # still in the study's folder: link it apart
                if hold is None:
                    path, sha, size = ref.path, ref.sha256, ref.size_bytes
                else:
                    path, sha, size = hold(ref)
                    outcome.release_paths.append(ref.path)
            else:
                path, sha, size = ref.path, ref.sha256, ref.size_bytes
            item = add_quarantined(
                session,
                ref,
                reason=reason,
                path=path,
                sha256=sha,
                size_bytes=size,
                collided_study_uid=collided,
            )
            if item is not None:
                outcome.quarantined += 1
                if collided is not None:
                    detail = {"quarantine_id": item, "reason": reason, "sop": ref.sop_instance_uid}
                    events.append((collided, "quarantined", detail))
            continue
        if decision.verdict in (Verdict.DUPLICATE, Verdict.RESEND):
            if ref.replaces:
                replaced.append(ref)
                sop = held.sops[ref.sop_instance_uid]
                held.sops[ref.sop_instance_uid] = (sop[0], sop[1], sop[2], ref.sha256)
            continue  # the row holds this file already (a replay)
        accepted.append(ref)
        held.studies.setdefault(ref.study_uid, (None, key))
        held.series.setdefault(ref.series_uid, ref.study_uid)
        held.sops[ref.sop_instance_uid] = (ref.path, ref.study_uid, ref.series_uid, ref.sha256)

    first_of_study: dict[str, InstanceRef] = {}
    first_of_series: dict[str, InstanceRef] = {}
    for ref in accepted:
        first_of_study.setdefault(ref.study_uid, ref)
        first_of_series.setdefault(ref.series_uid, ref)
    _insert_ignore(
        session,
        Study,
        [
            {
                "study_uid": r.study_uid,
                "patient_name": r.header.patient_name,
                "patient_id": r.header.patient_id,
                "issuer_of_patient_id": r.header.issuer_of_patient_id,
                "accession_number": r.header.accession_number,
                "study_date": r.header.study_date,
                "study_time": r.header.study_time,
                "study_description": r.header.study_description,
                "calling_ae": r.calling_ae,
                "state": StudyState.RECEIVING,
                "first_received_at": (arrived or r.received_at),
                "receiving_since": (arrived or r.received_at),
                "last_received_at": (arrived or r.received_at),
                "reopened_count": 0,
                "duplicate_count": 0,
            }
            for r in first_of_study.values()
        ],
        "study_uid",
    )
    touched_uids = (
        set(first_of_study) | {r.study_uid for r in replaced} | {uid for uid, _, _ in events}
    )
    studies = {
        s.study_uid: s
        for s in session.scalars(select(Study).where(Study.study_uid.in_(touched_uids)))
    }
    _insert_ignore(
        session,
        Series,
        [
            {
                "series_uid": r.series_uid,
                "study_id": studies[r.study_uid].id,
                "modality": r.header.modality,
                "series_number": r.header.series_number,
                "series_description": r.header.series_description,
                "body_part": r.header.body_part,
                "first_received_at": (arrived or r.received_at),
            }
            for r in first_of_series.values()
        ],
        "series_uid",
    )
    series_ids = dict(
        session.execute(
            select(Series.series_uid, Series.id).where(Series.series_uid.in_(first_of_series))
        ).all()
    )
    new_rows = [
        {
            "sop_instance_uid": ref.sop_instance_uid,
            "sop_class_uid": ref.header.sop_class_uid,
            "series_id": series_ids[ref.series_uid],
            "instance_number": ref.header.instance_number,
            "transfer_syntax_uid": ref.transfer_syntax_uid,
            "path": ref.path,
            "size_bytes": ref.size_bytes,
            "calling_ae": ref.calling_ae,
            "received_at": (arrived or ref.received_at),
            "sha256": ref.sha256,
        }
        for ref in accepted
    ]
    _insert_ignore(session, Instance, new_rows, "sop_instance_uid")
    outcome.recorded = len(new_rows)
    # received and kept (a replay or a second copy is not counted again): /metrics reads these
    increment(session, RECEIVED_INSTANCES, len(new_rows))
    increment(session, RECEIVED_BYTES, sum(ref.size_bytes for ref in accepted))
    for ref in replaced:
        session.execute(
            update(Instance)
            .where(Instance.sop_instance_uid == ref.sop_instance_uid)
            .values(
                sha256=ref.sha256,
                size_bytes=ref.size_bytes,
                transfer_syntax_uid=ref.transfer_syntax_uid,
                received_at=(arrived or ref.received_at),
                calling_ae=ref.calling_ae,
                instance_number=ref.header.instance_number,
            )
        )
        events.append((ref.study_uid, "replaced", {"sop": ref.sop_instance_uid}))
    outcome.replaced = len(replaced)
    increment(session, "replaced_instances", len(replaced))
    _record_series_ends(session, series_before, accepted, replaced)

    added_by_study: dict[str, list[InstanceRef]] = {}
    for ref in (*accepted, *replaced):
        added_by_study.setdefault(ref.study_uid, []).append(ref)
    for study_uid, added in added_by_study.items():
        study = studies[study_uid]
        latest = max((arrived or ref.received_at) for ref in added)
        if study_uid not in existed_before:
            sender = {"sender": added[0].sender} if added[0].sender else {}
            add_event(session, study.id, "receiving", study.first_received_at, **sender)
        reopened = study.state == StudyState.STABLE
        if reopened:
            study.state = StudyState.RECEIVING
            study.reopened_count += 1
            study.receiving_since = latest
            add_event(session, study.id, "reopened", latest, instances=len(added))
        study.last_received_at = max(study.last_received_at, latest)
        outcome.touches.append(
            StudyTouch(
                study_uid,
                study.last_received_at,
                study.receiving_since,
                added[-1].calling_ae,
                reopened,
            )
        )
    now = utcnow()
    for study_uid, kind, detail in events:
        if study_uid in studies:
            add_event(session, studies[study_uid].id, kind, now, **detail)
    # A name an instance row points at (held before, or accepted in this batch) is never
    # removed: a conflicting replacement's bytes were linked apart, but the name is the row's.
    in_use = {sop[0] for sop in held.sops.values()}
    outcome.release_paths = [p for p in outcome.release_paths if p not in in_use]
    return outcome


def path_in_use(session: Session, path: str) -> bool:
    """An instance row points at ``path`` (so its file must stay)."""
    return session.scalar(select(Instance.id).where(Instance.path == path).limit(1)) is not None


# PostgreSQL advisory locks of this application: (namespace, key), the two-integer form, so
# that another application sharing the database cannot take ours by chance with a single key
LOCK_NAMESPACE = 0x5041_4353  # "PACS"
RECORD_LOCK = 1  # writers of instance rows (record_instances, retention, quarantine)


def lock_for_write(session: Session) -> None:
    """Take the lock every writer of instance rows holds (the recorder, reconciliation, the
    quarantine CLI): retention takes it before it re-checks and removes a study, so an instance
    is either recorded before the purge looks (and the study is kept) or after it (a new study)."""
    _lock_for_write(session)


def _lock_for_write(session: Session) -> None:
    """Serialise writers before the identity check reads, so two of them (the recorder,
    reconciliation, the quarantine CLI) cannot both find a study missing and file different
    patients into it. SQLite: pysqlite begins a transaction only at the first write, so a
    write matching no row takes the write lock now. PostgreSQL: a transaction advisory lock
    (read committed: the lookups after it see what the previous writer committed)."""
    name = session.get_bind().dialect.name
    if name == "sqlite":
        session.execute(update(Counter).where(Counter.name == "").values(value=Counter.value))
    elif name == "postgresql":
        session.execute(select(func.pg_advisory_xact_lock(LOCK_NAMESPACE, RECORD_LOCK)))


def add_duplicates(session: Session, study_uids: Sequence[str]) -> None:
    """Count second copies the spool refused (same study, series and SOP Instance UID)."""
    per_study: dict[str, int] = {}
    for uid in study_uids:
        per_study[uid] = per_study.get(uid, 0) + 1
    for uid, n in per_study.items():
        session.execute(
            update(Study)
            .where(Study.study_uid == uid)
            .values(duplicate_count=Study.duplicate_count + n)
        )
    increment(session, "duplicate_instances", len(study_uids))


def receiving_studies(session: Session) -> list[StudyTouch]:
    """Every study still receiving: assembly rebuilds its timers from these at start."""
    rows = session.execute(
        select(
            Study.study_uid, Study.last_received_at, Study.receiving_since, Study.calling_ae
        ).where(Study.state == StudyState.RECEIVING)
    ).all()
    return [StudyTouch(uid, last, since, ae, reopened=False) for uid, last, since, ae in rows]


def stability_deadline(
    session: Session, study_uid: str, quiet_period_s: float, max_wait_s: float
) -> tuple[datetime, str] | None:
    """When ``study_uid`` becomes stable and why, or None when it is not receiving."""
    row = session.execute(
        select(Study.last_received_at, Study.receiving_since).where(
            Study.study_uid == study_uid, Study.state == StudyState.RECEIVING
        )
    ).first()
    if row is None:
        return None
    last, since = row
    quiet_end = last + timedelta(seconds=quiet_period_s)
    wait_end = since + timedelta(seconds=max_wait_s)
    return (quiet_end, "quiet period") if quiet_end <= wait_end else (wait_end, "max wait")


def mark_stable(session: Session, study_uid: str, now: datetime, reason: str) -> bool:
    """Receiving -> stable, only if nothing arrived since the caller looked (compare-and-set)."""
    study = session.scalars(
        select(Study).where(Study.study_uid == study_uid, Study.state == StudyState.RECEIVING)
    ).first()
    if study is None:
        return False
    result = session.execute(
        update(Study)
        .where(
            Study.id == study.id,
            Study.state == StudyState.RECEIVING,
            Study.last_received_at == study.last_received_at,
        )
        .values(state=StudyState.STABLE, stable_at=now)
    )
    if result.rowcount != 1:  # type: ignore[attr-defined]
        return False
    instances = session.scalar(
        select(func.count(Instance.id)).join(Series).where(Series.study_id == study.id)
    )
    add_event(session, study.id, "stable", now, reason=reason, instances=instances)
    return True


@dataclass(frozen=True)
class SeriesSummary:
    series_uid: str
    modality: str | None
    series_number: int | None
    series_description: str | None
    body_part: str | None
    instances: int
    size_bytes: int


@dataclass(frozen=True)
class StudySummary:
    study_uid: str
    state: str
    patient_name: str | None
    patient_id: str | None
    accession_number: str | None
    study_date: str | None
    study_description: str | None
    calling_ae: str | None
    first_received_at: datetime
    last_received_at: datetime
    stable_at: datetime | None
    reopened_count: int
    duplicate_count: int
    instances: int
    size_bytes: int
    series: tuple[SeriesSummary, ...]
    route_outcome: str | None = None
    status: str | None = None
    quarantined: int = 0  # instances that collided with this study and wait in quarantine

    def as_json(self) -> dict[str, Any]:
        """The public shape of ``studies --json``; fields are only ever added."""
        return {
            "study_uid": self.study_uid,
            "state": self.state,
            "status": self.status,
            "route_outcome": self.route_outcome,
            "instances": self.instances,
            "size_bytes": self.size_bytes,
            "patient_name": self.patient_name,
            "patient_id": self.patient_id,
            "accession_number": self.accession_number,
            "study_date": self.study_date,
            "study_description": self.study_description,
            "calling_ae": self.calling_ae,
            "first_received_at": self.first_received_at.isoformat(),
            "last_received_at": self.last_received_at.isoformat(),
            "stable_at": self.stable_at.isoformat() if self.stable_at else None,
            "reopened_count": self.reopened_count,
            "duplicate_count": self.duplicate_count,
            "quarantined": self.quarantined,
            "series": [
                {
                    "series_uid": s.series_uid,
                    "modality": s.modality,
                    "series_number": s.series_number,
                    "series_description": s.series_description,
                    "body_part": s.body_part,
                    "instances": s.instances,
                    "size_bytes": s.size_bytes,
                }
                for s in self.series
            ],
        }


def list_studies(session: Session, study_uids: Iterable[str] | None = None) -> list[StudySummary]:
    query = select(Study).order_by(Study.first_received_at, Study.id)
    if study_uids is not None:
        query = query.where(Study.study_uid.in_(list(study_uids)))
    studies = list(session.scalars(query))
    if not studies:
        return []
    counts: dict[int, tuple[int, int]] = {
        series_id: (int(count), int(size or 0))
        for series_id, count, size in session.execute(
            select(Instance.series_id, func.count(Instance.id), func.sum(Instance.size_bytes))
            .join(Series)
            .where(Series.study_id.in_([s.id for s in studies]))
            .group_by(Instance.series_id)
        ).all()
    }
    job_states: dict[int, list[JobState]] = {}
    for study_id, job_state in session.execute(
        select(Job.study_id, Job.state).where(Job.study_id.in_([s.id for s in studies]))
    ).all():
        job_states.setdefault(study_id, []).append(job_state)
    quarantined = held_counts(session, [s.study_uid for s in studies])
    summaries = []
    for study in studies:
        series = tuple(
            SeriesSummary(
                series_uid=s.series_uid,
                modality=s.modality,
                series_number=s.series_number,
                series_description=s.series_description,
                body_part=s.body_part,
                instances=counts.get(s.id, (0, 0))[0],
                size_bytes=counts.get(s.id, (0, 0))[1],
            )
            for s in study.series
        )
        summaries.append(
            StudySummary(
                study_uid=study.study_uid,
                state=study.state.value,
                patient_name=study.patient_name,
                patient_id=study.patient_id,
                accession_number=study.accession_number,
                study_date=study.study_date,
                study_description=study.study_description,
                calling_ae=study.calling_ae,
                first_received_at=study.first_received_at,
                last_received_at=study.last_received_at,
                stable_at=study.stable_at,
                reopened_count=study.reopened_count,
                duplicate_count=study.duplicate_count,
                instances=sum(s.instances for s in series),
                size_bytes=sum(s.size_bytes for s in series),
                series=series,
                route_outcome=study.route_outcome.value if study.route_outcome else None,
                status=processing_status(study.route_outcome, job_states.get(study.id, [])),
                quarantined=quarantined.get(study.study_uid, 0),
            )
        )
    return summaries


def processing_status(outcome: RouteOutcome | None, jobs: Sequence[JobState]) -> str | None:
    """unrouted | queued | processing | done | failed, from the routing outcome and the jobs;
    None until the study has been routed (or processed by hand)."""
    if jobs:
        if JobState.RUNNING in jobs:
            return "processing"
        if JobState.QUEUED in jobs:
            return "queued"
        if JobState.FAILED in jobs:
            return "failed"
        return "done"
    if outcome in (RouteOutcome.UNROUTED, RouteOutcome.OWN_OUTPUT, RouteOutcome.IGNORED):
        return "unrouted"
    return None


def known_paths(session: Session) -> set[str]:
    """Spool paths the catalog accounts for: instances, and quarantined copies."""
    return set(session.scalars(select(Instance.path))) | set(
        session.scalars(select(QuarantineItem.path))
    )
