"""The result viewer: a job's source slices with its segmentation over them, the measurements
of its SR, its PDF, and a link to the study in the hospital's own PACS viewer.

The page (``static/viewer.js``) draws two server-rendered PNGs per slice on a canvas: the
source slice windowed here (``slices/{index}.png?wc=&ww=``) and the segments the reader left
on, in their SEG colours (``labels/{index}.png?segments=1,2``), at the chosen opacity.
"""

from __future__ import annotations

import threading
from typing import Annotated
from urllib.parse import quote

from fastapi import APIRouter, Depends, Form, HTTPException, Query, Request, status
from fastapi.responses import HTMLResponse, RedirectResponse, Response

from pacs_node.catalog.models import Role
from pacs_node.errors import PacsNodeError
from pacs_node.outputs import OutputKind
from pacs_node.review import RejectionKind
from pacs_node.services import corrections
from pacs_node.services.accounts import Principal
from pacs_node.services.viewer import (
    JobFiles,
    NoSuchResult,
    StackCache,
    ViewerStack,
    findings,
    job_files,
    report_pdf,
)
from pacs_node.web.context import web_context
from pacs_node.web.pages import page_user, render

router = APIRouter(include_in_schema=False)
BASE = "/studies/{study_uid}/jobs/{job_id}/viewer"
CACHE_SIZE = 4  # series held decoded at once, per app
PNG = "image/png"
_PRIVATE = {"Cache-Control": "private, max-age=300"}  # patient images: never a shared cache

Viewer = Annotated[Principal, Depends(page_user(Role.VIEWER))]
Operator = Annotated[Principal, Depends(page_user(Role.OPERATOR))]
# Which of the job's series (a rule may select several); default: its first.
SeriesUid = Annotated[str, Query(max_length=64, pattern=r"^[0-9.]*$")]
_cache_lock = threading.Lock()


def _stacks(request: Request) -> StackCache:
    with _cache_lock:
        cache = getattr(request.app.state, "viewer_stacks", None)
        if cache is None:
            cache = StackCache(CACHE_SIZE)
            request.app.state.viewer_stacks = cache
        assert isinstance(cache, StackCache)
        return cache


def _files(request: Request, study_uid: str, job_id: int, series: str) -> JobFiles:
    context = web_context(request)
    try:
        return job_files(context.catalog, context.settings, study_uid, job_id, series)
    except NoSuchResult as exc:
        raise HTTPException(status.HTTP_404_NOT_FOUND, str(exc)) from exc


def _stack(request: Request, files: JobFiles) -> ViewerStack:
    try:
        return _stacks(request).get(files)
    except NoSuchResult as exc:
        raise HTTPException(status.HTTP_404_NOT_FOUND, str(exc)) from exc
    except PacsNodeError as exc:  # the series cannot be read as a volume (any more)
        raise HTTPException(status.HTTP_409_CONFLICT, str(exc)) from exc


def pacs_viewer_link(template: str, study_uid: str) -> str:
    """The configured PACS viewer URL for a study ("" when none is configured)."""
    return template.replace("{study_uid}", quote(study_uid, safe="")) if template else ""


@router.get(BASE, response_class=HTMLResponse)
def viewer_page(
    request: Request, study_uid: str, job_id: int, _user: Viewer, series: SeriesUid = ""
) -> HTMLResponse:
    files = _files(request, study_uid, job_id, series)
    stack = _stack(request, files)
    try:
        measured = findings(files)
    except (PacsNodeError, ValueError, AttributeError) as exc:  # an SR highdicom cannot parse
        raise HTTPException(status.HTTP_409_CONFLICT, f"unreadable SR: {exc}") from exc
    centre, width = stack.default_window()
    return render(
        request,
        "viewer.html",
        files=files,
        stack=stack,
        findings=measured,
        presets=stack.presets(),
        centre=centre,
        width=width,
        base=BASE.format(study_uid=study_uid, job_id=job_id),
        has_pdf=bool(files.of_series(OutputKind.PDF)),
        pacs_link=pacs_viewer_link(web_context(request).settings.node.pacs_viewer_url, study_uid),
        may_review=_user.may(Role.OPERATOR),
        rejection_kinds=list(RejectionKind),
        done=request.query_params.get("done", ""),
    )


