"""Tables of the catalog. Changes to them go through an alembic migration in ``migrations/``."""

from __future__ import annotations

import enum
from datetime import UTC, datetime
from typing import Any

from sqlalchemy import (
    JSON,
    BigInteger,
    Boolean,
    DateTime,
    Enum,
    ForeignKey,
    Index,
    Integer,
    MetaData,
    String,
    Text,
    TypeDecorator,
    UniqueConstraint,
)
from sqlalchemy.engine import Dialect
from sqlalchemy.ext.compiler import compiles
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column, relationship

NAMING = {
    "ix": "ix_%(column_0_label)s",
    "uq": "uq_%(table_name)s_%(column_0_name)s",
    "ck": "ck_%(table_name)s_%(constraint_name)s",
    "fk": "fk_%(table_name)s_%(column_0_name)s_%(referred_table_name)s",
    "pk": "pk_%(table_name)s",
}

UID = String(64)


class UTCDateTime(TypeDecorator[datetime]):
    """Timezone-aware UTC datetimes on every backend (SQLite drops the zone otherwise)."""

    impl = DateTime(timezone=True)
    cache_ok = True

    def process_bind_param(self, value: datetime | None, dialect: Dialect) -> datetime | None:
        if value is None:
            return None
        if value.tzinfo is None:
            raise ValueError("naive datetimes are not stored; use UTC")
        return value.astimezone(UTC)

    def process_result_value(self, value: Any, dialect: Dialect) -> datetime | None:
        if value is None:
            return None
        if isinstance(value, datetime) and value.tzinfo is None:
            return value.replace(tzinfo=UTC)
        return value  # type: ignore[no-any-return]


class JSONText(JSON):
    """JSON values (serialised by SQLAlchemy), SQL NULL for None; PostgreSQL stores them in
    ``json`` columns, SQLite in ``TEXT`` ones: JSON is text there, and a declared ``JSON``
    would give the column numeric affinity and, for the old TEXT columns, a table rebuild
    whose DROP TABLE cascades to every child row."""

    def __init__(self) -> None:
        super().__init__(none_as_null=True)


@compiles(JSONText, "sqlite")
def _json_as_sqlite_text(_type: JSONText, _compiler: Any, **_kw: Any) -> str:
    return "TEXT"


def utcnow() -> datetime:
    return datetime.now(UTC)


class Base(DeclarativeBase):
    metadata = MetaData(naming_convention=NAMING)


class StudyState(enum.StrEnum):
    """Assembly state: ``receiving`` until the quiet period or max wait has passed."""

    RECEIVING = "receiving"
    STABLE = "stable"


class RouteOutcome(enum.StrEnum):
    """What routing decided when the study last became stable."""

    ROUTED = "routed"  # at least one rule matched; jobs were queued
    UNROUTED = "unrouted"  # no rule matched; kept, listed, never silently dropped
    IGNORED = "ignored"  # rules matched but said to leave a changed study alone
    OWN_OUTPUT = "own_output"  # only objects this node produced: never routed


class JobState(enum.StrEnum):
    """queued -> running -> done | failed; queued | running -> cancelled; failed -> queued."""

    QUEUED = "queued"
    RUNNING = "running"
    DONE = "done"
    FAILED = "failed"
    CANCELLED = "cancelled"


class DeliveryState(enum.StrEnum):
    """pending -> sending -> delivered | pending (retry later) | held | dead;
    held | dead -> pending by hand (``deliveries retry``) or when the hold's cause is gone;
    held for quality -> pending (``results release``);
    pending | held | dead -> rejected when a person rejects the job's result (final);
    pending | held -> cancelled when the job is cancelled (back to pending or held, as it was,
    when a person retries the job)."""

    PENDING = "pending"
    SENDING = "sending"
    DELIVERED = "delivered"
    HELD = "held"  # waits for a person or for config: no destination, unknown patient
    DEAD = "dead"  # permanent refusal or too many attempts; kept, listed, retryable by hand
    REJECTED = "rejected"  # an operator rejected the result (see catalog.reviews); never sent
    CANCELLED = "cancelled"  # its job was cancelled before it was sent (see catalog.jobs)


