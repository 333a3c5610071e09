"""The review page: what waits for a person's decision before it goes on — instances kept in
quarantine (release into a study of their own, or discard) and results a quality gate held
(release to their destinations, or reject)."""

from __future__ import annotations

from collections import defaultdict
from typing import Annotated

from fastapi import APIRouter, Depends, Form, HTTPException, Request, status
from fastapi.responses import HTMLResponse, RedirectResponse

from pacs_node.catalog.deliveries import HELD_FOR_QUALITY, DeliverySummary
from pacs_node.catalog.models import DeliveryState, QuarantineState, Role
from pacs_node.errors import PacsNodeError
from pacs_node.services import corrections, deliveries, quarantine
from pacs_node.services.accounts import Principal
from pacs_node.web.context import web_context
from pacs_node.web.pages import page_user, render

router = APIRouter(include_in_schema=False)

Viewer = Annotated[Principal, Depends(page_user(Role.VIEWER))]
Operator = Annotated[Principal, Depends(page_user(Role.OPERATOR))]


def _held_results(request: Request) -> dict[int, list[DeliverySummary]]:
    held = deliveries.list_deliveries(web_context(request).catalog, [DeliveryState.HELD.value])
    by_job: dict[int, list[DeliverySummary]] = defaultdict(list)
    for delivery in held:
        if delivery.held_for == HELD_FOR_QUALITY:
            by_job[delivery.job_id].append(delivery)
    return dict(by_job)


@router.get("/review", response_class=HTMLResponse)
def review_page(request: Request, principal: Viewer) -> HTMLResponse:
    context = web_context(request)
    items = [
        item
        for item in quarantine.list_quarantined(context.catalog)
        if item["state"] == QuarantineState.HELD.value
    ]
    return render(
        request,
        "review.html",
        quarantined=items,
        held=_held_results(request),
        may_decide=principal.may(Role.OPERATOR),
        message=request.query_params.get("done", ""),
    )


def _back(message: str) -> RedirectResponse:
    return RedirectResponse(f"/review?done={message}", status_code=status.HTTP_303_SEE_OTHER)


def _refused(exc: Exception) -> HTTPException:
    return HTTPException(status.HTTP_409_CONFLICT, str(exc))


@router.post("/review/quarantine/{item_id}/release")
def release_instance(request: Request, item_id: int, principal: Operator) -> RedirectResponse:
    context = web_context(request)
    try:
        quarantine.release(context.catalog, context.settings, item_id, principal.actor)
    except PacsNodeError as exc:
        raise _refused(exc) from exc
    return _back("released")


@router.post("/review/quarantine/{item_id}/discard")
def discard_instance(request: Request, item_id: int, principal: Operator) -> RedirectResponse:
    context = web_context(request)
    try:
        quarantine.discard(context.catalog, context.settings, item_id, principal.actor)
    except PacsNodeError as exc:
        raise _refused(exc) from exc
    return _back("discarded")


@router.post("/review/jobs/{job_id}/release")
def release_held(request: Request, job_id: int, principal: Operator) -> RedirectResponse:
    """An operator judged the held result right: accepted, and sent now."""
    if job_id not in _held_results(request):
        raise HTTPException(status.HTTP_409_CONFLICT, f"job {job_id} has no held result")
    try:
        corrections.accept_results(web_context(request).catalog, job_id, principal.actor)
    except PacsNodeError as exc:
        raise _refused(exc) from exc
    return _back("released")


@router.post("/review/jobs/{job_id}/reject")
def reject_held(
    request: Request,
    job_id: int,
    principal: Operator,
    reason: Annotated[str, Form(max_length=200)] = "",
) -> RedirectResponse:
    """The same rejection as anywhere else (services.corrections); nothing of it went out."""
    if job_id not in _held_results(request):
        raise HTTPException(status.HTTP_409_CONFLICT, f"job {job_id} has no held result")
    context = web_context(request)
    try:
        corrections.reject_results(
            context.catalog, context.settings, job_id, principal.actor, reason or "held result"
        )
    except PacsNodeError as exc:
        raise _refused(exc) from exc
    return _back("rejected")