def _reviewed(study_uid: str, job_id: int, done: str) -> RedirectResponse:
    target = BASE.format(study_uid=quote(study_uid, safe=""), job_id=job_id) + f"?done={done}"
    return RedirectResponse(target, status_code=status.HTTP_303_SEE_OTHER)


@router.post(BASE + "/reject")
def reject(
    request: Request,
    study_uid: str,
    job_id: int,
    principal: Operator,
    reason: Annotated[str, Form(min_length=1, max_length=1000)],
    kind: Annotated[RejectionKind, Form()] = RejectionKind.QUALITY,
) -> RedirectResponse:
    """Withdraw the job's result: the PACS gets a rejection note, the EHR entered-in-error."""
    context = web_context(request)
    _files(request, study_uid, job_id, "")  # 404 for a job of another study
    try:
        corrections.reject_results(
            context.catalog, context.settings, job_id, principal.actor, reason, kind
        )
    except PacsNodeError as exc:
        raise HTTPException(status.HTTP_409_CONFLICT, str(exc)) from exc
    return _reviewed(study_uid, job_id, "rejected")


@router.post(BASE + "/accept")
def accept(request: Request, study_uid: str, job_id: int, principal: Operator) -> RedirectResponse:
    """Judge the job's result right (a result the quality gate held is sent now)."""
    _files(request, study_uid, job_id, "")
    try:
        corrections.accept_results(web_context(request).catalog, job_id, principal.actor)
    except PacsNodeError as exc:
        raise HTTPException(status.HTTP_409_CONFLICT, str(exc)) from exc
    return _reviewed(study_uid, job_id, "accepted")


@router.get(BASE + "/slices/{index}.png")
def slice_image(
    request: Request,
    study_uid: str,
    job_id: int,
    index: int,
    _user: Viewer,
    series: SeriesUid = "",
    wc: Annotated[float | None, Query(ge=-1e6, le=1e6)] = None,
    ww: Annotated[float | None, Query(gt=0, le=1e6)] = None,
) -> Response:
    """One source slice, windowed (``wc``/``ww``, default: the modality's) to 8-bit grey."""
    stack = _stack(request, _files(request, study_uid, job_id, series))
    centre, width = stack.default_window()
    try:
        data = stack.slice_png(index, centre if wc is None else wc, width if ww is None else ww)
    except NoSuchResult as exc:
        raise HTTPException(status.HTTP_404_NOT_FOUND, str(exc)) from exc
    return Response(data, media_type=PNG, headers=_PRIVATE)


@router.get(BASE + "/labels/{index}.png")
def label_image(
    request: Request,
    study_uid: str,
    job_id: int,
    index: int,
    _user: Viewer,
    series: SeriesUid = "",
    segments: Annotated[str | None, Query(max_length=2000, pattern=r"^[0-9,]*$")] = None,
) -> Response:
    """One slice of the segmentation: the segments named (all when none is) in their colours."""
    stack = _stack(request, _files(request, study_uid, job_id, series))
    shown = None if segments is None else [int(s) for s in segments.split(",") if s]
    try:
        data = stack.labels_png(index, shown)
    except NoSuchResult as exc:
        raise HTTPException(status.HTTP_404_NOT_FOUND, str(exc)) from exc
    return Response(data, media_type=PNG, headers=_PRIVATE)


@router.get(BASE + "/report.pdf")
def pdf(
    request: Request, study_uid: str, job_id: int, _user: Viewer, series: SeriesUid = ""
) -> Response:
    """The job's PDF summary (of the series), as stored."""
    files = _files(request, study_uid, job_id, series)
    try:
        data = report_pdf(files)
    except NoSuchResult as exc:
        raise HTTPException(status.HTTP_404_NOT_FOUND, str(exc)) from exc
    headers = {**_PRIVATE, "Content-Disposition": f'inline; filename="job-{job_id}.pdf"'}
    return Response(data, media_type="application/pdf", headers=headers)