class Commitment(enum.StrEnum):
    """A delivery's Storage Commitment state (``deliveries.commitment``; None: not asked)."""

    UNSUPPORTED = "unsupported"  # the destination does not offer it: C-STORE success confirms
    REQUESTED = "requested"  # asked; no report yet
    COMMITTED = "committed"
    FAILED = "failed"  # the destination does not commit to keep it: sent again


def _enum(cls: type[enum.StrEnum]) -> Enum:
    return Enum(cls, native_enum=False, length=16, values_callable=lambda e: [m.value for m in e])


class Role(enum.StrEnum):
    """What an account may do: each role may also do everything the ones before it may."""

    VIEWER = "viewer"  # read studies, results, jobs, deliveries, models
    OPERATOR = "operator"  # and re-run, retry, cancel, reject, release; STOW-RS
    ADMIN = "admin"  # and users, tokens, the configuration view


class Study(Base):
    __tablename__ = "studies"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    study_uid: Mapped[str] = mapped_column(UID, unique=True)
    patient_name: Mapped[str | None] = mapped_column(String(324))
    patient_id: Mapped[str | None] = mapped_column(String(64))
    issuer_of_patient_id: Mapped[str | None] = mapped_column(String(64))
    accession_number: Mapped[str | None] = mapped_column(String(64))
    study_date: Mapped[str | None] = mapped_column(String(8))
    study_time: Mapped[str | None] = mapped_column(String(16))
    study_description: Mapped[str | None] = mapped_column(String(64))
    calling_ae: Mapped[str | None] = mapped_column(String(16))
    state: Mapped[StudyState] = mapped_column(
        Enum(
            StudyState, native_enum=False, length=16, values_callable=lambda e: [m.value for m in e]
        ),
        default=StudyState.RECEIVING,
    )
    first_received_at: Mapped[datetime] = mapped_column(UTCDateTime())
    # Start of the current receiving episode: the max wait counts from here.
    receiving_since: Mapped[datetime] = mapped_column(UTCDateTime())
    last_received_at: Mapped[datetime] = mapped_column(UTCDateTime())
    stable_at: Mapped[datetime | None] = mapped_column(UTCDateTime())
    # How many times an instance arrived after the study had become stable.
    reopened_count: Mapped[int] = mapped_column(Integer, default=0)
    duplicate_count: Mapped[int] = mapped_column(Integer, default=0)
    route_outcome: Mapped[RouteOutcome | None] = mapped_column(_enum(RouteOutcome))
    routed_at: Mapped[datetime | None] = mapped_column(UTCDateTime())

    series: Mapped[list[Series]] = relationship(back_populates="study", order_by="Series.id")

    __table_args__ = (Index("ix_studies_state", "state"),)


class Series(Base):
    __tablename__ = "series"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    series_uid: Mapped[str] = mapped_column(UID, unique=True)
    study_id: Mapped[int] = mapped_column(ForeignKey("studies.id", ondelete="CASCADE"), index=True)
    modality: Mapped[str | None] = mapped_column(String(16))
    series_number: Mapped[int | None] = mapped_column(Integer)
    series_description: Mapped[str | None] = mapped_column(String(64))
    body_part: Mapped[str | None] = mapped_column(String(64))
    first_received_at: Mapped[datetime] = mapped_column(UTCDateTime())
    # The instances that lead and end the series in header order (by Instance Number, then SOP
    # Instance UID), each with the header routing reads, recorded as they arrived (see
    # catalog.studies.SeriesEnd). NULL for a series recorded before they were kept: routing
    # reads those two files from the spool instead.
    routing_first: Mapped[dict[str, Any] | None] = mapped_column(JSONText())
    routing_last: Mapped[dict[str, Any] | None] = mapped_column(JSONText())

    study: Mapped[Study] = relationship(back_populates="series")


