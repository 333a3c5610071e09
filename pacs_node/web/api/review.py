"""The correction workflow over JSON: reject or accept a job's result, and the review counts per
model version (:mod:`pacs_node.services.corrections`). Changes need the operator role."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Depends, HTTPException, Request, status
from pydantic import BaseModel, ConfigDict, Field

from pacs_node.catalog.models import Role
from pacs_node.errors import PacsNodeError
from pacs_node.review import RejectionKind
from pacs_node.services import corrections
from pacs_node.services.accounts import Principal
from pacs_node.web.api.deps import RowId
from pacs_node.web.auth import require
from pacs_node.web.context import web_context

router = APIRouter(tags=["review"])
Operator = Annotated[Principal, Depends(require(Role.OPERATOR))]
Viewer = Annotated[Principal, Depends(require(Role.VIEWER))]


class RejectRequest(BaseModel):
    model_config = ConfigDict(extra="forbid", str_strip_whitespace=True)

    reason: str = Field(min_length=1, max_length=1000, description="Why, for the job's events.")
    kind: RejectionKind = Field(
        default=RejectionKind.QUALITY,
        description="quality: 'Rejected for Quality Reasons' (113001, DCM); patient-safety: "
        "'Rejected for Patient Safety Reasons' (113037, DCM), for a wrong-patient result.",
    )


class RejectionOut(BaseModel):
    job_id: int
    kind: RejectionKind
    code: str
    meaning: str
    stopped: int = Field(description="Deliveries that will never be sent.")
    note_uid: str | None = Field(description="SOP Instance UID of the IOCM rejection note.")
    dicom_destinations: list[str] = Field(description="Where the rejection note goes.")
    fhir_destinations: list[str] = Field(description="Where the entered-in-error Bundle goes.")
    fhir_kept: list[str] = Field(description="FHIR destinations a newer result has reached.")
    not_withdrawn: list[str] = Field(
        description="Destinations that got the result but no withdrawal: a stored object "
        "cannot be read (see the node's log and the job's events)."
    )


class AcceptanceOut(BaseModel):
    job_id: int
    released: int = Field(description="Deliveries the quality gate held, sent now.")


class ReviewCountOut(BaseModel):
    model: str
    model_version: str | None
    accepted: int
    rejected: int


def _refused(exc: PacsNodeError) -> HTTPException:
    """Unknown job: 404; anything else the node refuses (not done, rejected already, a stale
    release, a catalog or results error): 409."""
    unknown = isinstance(exc, corrections.UnknownJob)
    return HTTPException(
        status.HTTP_404_NOT_FOUND if unknown else status.HTTP_409_CONFLICT, str(exc)
    )


@router.post("/jobs/{job_id}/reject", response_model=RejectionOut)
def reject_job(
    job_id: RowId, body: RejectRequest, request: Request, principal: Operator
) -> RejectionOut:
    """Reject a job's result (held or sent) and withdraw what went out."""
    context = web_context(request)
    try:
        done = corrections.reject_results(
            context.catalog, context.settings, job_id, principal.actor, body.reason, body.kind
        )
    except PacsNodeError as exc:
        raise _refused(exc) from exc
    return RejectionOut.model_validate(done.as_json())


@router.post("/jobs/{job_id}/accept", response_model=AcceptanceOut)
def accept_job(job_id: RowId, request: Request, principal: Operator) -> AcceptanceOut:
    """Accept a job's result; a result the quality gate holds is sent now."""
    context = web_context(request)
    try:
        done = corrections.accept_results(context.catalog, job_id, principal.actor)
    except PacsNodeError as exc:
        raise _refused(exc) from exc
    return AcceptanceOut.model_validate(done.as_json())


@router.get("/reviews", response_model=list[ReviewCountOut])
def list_reviews(request: Request, _principal: Viewer) -> list[ReviewCountOut]:
    """Accepted and rejected results per model and version (each job's latest review)."""
    counts = corrections.review_counts(web_context(request).catalog)
    return [ReviewCountOut.model_validate(c.as_json()) for c in counts]
