"""What the API's routes share: the node's parts, the caller's role, path and paging parameters
with their bounds, and the error answers in the OpenAPI document."""

from __future__ import annotations

from typing import Annotated, Any

from fastapi import Depends, HTTPException, Path, Query, status

from pacs_node.catalog.models import Role
from pacs_node.services.accounts import Principal
from pacs_node.web.api.schemas import UID_PATTERN, Problem
from pacs_node.web.auth import require
from pacs_node.web.context import WebContext, web_context

MAX_ID = 2**63 - 1  # a catalog row id is a signed 64-bit integer
MAX_OFFSET = 10**9
MAX_LIMIT = 500
DEFAULT_LIMIT = 50

Context = Annotated[WebContext, Depends(web_context)]
# Changes name the principal (its actor goes to the service); reads only need the role.
Operator = Annotated[Principal, Depends(require(Role.OPERATOR))]
READ = [Depends(require(Role.VIEWER))]

RowId = Annotated[int, Path(ge=1, le=MAX_ID)]
StudyUid = Annotated[
    str, Path(min_length=1, max_length=64, pattern=UID_PATTERN, description="Study Instance UID")
]
Limit = Annotated[int, Query(ge=1, le=MAX_LIMIT, description="page size")]
Offset = Annotated[int, Query(ge=0, le=MAX_OFFSET, description="items skipped")]

_CODES = {
    status.HTTP_401_UNAUTHORIZED: "no or invalid credentials",
    status.HTTP_403_FORBIDDEN: "the caller's role may not do this",
    status.HTTP_404_NOT_FOUND: "no such study, job or delivery",
    status.HTTP_409_CONFLICT: "not in a state that allows it",
    status.HTTP_422_UNPROCESSABLE_CONTENT: "the request is not valid",
    status.HTTP_503_SERVICE_UNAVAILABLE: "the catalog or the audit trail is not available",
}


def errors(*codes: int) -> dict[int | str, dict[str, Any]]:
    """The OpenAPI ``responses`` of the error answers a route may give (401 and 403 always)."""
    wanted = (status.HTTP_401_UNAUTHORIZED, status.HTTP_403_FORBIDDEN, *codes)
    return {code: {"model": Problem, "description": _CODES[code]} for code in wanted}


def not_found(what: str) -> HTTPException:
    return HTTPException(status.HTTP_404_NOT_FOUND, f"no {what}")


def conflict(detail: str) -> HTTPException:
    return HTTPException(status.HTTP_409_CONFLICT, detail)