class Instance(Base):
    __tablename__ = "instances"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    sop_instance_uid: Mapped[str] = mapped_column(UID, unique=True)
    sop_class_uid: Mapped[str] = mapped_column(UID)
    series_id: Mapped[int] = mapped_column(ForeignKey("series.id", ondelete="CASCADE"), index=True)
    instance_number: Mapped[int | None] = mapped_column(Integer)
    transfer_syntax_uid: Mapped[str] = mapped_column(UID)
    path: Mapped[str] = mapped_column(String(512))
    size_bytes: Mapped[int] = mapped_column(BigInteger)
    calling_ae: Mapped[str | None] = mapped_column(String(16))
    received_at: Mapped[datetime] = mapped_column(UTCDateTime())
    # SHA-256 (hex) of the data set as received, after the Part 10 header the node writes: a
    # re-send with the same digest is a duplicate, another digest follows ``resend_policy``.
    sha256: Mapped[str | None] = mapped_column(String(64))


class QuarantineState(enum.StrEnum):
    """held -> released | discarded | reassigned, each by an operator (``pacs-node quarantine``)."""

    HELD = "held"
    RELEASED = "released"  # filed into a study of its own
    DISCARDED = "discarded"  # bytes deleted, row kept
    REASSIGNED = "reassigned"  # filed into a study an operator named


class QuarantineItem(Base):
    """An instance the node kept but filed into no study: its identity collided with what the
    catalog holds (see :mod:`pacs_node.ingest.identity`), a re-send brought other bytes, or the
    catalog could not record it. ``path`` is under the spool's quarantine area; the UIDs are the
    ones received. ``reason_text`` never holds patient data."""

    __tablename__ = "quarantine"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    reason: Mapped[str] = mapped_column(String(32))
    reason_text: Mapped[str] = mapped_column(String(256))
    study_uid: Mapped[str] = mapped_column(UID)
    series_uid: Mapped[str] = mapped_column(UID)
    sop_instance_uid: Mapped[str] = mapped_column(UID, index=True)
    sop_class_uid: Mapped[str] = mapped_column(UID)
    transfer_syntax_uid: Mapped[str] = mapped_column(UID)
    # The study it collided with (the one it would have been filed into); not a foreign key, so
    # the item outlives that study's removal by retention.
    collided_study_uid: Mapped[str | None] = mapped_column(UID, index=True)
    patient_key: Mapped[str | None] = mapped_column(String(130))
    path: Mapped[str] = mapped_column(String(512), unique=True)
    size_bytes: Mapped[int] = mapped_column(BigInteger)
    sha256: Mapped[str | None] = mapped_column(String(64))
    calling_ae: Mapped[str | None] = mapped_column(String(16))
    received_at: Mapped[datetime] = mapped_column(UTCDateTime())
    state: Mapped[QuarantineState] = mapped_column(
        _enum(QuarantineState), default=QuarantineState.HELD
    )
    resolved_at: Mapped[datetime | None] = mapped_column(UTCDateTime())
    resolved_by: Mapped[str | None] = mapped_column(String(64))
    # Where release or reassign filed it: the Study / SOP Instance UID in the catalog.
    resolved_study_uid: Mapped[str | None] = mapped_column(UID)
    resolved_sop_instance_uid: Mapped[str | None] = mapped_column(UID)

    __table_args__ = (Index("ix_quarantine_state", "state"),)


class StudyEvent(Base):
    """Append-only: what happened to a study and when (dashboard timeline, audit trail)."""

    __tablename__ = "study_events"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    study_id: Mapped[int] = mapped_column(ForeignKey("studies.id", ondelete="CASCADE"), index=True)
    at: Mapped[datetime] = mapped_column(UTCDateTime())
    kind: Mapped[str] = mapped_column(String(32))
    detail: Mapped[dict[str, Any] | None] = mapped_column(JSONText())


