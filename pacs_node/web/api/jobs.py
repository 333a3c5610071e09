"""``/api/jobs``: list jobs by state, one job, cancel and retry."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Query, status

from pacs_node.catalog.models import JobState
from pacs_node.services import jobs, search
from pacs_node.web.api.deps import (
    DEFAULT_LIMIT,
    READ,
    Context,
    Limit,
    Offset,
    Operator,
    RowId,
    conflict,
    errors,
    not_found,
)
from pacs_node.web.api.schemas import UID_PATTERN, JobOut, Page

router = APIRouter(prefix="/jobs", tags=["jobs"])


@router.get("", dependencies=READ, responses=errors(status.HTTP_422_UNPROCESSABLE_CONTENT))
def list_jobs(
    context: Context,
    state: Annotated[list[JobState] | None, Query(description="any of these states")] = None,
    study_uid: Annotated[str | None, Query(max_length=64, pattern=UID_PATTERN)] = None,
    model: Annotated[str | None, Query(max_length=64)] = None,
    limit: Limit = DEFAULT_LIMIT,
    offset: Offset = 0,
) -> Page[JobOut]:
    """Jobs, the newest first."""
    found = search.search_jobs(
        context.catalog, limit, offset, states=state or (), study_uid=study_uid, model=model
    )
    return Page[JobOut](
        items=[JobOut.model_validate(j.as_json()) for j in found.items],
        total=found.total,
        limit=found.limit,
        offset=found.offset,
    )


def _job(context: Context, job_id: int) -> JobOut:
    found = search.find_job(context.catalog, job_id)
    if found is None:
        raise not_found(f"job {job_id}")
    return JobOut.model_validate(found.as_json())


@router.get(
    "/{job_id}",
    dependencies=READ,
    responses=errors(status.HTTP_404_NOT_FOUND, status.HTTP_422_UNPROCESSABLE_CONTENT),
)
def get_job(context: Context, job_id: RowId) -> JobOut:
    return _job(context, job_id)


@router.post(
    "/{job_id}/cancel",
    responses=errors(
        status.HTTP_404_NOT_FOUND, status.HTTP_409_CONFLICT, status.HTTP_422_UNPROCESSABLE_CONTENT
    ),
)
def cancel_job(context: Context, job_id: RowId, principal: Operator) -> JobOut:
    """queued | running -> cancelled (a running worker stops at its next stage)."""
    before = _job(context, job_id)
    if not jobs.cancel_job(context.catalog, job_id, principal.actor):
        raise conflict(f"job {job_id} is {before.state}: only a queued or running job is cancelled")
    return _job(context, job_id)


@router.post(
    "/{job_id}/retry",
    responses=errors(
        status.HTTP_404_NOT_FOUND, status.HTTP_409_CONFLICT, status.HTTP_422_UNPROCESSABLE_CONTENT
    ),
)
def retry_job(context: Context, job_id: RowId, principal: Operator) -> JobOut:
    """failed | cancelled -> queued, its attempts counted afresh."""
    before = _job(context, job_id)
    if not jobs.retry_job(context.catalog, job_id, principal.actor):
        raise conflict(f"job {job_id} is {before.state}: only a failed or cancelled job is retried")
    return _job(context, job_id)
