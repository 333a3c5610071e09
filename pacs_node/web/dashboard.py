"""The dashboard pages: studies (searchable, paged, refreshing themselves), one study's
timeline, jobs, deliveries (with retry), models, routes (explain), peers and node health.

Server-rendered from the service layer; a page whose content changes while it is open names a
fragment route of its own (``.../rows``) that ``static/dashboard.js`` polls for the table body.
"""

from __future__ import annotations

from typing import Annotated, Any
from urllib.parse import urlencode

from fastapi import APIRouter, Depends, HTTPException, Query, Request, status
from fastapi.responses import HTMLResponse, RedirectResponse
from markdown_it import MarkdownIt

from pacs_node.catalog.models import DeliveryState, Role
from pacs_node.catalog.reviews import ReviewCount
from pacs_node.errors import RequestError
from pacs_node.services.accounts import Principal
from pacs_node.services.corrections import review_counts
from pacs_node.services.dashboard import (
    PAGE_SIZE,
    model_cards,
    newest_deliveries,
    newest_jobs,
    node_overview,
    stage_seconds,
    study_page,
)
from pacs_node.services.deliveries import retry_delivery
from pacs_node.services.routes import explain_study
from pacs_node.services.studies import study_detail
from pacs_node.web.context import web_context
from pacs_node.web.pages import page_user, render

router = APIRouter(include_in_schema=False)

Viewer = Annotated[Principal, Depends(page_user(Role.VIEWER))]
Operator = Annotated[Principal, Depends(page_user(Role.OPERATOR))]
Text = Annotated[str, Query(max_length=128)]
Page = Annotated[int, Query(ge=1, le=100_000)]

# Model cards are the bundles' own markdown: rendered without raw HTML, links kept.
_MARKDOWN = MarkdownIt("commonmark", {"html": False})


def _studies(request: Request, q: str, date: str, page: int) -> dict[str, Any]:
    found = study_page(
        web_context(request).catalog, text=q, date=date, offset=(page - 1) * PAGE_SIZE
    )
    query = {k: v for k, v in (("q", q), ("date", date)) if v}
    return {
        "page": found,
        "number": page,
        "q": q,
        "date": date,
        "query": urlencode({**query, "page": page}),
        "previous": urlencode({**query, "page": page - 1}),
        "next": urlencode({**query, "page": page + 1}),
    }


@router.get("/", response_class=HTMLResponse)
def studies(
    request: Request, _user: Viewer, q: Text = "", date: Text = "", page: Page = 1
) -> HTMLResponse:
    return render(request, "studies.html", **_studies(request, q, date, page))


@router.get("/studies/rows", response_class=HTMLResponse)
def study_rows(
    request: Request, _user: Viewer, q: Text = "", date: Text = "", page: Page = 1
) -> HTMLResponse:
    """The studies table's body alone: what the page polls for live progress."""
    return render(request, "_study_rows.html", **_studies(request, q, date, page))


@router.get("/studies/{study_uid}", response_class=HTMLResponse)
def study(request: Request, study_uid: str, _user: Viewer) -> HTMLResponse:
    detail = study_detail(web_context(request).catalog, study_uid)
    if detail is None:
        raise HTTPException(status.HTTP_404_NOT_FOUND, f"no study {study_uid}")
    viewable = {r.job_id for r in detail.results}  # stored results: the viewer shows them
    stages = {job.id: stage_seconds(job.timings) for job in detail.jobs}
    return render(request, "study.html", detail=detail, viewable=viewable, stages=stages)


@router.get("/jobs", response_class=HTMLResponse)
def jobs(request: Request, _user: Viewer) -> HTMLResponse:
    return render(request, "jobs.html", jobs=newest_jobs(web_context(request).catalog))


@router.get("/jobs/rows", response_class=HTMLResponse)
def job_rows(request: Request, _user: Viewer) -> HTMLResponse:
    return render(request, "_job_rows.html", jobs=newest_jobs(web_context(request).catalog))


@router.get("/deliveries", response_class=HTMLResponse)
def deliveries(
    request: Request,
    _user: Viewer,
    state: Annotated[DeliveryState | None, Query()] = None,
    retried: int | None = None,
    refused: int | None = None,
) -> HTMLResponse:
    states = [state.value] if state is not None else None
    return render(
        request,
        "deliveries.html",
        deliveries=newest_deliveries(web_context(request).catalog, states),
        states=[s.value for s in DeliveryState],
        state=state.value if state is not None else "",
        operator_role=Role.OPERATOR,
        retried=retried,
        refused=refused,
    )


@router.post("/deliveries/{delivery_id}/retry")
def retry(request: Request, delivery_id: int, principal: Operator) -> RedirectResponse:
    """Send a held or dead delivery again (an operator's form); back to the list."""
    done = retry_delivery(web_context(request).catalog, delivery_id, principal.actor)
    outcome = "retried" if done else "refused"
    return RedirectResponse(f"/deliveries?{outcome}={delivery_id}", status.HTTP_303_SEE_OTHER)


@router.get("/models", response_class=HTMLResponse)
def models(request: Request, _user: Viewer) -> HTMLResponse:
    context = web_context(request)
    cards = model_cards(context.settings)
    rendered = {card.entry.bundle.name: _MARKDOWN.render(card.card) for card in cards}
    reviews: dict[str, list[ReviewCount]] = {}
    for count in review_counts(context.catalog):
        reviews.setdefault(count.model, []).append(count)
    return render(request, "models.html", cards=cards, rendered=rendered, reviews=reviews)


@router.get("/routes", response_class=HTMLResponse)
def routes(request: Request, _user: Viewer, study_uid: Text = "") -> HTMLResponse:
    context = web_context(request)
    report, error = None, None
    if study_uid.strip():
        try:
            report = explain_study(context.catalog, context.settings, study_uid.strip())
        except RequestError as exc:
            error = str(exc)
    return render(
        request,
        "routes.html",
        rules=context.settings.routes.rules,
        study_uid=study_uid,
        report=report,
        error=error,
    )


@router.get("/health", response_class=HTMLResponse)
def health(request: Request, _user: Viewer) -> HTMLResponse:
    context = web_context(request)
    return render(request, "health.html", overview=node_overview(context.catalog, context.settings))