class Job(Base):
    """One model run on one study: the unit a worker claims."""

    __tablename__ = "jobs"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    study_id: Mapped[int] = mapped_column(ForeignKey("studies.id", ondelete="CASCADE"), index=True)
    rule: Mapped[str | None] = mapped_column(String(64))  # None when started by hand
    model: Mapped[str] = mapped_column(String(64))
    series_uids: Mapped[list[str]] = mapped_column(JSONText())  # the series to process
    # {output kind: [destination names]}
    destinations: Mapped[dict[str, list[str]]] = mapped_column(JSONText(), default=dict)
    state: Mapped[JobState] = mapped_column(_enum(JobState), default=JobState.QUEUED)
    attempts: Mapped[int] = mapped_column(Integer, default=0)
    progress: Mapped[float] = mapped_column(default=0.0)
    stage: Mapped[str | None] = mapped_column(String(32))
    timings: Mapped[dict[str, float]] = mapped_column(JSONText(), default=dict)  # {stage: s}
    error: Mapped[str | None] = mapped_column(Text)
    claimed_by: Mapped[str | None] = mapped_column(String(64))
    # A Celery worker's claim holds until this time unless renewed (None: a claim of a local
    # worker, which its node takes back itself); see pacs_node.jobs.celery_queue.
    lease_expires_at: Mapped[datetime | None] = mapped_column(UTCDateTime())
    # When the job was last handed to the broker (None: not yet, or to be handed again), and how
    # often since it was queued (each hand-over waits twice as long as the one before).
    published_at: Mapped[datetime | None] = mapped_column(UTCDateTime())
    publish_count: Mapped[int] = mapped_column(Integer, default=0, server_default="0")
    created_at: Mapped[datetime] = mapped_column(UTCDateTime())
    started_at: Mapped[datetime | None] = mapped_column(UTCDateTime())
    finished_at: Mapped[datetime | None] = mapped_column(UTCDateTime())
    # The quality gate: the route's mode (hold | flag | off), the verdict (pass | fail; None:
    # not run), the failed checks (a list of {check, label, value, limit, message}) and an
    # operator's decision on a held result (released | rejected).
    qa_mode: Mapped[str | None] = mapped_column(String(8))
    qa_verdict: Mapped[str | None] = mapped_column(String(8))
    qa_reasons: Mapped[list[dict[str, Any]] | None] = mapped_column(JSONText())
    qa_decision: Mapped[str | None] = mapped_column(String(16))

    __table_args__ = (Index("ix_jobs_state", "state"),)


class JobEvent(Base):
    """Append-only: what happened to a job and when."""

    __tablename__ = "job_events"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    job_id: Mapped[int] = mapped_column(ForeignKey("jobs.id", ondelete="CASCADE"), index=True)
    at: Mapped[datetime] = mapped_column(UTCDateTime())
    kind: Mapped[str] = mapped_column(String(32))
    detail: Mapped[dict[str, Any] | None] = mapped_column(JSONText())


class Result(Base):
    """One stored result object of a job and its stored encodings (what dispatch sends)."""

    __tablename__ = "results"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    job_id: Mapped[int] = mapped_column(ForeignKey("jobs.id", ondelete="CASCADE"), index=True)
    kind: Mapped[str] = mapped_column(String(16))  # OutputKind: seg, sr, gsps, ..., fhir
    sop_class_uid: Mapped[str | None] = mapped_column(UID)  # None for the FHIR Bundle
    sop_instance_uid: Mapped[str | None] = mapped_column(UID)
    series_uid: Mapped[str | None] = mapped_column(UID)
    # {transfer syntax UID (or media type for FHIR): path under data_dir/results}, the
    # preferred first
    encodings: Mapped[dict[str, str]] = mapped_column(JSONText())
    size_bytes: Mapped[int] = mapped_column(BigInteger)
    patient_search: Mapped[str | None] = mapped_column(Text)  # FHIR: how the EHR finds the patient
    # Built for this destination only (a FHIR Bundle under that EHR's patient identifier rules);
    # None: for every destination of its kind.
    destination: Mapped[str | None] = mapped_column(String(64))
    created_at: Mapped[datetime] = mapped_column(UTCDateTime())


