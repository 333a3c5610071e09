"""``/api/audit``: the audit trail, for admins only; reading it is audited (110101)."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Depends, HTTPException, Query, Request, status

from pacs_node.catalog.models import Role
from pacs_node.services.accounts import Principal
from pacs_node.services.audit import AuditUnavailable, parse_since, read_audit_log
from pacs_node.web.api.deps import MAX_LIMIT, Context, errors
from pacs_node.web.api.schemas import AuditEventOut, AuditPageOut
from pacs_node.web.auth import client_address, require

router = APIRouter(prefix="/audit", tags=["audit"])
Admin = Annotated[Principal, Depends(require(Role.ADMIN))]


@router.get(
    "",
    responses=errors(status.HTTP_422_UNPROCESSABLE_CONTENT, status.HTTP_503_SERVICE_UNAVAILABLE),
)
def list_audit_events(
    request: Request,
    context: Context,
    principal: Admin,
    since: Annotated[
        str | None,
        Query(max_length=64, description="ISO 8601 time, or a span back from now: 15m, 2h, 7d"),
    ] = None,
    limit: Annotated[int, Query(ge=1, le=10 * MAX_LIMIT)] = 2 * MAX_LIMIT,
    after_id: Annotated[
        int | None, Query(ge=0, description="the events after this id, oldest first")
    ] = None,
) -> AuditPageOut:
    """The newest ``limit`` audit events from ``since`` on (or the first ``limit`` after
    ``after_id``), oldest first; ``truncated`` says when more matched. 503 when the read
    cannot itself be audited."""
    try:
        start = parse_since(since) if since else None
    except ValueError as exc:
        raise HTTPException(status.HTTP_422_UNPROCESSABLE_CONTENT, str(exc)) from exc
    try:
        page = read_audit_log(
            context.catalog,
            principal.actor,
            start,
            address=client_address(request),
            limit=limit,
            after_id=after_id,
        )
    except AuditUnavailable as exc:
        raise HTTPException(status.HTTP_503_SERVICE_UNAVAILABLE, str(exc)) from exc
    return AuditPageOut(
        events=[AuditEventOut.model_validate(row.as_json()) for row in page.rows],
        truncated=page.truncated,
    )
