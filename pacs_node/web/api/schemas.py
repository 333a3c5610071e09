"""The JSON API's shapes: Pydantic models that are both what a route answers and the OpenAPI
document's schemas. Each one follows the ``--json`` output of the matching CLI command, built
from the same service objects, so a script can move between the two."""

from __future__ import annotations

from datetime import datetime
from typing import Annotated, Any, Generic, TypeVar

from pydantic import BaseModel, ConfigDict, Field

from pacs_node.catalog.models import DeliveryState, JobState, StudyState

T = TypeVar("T")

UID_PATTERN = r"^[0-9]+(\.[0-9]+)*$"
UID = Annotated[str, Field(min_length=1, max_length=64, pattern=UID_PATTERN)]
MODEL_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$"


class Shape(BaseModel):
    model_config = ConfigDict(frozen=True)


class Problem(Shape):
    """Every error answer: what went wrong, in words (for a request that fails validation, the
    list of what is wrong with it, as FastAPI words it)."""

    detail: str | list[dict[str, Any]]


class Page(Shape, Generic[T]):
    """One page of a listing: ``total`` is how many match the filters in all."""

    items: list[T]
    total: int
    limit: int
    offset: int


class SeriesOut(Shape):
    series_uid: str
    modality: str | None
    series_number: int | None
    series_description: str | None
    body_part: str | None
    instances: int
    size_bytes: int


class StudyOut(Shape):
    study_uid: str
    state: StudyState
    status: str | None = Field(
        description="unrouted | queued | processing | done | failed; null until routed"
    )
    route_outcome: str | None
    instances: int
    size_bytes: int
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
    quarantined: int
    series: list[SeriesOut]


class QualityOut(Shape):
    mode: str | None
    verdict: str | None
    failures: list[dict[str, Any]]
    decision: str | None


class JobOut(Shape):
    id: int
    study_uid: str
    rule: str | None = Field(description="the routing rule that queued it; null: by hand")
    model: str
    series_uids: list[str]
    destinations: dict[str, list[str]]
    state: JobState
    attempts: int
    stage: str | None
    progress: float
    timings: dict[str, float] = Field(description="seconds per pipeline stage")
    error: str | None
    created_at: datetime
    started_at: datetime | None
    finished_at: datetime | None
    quality: QualityOut


class DeliveryOut(Shape):
    id: int
    job_id: int
    study_uid: str
    destination: str
    kind: str
    sop_instance_uid: str | None
    state: DeliveryState
    attempts: int
    next_attempt_at: datetime | None
    last_error: str | None
    held_for: str | None
    transfer_syntax_uid: str | None
    created_at: datetime
    delivered_at: datetime | None
    commitment: str | None


class ResultOut(Shape):
    id: int
    job_id: int
    kind: str
    sop_class_uid: str | None
    sop_instance_uid: str | None
    series_uid: str | None
    size_bytes: int
    destination: str | None
    created_at: datetime


class SubjectOut(Shape):
    kind: str = Field(description="study | job | delivery")
    id: str


class TimelineEventOut(Shape):
    at: datetime
    kind: str
    subject: SubjectOut
    actor: str | None = Field(description='who acted, as "kind:name"; null: a stage of the node')
    detail: dict[str, Any]


class StudyDetailOut(StudyOut):
    jobs: list[JobOut]
    results: list[ResultOut]
    deliveries: list[DeliveryOut]
    timeline: list[TimelineEventOut]


class RerunIn(Shape):
    """Queue a study again: the model to run (default: what the routes say) on the series given
    (default: those the rules, or the router's selection for the model, pick)."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    model: str | None = Field(default=None, pattern=MODEL_PATTERN)
    series: list[UID] = Field(default_factory=list, max_length=1000)


class RerunOut(Shape):
    jobs: list[JobOut]


class ConceptOut(Shape):
    value: str
    scheme: str
    meaning: str


class SegmentTypeOut(Shape):
    value: str | None = None
    scheme: str | None = None
    meaning: str | None = None
    modifier: ConceptOut | None = None


class LabelOut(Shape):
    value: int
    name: str
    category: ConceptOut | None
    type: SegmentTypeOut
    color: list[int]


class HeldOutOut(Shape):
    """The bundle's evaluation on its held-out set: per label, the means of each metric
    (``dice_mean``, ``iou_mean``, ``hd95_mean`` in mm, ...)."""

    cases: int
    labels: dict[str, dict[str, float]]


class ModelOut(Shape):
    name: str
    version: str
    sha256: str
    kind: str = Field(description="network | classical")
    modalities: list[str]
    labels: list[LabelOut]
    allowed: bool = Field(description="the allowlist is empty or lists the bundle's SHA-256")
    description: str
    intended_use: str | None
    card: str | None = Field(description="the model card (docs/README.md), Markdown")
    held_out: HeldOutOut | None


class RouteOut(Shape):
    name: str
    description: str
    enabled: bool
    when: dict[str, Any] = Field(description="the conditions as routes.yaml states them")
    select: str
    models: list[str]
    send: dict[str, list[str]]
    on_change: str
    qa: str = Field(description="the quality gate: hold | flag | off")
    qa_limits: dict[str, Any]


class CheckOut(Shape):
    attribute: str
    passed: bool
    reason: str


class SeriesVerdictOut(Shape):
    series_uid: str
    matched: bool
    checks: list[CheckOut]


class RuleVerdictOut(Shape):
    rule: str
    matched: bool
    reason: str
    series: list[SeriesVerdictOut]
    selected: list[str]


class JobLineOut(Shape):
    rule: str | None
    model: str
    series_uids: list[str]


class ExplainOut(Shape):
    study_uid: str
    verdicts: list[RuleVerdictOut]
    outcome: str | None = Field(description="null: the node has not routed the study yet")
    jobs: list[JobLineOut]


class StatusOut(Shape):
    healthy: bool
    catalog: str = Field(description="the catalog's address, without credentials")
    catalog_reachable: bool
    catalog_error: str | None = None
    recorder: dict[str, Any]
    counters: dict[str, int] = Field(default_factory=dict)
    studies: int | None = None
    quarantine_held: int | None = None
    checks: dict[str, bool] = Field(description="the readiness checks beside the catalog's")


class AuditEventOut(Shape):
    """One DICOM PS3.15 audit event (``pacs-node audit --json``)."""

    id: int
    event_id: str
    event_type: str | None
    action: str
    outcome: int
    time: str
    actor: str
    participants: list[str]
    description: str | None
    forwarded: bool


class AuditPageOut(Shape):
    """A page of the audit trail, oldest first."""

    events: list[AuditEventOut]
    truncated: bool = Field(
        description="more events matched than the limit let in: older ones, or with after_id "
        "newer ones (ask again with after_id = the last event's id)"
    )