class Delivery(Base):
    """The outbox: one result to one destination, retried until delivered or dead-lettered."""

    __tablename__ = "deliveries"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    result_id: Mapped[int] = mapped_column(ForeignKey("results.id", ondelete="CASCADE"))
    job_id: Mapped[int] = mapped_column(ForeignKey("jobs.id", ondelete="CASCADE"), index=True)
    destination: Mapped[str] = mapped_column(String(64))  # a name; SOURCE already resolved
    state: Mapped[DeliveryState] = mapped_column(
        _enum(DeliveryState), default=DeliveryState.PENDING
    )
    attempts: Mapped[int] = mapped_column(Integer, default=0)
    next_attempt_at: Mapped[datetime | None] = mapped_column(UTCDateTime())
    last_error: Mapped[str | None] = mapped_column(Text)
    # Why it is held: "destination" (none configured yet), "patient" (unknown to the EHR) or
    # "quality" (the result failed the quality gate: an operator releases or rejects it).
    held_for: Mapped[str | None] = mapped_column(String(16))
    transfer_syntax_uid: Mapped[str | None] = mapped_column(UID)  # the encoding that was sent
    created_at: Mapped[datetime] = mapped_column(UTCDateTime())
    updated_at: Mapped[datetime] = mapped_column(UTCDateTime())
    delivered_at: Mapped[datetime | None] = mapped_column(UTCDateTime())
    # Storage Commitment (DICOM destinations): None (not asked: STOW-RS, FHIR, or switched off),
    # a Commitment value (see dispatch.commitment).
    commitment: Mapped[str | None] = mapped_column(String(16))
    commitment_uid: Mapped[str | None] = mapped_column(UID)  # the N-ACTION's Transaction UID
    committed_at: Mapped[datetime | None] = mapped_column(UTCDateTime())
    # Who may answer that request on an association of its own: the destination's AE title and
    # the addresses of its host (space-separated), as they were when it was asked.
    commitment_ae: Mapped[str | None] = mapped_column(String(16))
    commitment_hosts: Mapped[str | None] = mapped_column(Text)
    # A claim ('sending'): the outbox process that holds it, and until when. An expired claim is
    # taken back by any node; a restarted process takes back its own former claims at once.
    claimed_by: Mapped[str | None] = mapped_column(String(160))
    lease_expires_at: Mapped[datetime | None] = mapped_column(UTCDateTime())

    __table_args__ = (
        UniqueConstraint("result_id", "destination"),
        Index("ix_deliveries_state_next", "state", "next_attempt_at"),
    )


class Purge(Base):
    """A study removed by retention: its catalog rows went first, in the transaction that wrote
    this row; ``paths`` lists the files to remove after it, ``files_removed_at`` says they are
    gone. A row whose files are not yet removed is finished at start, before reconciliation,
    so a crash in between never brings the study back. Kept as the audit trail."""

    __tablename__ = "purges"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    study_uid: Mapped[str] = mapped_column(UID, index=True)
    reason: Mapped[str] = mapped_column(String(32))  # retention_days | disk_watermark
    instances: Mapped[int] = mapped_column(Integer)
    size_bytes: Mapped[int] = mapped_column(BigInteger)
    # {"spool": [relpath], "sha256": [digest of each spool file, "" unknown], "results": [folder]}
    paths: Mapped[dict[str, list[str]]] = mapped_column(JSONText())
    purged_at: Mapped[datetime] = mapped_column(UTCDateTime())
    files_removed_at: Mapped[datetime | None] = mapped_column(UTCDateTime())


