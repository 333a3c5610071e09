"""``/api/audit``: the audit trail, for admins only; reading it is audited (110101)."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Depends, HTTPException, Query, Request, status

from pacs_node.catalog.models import Role
from pacs_node.services.accounts import Principal
from pacs_node.services.audit import parse_since, read_audit_log
from pacs_node.web.api.deps import MAX_LIMIT, Context, errors
from pacs_node.web.api.schemas import AuditEventOut
from pacs_node.web.auth import client_address, require

router = APIRouter(prefix="/audit", tags=["audit"])
Admin = Annotated[Principal, Depends(require(Role.ADMIN))]


@router.get("", responses=errors(status.HTTP_422_UNPROCESSABLE_CONTENT))
def list_audit_events(
    request: Request,
    context: Context,
    principal: Admin,
    since: Annotated[
        str | None,
        Query(max_length=64, description="ISO 8601 time, or a span back from now: 15m, 2h, 7d"),
    ] = None,
    limit: Annotated[int, Query(ge=1, le=10 * MAX_LIMIT)] = 10 * MAX_LIMIT,
) -> list[AuditEventOut]:
    """The audit events from ``since`` on, oldest first (as ``pacs-node audit --json``)."""
    try:
        start = parse_since(since) if since else None
    except ValueError as exc:
        raise HTTPException(status.HTTP_422_UNPROCESSABLE_CONTENT, str(exc)) from exc
    rows = read_audit_log(
        context.catalog, principal.actor, start, address=client_address(request), limit=limit
    )
    return [AuditEventOut.model_validate(row.as_json()) for row in rows]
