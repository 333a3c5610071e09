"""``/api/studies``: search and page the studies, one study in full, how it was routed, and
queueing it again."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, HTTPException, Query, status

from pacs_node.catalog.models import StudyState
from pacs_node.errors import BundleError, ModelError, NotFound, RequestError
from pacs_node.services import jobs, routes, search, studies
from pacs_node.web.api.deps import (
    DEFAULT_LIMIT,
    READ,
    Context,
    Limit,
    Offset,
    Operator,
    StudyUid,
    conflict,
    errors,
    not_found,
)
from pacs_node.web.api.schemas import (
    ExplainOut,
    JobOut,
    Page,
    RerunIn,
    RerunOut,
    StudyDetailOut,
    StudyOut,
)

router = APIRouter(prefix="/studies", tags=["studies"])

DICOM_DATE = r"^[0-9]{8}$"
Text = Annotated[str | None, Query(min_length=1, max_length=64)]


@router.get("", dependencies=READ, responses=errors(status.HTTP_422_UNPROCESSABLE_CONTENT))
def list_studies(
    context: Context,
    patient_id: Annotated[str | None, Query(max_length=64, description="exact, any case")] = None,
    patient_name: Annotated[
        str | None, Query(max_length=64, description="part of the name, any case")
    ] = None,
    accession_number: Annotated[
        str | None, Query(max_length=64, description="exact, any case")
    ] = None,
    study_date_from: Annotated[
        str | None, Query(pattern=DICOM_DATE, description="YYYYMMDD, inclusive")
    ] = None,
    study_date_to: Annotated[
        str | None, Query(pattern=DICOM_DATE, description="YYYYMMDD, inclusive")
    ] = None,
    modality: Annotated[
        str | None, Query(max_length=16, description="a series of this modality")
    ] = None,
    state: Annotated[list[StudyState] | None, Query(description="any of these states")] = None,
    limit: Limit = DEFAULT_LIMIT,
    offset: Offset = 0,
) -> Page[StudyOut]:
    """Studies matching every filter given, the most recently received first."""
    query = search.StudyQuery(
        patient_id=patient_id,
        patient_name=patient_name,
        accession_number=accession_number,
        study_date_from=study_date_from,
        study_date_to=study_date_to,
        modality=modality,
        states=state or (),
    )
    found = search.search_studies(context.catalog, query, limit, offset)
    return Page[StudyOut](
        items=[StudyOut.model_validate(s.as_json()) for s in found.items],
        total=found.total,
        limit=found.limit,
        offset=found.offset,
    )


@router.get(
    "/{study_uid}",
    dependencies=READ,
    responses=errors(status.HTTP_404_NOT_FOUND, status.HTTP_422_UNPROCESSABLE_CONTENT),
)
def get_study(context: Context, study_uid: StudyUid) -> StudyDetailOut:
    """One study with its series, jobs, results, deliveries and timeline."""
    detail = studies.study_detail(context.catalog, study_uid)
    if detail is None:
        raise not_found(f"study {study_uid}")
    return StudyDetailOut.model_validate(detail.as_json())


@router.get(
    "/{study_uid}/explain",
    dependencies=READ,
    responses=errors(status.HTTP_404_NOT_FOUND, status.HTTP_422_UNPROCESSABLE_CONTENT),
)
def explain_study(context: Context, study_uid: StudyUid) -> ExplainOut:
    """Each rule's verdict on the study's series and why, the routing outcome and its jobs."""
    try:
        report = routes.explain_study(context.catalog, context.settings, study_uid)
    except NotFound as exc:
        raise not_found(f"study {study_uid}") from exc
    return ExplainOut.model_validate(report.as_json())


@router.post(
    "/{study_uid}/rerun",
    status_code=status.HTTP_202_ACCEPTED,
    responses=errors(
        status.HTTP_404_NOT_FOUND, status.HTTP_409_CONFLICT, status.HTTP_422_UNPROCESSABLE_CONTENT
    ),
)
def rerun_study(
    context: Context, study_uid: StudyUid, principal: Operator, body: RerunIn | None = None
) -> RerunOut:
    """Queue the study for processing again, as ``pacs-node run`` does: the jobs queued."""
    asked = body or RerunIn()
    try:
        job_ids = jobs.queue_processing(
            context.catalog,
            context.settings,
            study_uid,
            principal.actor,
            model=asked.model,
            series=asked.series,
        )
    except NotFound as exc:
        raise not_found(f"study {study_uid}") from exc
    except BundleError as exc:  # installed, but the allowlist or its files refuse it
        raise conflict(str(exc)) from exc
    except (ModelError, RequestError) as exc:  # no such model; a series not the study's; no fit
        raise HTTPException(status.HTTP_422_UNPROCESSABLE_CONTENT, str(exc)) from exc
    queued = jobs.list_jobs(context.catalog, job_ids)
    return RerunOut(jobs=[JobOut.model_validate(j.as_json()) for j in queued])