class CommitmentReportRow(Base):
    """A Storage Commitment report a destination sent on an association of its own. Kept until
    its deliveries are marked with its Transaction UID, since the report may arrive while the
    node still waits for it on the results association; then settled and kept for the audit."""

    __tablename__ = "commitment_reports"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    transaction_uid: Mapped[str] = mapped_column(UID, index=True)
    calling_ae: Mapped[str] = mapped_column(String(16))
    peer_address: Mapped[str | None] = mapped_column(String(64))  # the association's IP address
    committed: Mapped[list[str]] = mapped_column(JSONText())  # [SOP Instance UID]
    # [[SOP Instance UID, Failure Reason]]
    failed: Mapped[list[list[str | int]]] = mapped_column(JSONText())
    received_at: Mapped[datetime] = mapped_column(UTCDateTime())
    settled_at: Mapped[datetime | None] = mapped_column(UTCDateTime())
    # Sent by another AE or host than the destination asked: it settles nothing.
    refused_at: Mapped[datetime | None] = mapped_column(UTCDateTime())


class Counter(Base):
    """Monotonic counters (rejected associations, duplicates, failed instances)."""

    __tablename__ = "counters"

    name: Mapped[str] = mapped_column(String(64), primary_key=True)
    value: Mapped[int] = mapped_column(BigInteger, default=0)


class User(Base):
    """An account of the web face (and of the CLI's ``users`` and ``tokens`` commands)."""

    __tablename__ = "users"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    name: Mapped[str] = mapped_column(String(64), unique=True)
    role: Mapped[Role] = mapped_column(_enum(Role))
    password_hash: Mapped[str | None] = mapped_column(String(255))  # argon2id; None: no login
    must_change_password: Mapped[bool] = mapped_column(Boolean, default=False)
    # Failed logins since the last success, and until when the account refuses logins.
    failed_logins: Mapped[int] = mapped_column(Integer, default=0)
    locked_until: Mapped[datetime | None] = mapped_column(UTCDateTime())
    created_at: Mapped[datetime] = mapped_column(UTCDateTime())
    disabled_at: Mapped[datetime | None] = mapped_column(UTCDateTime())


class ApiToken(Base):
    """A bearer token for scripts; it acts as its user. Only its SHA-256 is kept."""

    __tablename__ = "api_tokens"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    user_id: Mapped[int] = mapped_column(ForeignKey("users.id", ondelete="CASCADE"), index=True)
    name: Mapped[str] = mapped_column(String(64))
    digest: Mapped[str] = mapped_column(String(64), unique=True)
    created_at: Mapped[datetime] = mapped_column(UTCDateTime())
    last_used_at: Mapped[datetime | None] = mapped_column(UTCDateTime())
    revoked_at: Mapped[datetime | None] = mapped_column(UTCDateTime())


class WebSession(Base):
    """A signed-in browser: the cookie's SHA-256, its CSRF token and its expiry."""

    __tablename__ = "web_sessions"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    digest: Mapped[str] = mapped_column(String(64), unique=True)
    user_id: Mapped[int] = mapped_column(ForeignKey("users.id", ondelete="CASCADE"), index=True)
    csrf_token: Mapped[str] = mapped_column(String(64))
    created_at: Mapped[datetime] = mapped_column(UTCDateTime())
    expires_at: Mapped[datetime] = mapped_column(UTCDateTime())


class AuditRecord(Base):
    """One DICOM PS3.15 audit message (see :mod:`pacs_node.audit`), appended and never
    changed but for ``forwarded_at``; retention never removes it. ``id`` is the order in which
    the syslog forwarder sends them; ``event_time`` is the time as recorded, with its offset."""

    __tablename__ = "audit_events"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    at: Mapped[datetime] = mapped_column(UTCDateTime(), index=True)
    event_time: Mapped[str] = mapped_column(String(40))
    event_id: Mapped[str] = mapped_column(String(16))  # the DCM code of EventID
    event_type: Mapped[str | None] = mapped_column(String(16))  # the first EventTypeCode
    action: Mapped[str] = mapped_column(String(1))
    outcome: Mapped[int] = mapped_column(Integer)
    actor: Mapped[str] = mapped_column(String(255))
    participants: Mapped[list[str]] = mapped_column(JSONText())
    description: Mapped[str | None] = mapped_column(Text)
    message: Mapped[str] = mapped_column(Text)  # the AuditMessage XML
    forwarded_at: Mapped[datetime | None] = mapped_column(UTCDateTime(), index=True)


