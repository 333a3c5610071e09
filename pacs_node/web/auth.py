"""Who a request is from: a bearer token (API and DICOMweb), HTTP Basic (DICOMweb only, for
PACS clients that speak nothing else) or a browser session (pages, and the API calls the pages
make, with their CSRF token on every change).

Routes declare what they need with :func:`require`; a request without credentials gets 401 (with
the challenges it may answer), one whose account lacks the role gets 403.
"""

from __future__ import annotations

import base64
import binascii
import hmac
from collections.abc import Callable

from fastapi import Depends, HTTPException, Request, status

from pacs_node.catalog.models import Role
from pacs_node.services.accounts import (
    LoginRefused,
    Principal,
    authenticate_password,
    authenticate_token,
    session_principal,
)
from pacs_node.web.context import web_context

SESSION_COOKIE = "pacs_node_session"
CSRF_HEADER = "x-csrf-token"
CSRF_FIELD = "csrf_token"
SAFE_METHODS = frozenset({"GET", "HEAD", "OPTIONS"})
DICOMWEB_PREFIX = "/dicomweb"
REALM = "pacs-node"


def _challenges(request: Request) -> str:
    if request.url.path.startswith(DICOMWEB_PREFIX):
        return f'Bearer realm="{REALM}", Basic realm="{REALM}", charset="UTF-8"'
    return f'Bearer realm="{REALM}"'


def _unauthorized(request: Request, detail: str) -> HTTPException:
    return HTTPException(
        status.HTTP_401_UNAUTHORIZED, detail, headers={"WWW-Authenticate": _challenges(request)}
    )


def _basic(request: Request, value: str) -> Principal | None:
    try:
        decoded = base64.b64decode(value, validate=True).decode("utf-8")
    except (binascii.Error, UnicodeDecodeError):
        return None
    name, sep, password = decoded.partition(":")
    if not sep:
        return None
    found = authenticate_password(web_context(request).catalog, name, password)
    return None if isinstance(found, LoginRefused) else found


def credentials(request: Request) -> Principal | None:
    """The principal a request's credentials name, None when it carries none; 401 when it
    carries bad ones, 403 when a session's change lacks its CSRF token."""
    context = web_context(request)
    header = request.headers.get("authorization")
    if header:
        scheme, _, value = header.strip().partition(" ")
        found: Principal | None = None
        if scheme.lower() == "bearer":
            found = authenticate_token(context.catalog, value.strip())
        elif scheme.lower() == "basic" and request.url.path.startswith(DICOMWEB_PREFIX):
            found = _basic(request, value.strip())
        if found is None:
            raise _unauthorized(request, "invalid credentials")
        return found
    cookie = request.cookies.get(SESSION_COOKIE)
    if not cookie:
        return None
    live = session_principal(context.catalog, cookie)
    if live is None:
        return None
    principal, csrf = live
    if request.method not in SAFE_METHODS:
        sent = request.headers.get(CSRF_HEADER, "")
        if not hmac.compare_digest(sent.encode(), csrf.encode()):
            raise HTTPException(status.HTTP_403_FORBIDDEN, "missing or wrong CSRF token")
    request.state.csrf_token = csrf
    return principal


def require(role: Role) -> Callable[[Request], Principal]:
    """A dependency: the request's principal, who must hold ``role`` (or one above it)."""

    def dependency(request: Request) -> Principal:
        principal = credentials(request)
        if principal is None:
            raise _unauthorized(request, "authentication required")
        if not principal.may(role):
            raise HTTPException(status.HTTP_403_FORBIDDEN, f"the {role.value} role is required")
        request.state.principal = principal
        return principal

    return dependency


viewer = Depends(require(Role.VIEWER))
operator = Depends(require(Role.OPERATOR))
admin = Depends(require(Role.ADMIN))
