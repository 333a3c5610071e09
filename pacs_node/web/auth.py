"""Who a request is from: a bearer token (API and DICOMweb), HTTP Basic (DICOMweb only, for
PACS clients that speak nothing else) or a browser session (pages, and the API calls the pages
make, with their CSRF token on every change: the ``X-CSRF-Token`` header from scripts, the
``csrf_token`` field from HTML forms, moved into that header by :mod:`pacs_node.web.csrf`).

Routes declare what they need with :func:`require`; a request without credentials gets 401 (with
the challenges it may answer), one whose account lacks the role gets 403, and so does a browser
session whose password must be changed first. HTTP Basic goes through the same account lock and
per-address slowing as the login page (429 with ``Retry-After`` while an address must wait).
"""

from __future__ import annotations

import base64
import binascii
import hmac
import math
from collections.abc import Callable

from fastapi import Depends, HTTPException, Request, status

from pacs_node.catalog.models import Role
from pacs_node.services.accounts import (
    LoginRefused,
    Principal,
    audit_sign_in,
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


def client_address(request: Request) -> str:
    """The peer's address, as the login throttle counts it."""
    return request.client.host if request.client is not None else "unknown"


def too_many_failures(refused: LoginRefused) -> HTTPException | None:
    """429 with ``Retry-After`` for an address that must wait; None otherwise."""
    if refused.retry_after is None:
        return None
    seconds = max(1, math.ceil(refused.retry_after.total_seconds()))
    return HTTPException(
        status.HTTP_429_TOO_MANY_REQUESTS,
        "too many failed sign-ins from this address",
        headers={"Retry-After": str(seconds)},
    )


def sign_in_refused(request: Request, user: str | None, reason: str) -> None:
    """Audit a refused sign-in without holding up the answer: queued and folded per (address,
    reason) by the node's audit trail, so a flood of bad tokens or passwords costs a row a
    minute. ``user``: the account named, None when the name is none (never kept)."""
    context = web_context(request)
    if context.audit is not None:
        context.audit.sign_in_refused(user, client_address(request), reason)
    else:  # an app outside a node (no trail to queue on)
        audit_sign_in(
            context.catalog,
            user or "unknown user",
            client_address(request),
            ok=False,
            reason=reason,
        )


def _basic(request: Request, value: str) -> Principal | None:
    try:
        decoded = base64.b64decode(value, validate=True).decode("utf-8")
    except (binascii.Error, UnicodeDecodeError):
        return None
    name, sep, password = decoded.partition(":")
    if not sep:
        return None
    context = web_context(request)
    found = authenticate_password(
        context.catalog,
        name,
        password,
        throttle=context.login_throttle,
        address=client_address(request),
        verified=context.verified_passwords,
    )
    if isinstance(found, LoginRefused):
        sign_in_refused(request, found.user, "HTTP Basic refused")
        slow = too_many_failures(found)
        if slow is not None:
            raise slow
        return None
    return found


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
            if found is None:
                sign_in_refused(request, None, "API token refused")
        elif scheme.lower() == "basic" and request.url.path.startswith(DICOMWEB_PREFIX):
            found = _basic(request, value.strip())
            # A password to change at first login (the first admin's) signs in nowhere else
            # until it is changed.
            request.state.via_password = True
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
    request.state.via_session = True
    return principal


def require(role: Role) -> Callable[[Request], Principal]:
    """A dependency: the request's principal, who must hold ``role`` (or one above it)."""

    def dependency(request: Request) -> Principal:
        principal = credentials(request)
        if principal is None:
            raise _unauthorized(request, "authentication required")
        by_password = getattr(request.state, "via_session", False) or getattr(
            request.state, "via_password", False
        )
        if principal.must_change_password and by_password:
            raise HTTPException(status.HTTP_403_FORBIDDEN, "change your password first")
        if not principal.may(role):
            raise HTTPException(status.HTTP_403_FORBIDDEN, f"the {role.value} role is required")
        request.state.principal = principal
        return principal

    return dependency


viewer = Depends(require(Role.VIEWER))
operator = Depends(require(Role.OPERATOR))
admin = Depends(require(Role.ADMIN))