class NodeLease(Base):
    """A duty one node of a group holds at a time (``timers``: assembly and housekeeping),
    taken and renewed by compare-and-set (:mod:`pacs_node.catalog.leases`)."""

    __tablename__ = "node_leases"

    name: Mapped[str] = mapped_column(String(64), primary_key=True)
    owner: Mapped[str] = mapped_column(String(128))
    expires_at: Mapped[datetime] = mapped_column(UTCDateTime())


class PerformedStepStatus(enum.StrEnum):
    """Performed Procedure Step Status (0040,0252) of a Modality Performed Procedure Step
    (PS3.3 C.4.14): created IN PROGRESS, then set once to COMPLETED or DISCONTINUED."""

    IN_PROGRESS = "IN PROGRESS"
    COMPLETED = "COMPLETED"
    DISCONTINUED = "DISCONTINUED"


class PerformedStep(Base):
    """A Modality Performed Procedure Step a scanner created (N-CREATE) and updated (N-SET):
    assembly reads it, so every node sharing the catalog sees the same state."""

    __tablename__ = "performed_steps"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    sop_instance_uid: Mapped[str] = mapped_column(UID, unique=True)
    study_uid: Mapped[str] = mapped_column(UID, index=True)
    calling_ae: Mapped[str] = mapped_column(String(16))
    status: Mapped[PerformedStepStatus] = mapped_column(_enum(PerformedStepStatus))
    created_at: Mapped[datetime] = mapped_column(UTCDateTime())
    updated_at: Mapped[datetime] = mapped_column(UTCDateTime())
    ended_at: Mapped[datetime | None] = mapped_column(UTCDateTime())  # COMPLETED/DISCONTINUED
    # How many distinct instances the step lists (0: unlisted), kept beside the rows so that
    # assembly compares counts before it joins.
    listed: Mapped[int] = mapped_column(Integer, default=0, server_default="0")

    instances: Mapped[list[PerformedInstance]] = relationship(
        back_populates="step", cascade="all, delete-orphan", passive_deletes=True
    )

    __table_args__ = (Index("ix_performed_steps_ae_status", "calling_ae", "status"),)


class PerformedInstance(Base):
    """An instance a Performed Procedure Step lists in its Performed Series Sequence."""

    __tablename__ = "performed_instances"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    step_id: Mapped[int] = mapped_column(
        ForeignKey("performed_steps.id", ondelete="CASCADE"), index=True
    )
    series_uid: Mapped[str] = mapped_column(UID)
    sop_instance_uid: Mapped[str] = mapped_column(UID, index=True)

    step: Mapped[PerformedStep] = relationship(back_populates="instances")

    __table_args__ = (UniqueConstraint("step_id", "sop_instance_uid"),)


class NodeRegistration(Base):
    """A running node of the group under its ``node_id``: who (host, pid, the process's owner
    token) and since when, with a heartbeat its timer lease renews. A second live process under
    the same ``node_id`` is refused at start (:mod:`pacs_node.catalog.nodes`)."""

    __tablename__ = "node_registrations"

    node_id: Mapped[str] = mapped_column(String(64), primary_key=True)
    owner: Mapped[str] = mapped_column(String(128))  # ``<node id>/<pid>/<token>``
    host: Mapped[str] = mapped_column(String(255))
    pid: Mapped[int] = mapped_column(Integer)
    # which process exactly (pacs_node.process_identity): "" / 0 where unknown
    boot_id: Mapped[str] = mapped_column(String(64), server_default="")
    pid_ns: Mapped[int] = mapped_column(BigInteger, server_default="0")
    pid_start: Mapped[int] = mapped_column(BigInteger, server_default="0")
    started_at: Mapped[datetime] = mapped_column(UTCDateTime())
    heartbeat_at: Mapped[datetime] = mapped_column(UTCDateTime())
