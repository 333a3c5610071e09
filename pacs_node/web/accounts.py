"""Signing in and out, changing one's own password, and ``GET /api/me``.

The session cookie (``pacs_node_session``) is HttpOnly, SameSite=Lax (so a link from the PACS
or the EHR opens the viewer signed in; every change still needs the session's CSRF token),
Secure when the request came over https, on path ``/``, and lives as long as its session
(``session_hours``).

The login form has no session to bind a CSRF token to, so it is defended twice: a
double-submit token (a random value in the ``pacs_node_login`` cookie, SameSite=Strict and
HttpOnly, that the form must send back in its ``csrf_token`` field, which another site can
neither read nor make the browser send), and, where the browser sends an ``Origin``, that origin
must be this host. Every other form is checked against its session's CSRF token
(:mod:`pacs_node.web.csrf`).

A failed login gets one message for an unknown name and a wrong password; a locked name says
until when, and names that are no account lock alike (see
:mod:`pacs_node.services.login_throttle`), so neither answer tells whether a name exists.
"""

from __future__ import annotations

import hmac
import math
import re
import secrets
from typing import Annotated
from urllib.parse import quote, urlsplit

from fastapi import APIRouter, Depends, Form, Query, Request, Response, status
from fastapi.responses import HTMLResponse, RedirectResponse
from pydantic import BaseModel

from pacs_node.catalog.models import Role
from pacs_node.services.accounts import (
    AccountError,
    LoginRefused,
    NewSession,
    Principal,
    audit_sign_in,
    audit_sign_out,
    authenticate_password,
    close_session,
    open_session,
    set_password,
)
from pacs_node.web.auth import (
    CSRF_FIELD,
    SESSION_COOKIE,
    client_address,
    credentials,
    require,
    sign_in_refused,
)
from pacs_node.web.context import web_context
from pacs_node.web.pages import LOGIN_PATH, PASSWORD_PATH, LoginRequired, here, render

LOGIN_COOKIE = "pacs_node_login"
LOGIN_COOKIE_SECONDS = 3600
_TOKEN = re.compile(r"[A-Za-z0-9_-]{43}")

router = APIRouter()

FormText = Annotated[str, Form()]
# Where to go once signed in (or once the password is changed): a local path only.
NextQuery = Annotated[str, Query(alias="next")]
NextField = Annotated[str, Form(alias="next")]


class Me(BaseModel):
    """Who the request's credentials name."""

    name: str
    role: Role
    must_change_password: bool


def local_path(target: str | None) -> str:
    """``target`` when it is a path on this site, else ``/``: never a redirect elsewhere
    (``//host``, ``/\\host``, ``https://host`` and control characters are all refused)."""
    if not target or not target.startswith("/") or target.startswith("//"):
        return "/"
    if "\\" in target or any(ord(c) < 0x20 or ord(c) == 0x7F for c in target):
        return "/"
    parts = urlsplit(target)
    if parts.scheme or parts.netloc or parts.path in (LOGIN_PATH, "/logout"):
        return "/"
    return target


def _secure(request: Request) -> bool:
    return request.url.scheme == "https"


def _set_session_cookie(request: Request, response: Response, session: NewSession) -> None:
    lifetime = web_context(request).session_lifetime
    response.set_cookie(
        SESSION_COOKIE,
        session.cookie,
        max_age=int(lifetime.total_seconds()),
        expires=session.expires_at,
        path="/",
        secure=_secure(request),
        httponly=True,
        samesite="lax",
    )


def _login_token(request: Request) -> str:
    """The browser's login CSRF token when it holds a well-formed one, else a new one."""
    held = request.cookies.get(LOGIN_COOKIE, "")
    return held if _TOKEN.fullmatch(held) else secrets.token_urlsafe(32)


def _login_page(
    request: Request,
    next_path: str,
    message: str = "",
    status_code: int = status.HTTP_200_OK,
    headers: dict[str, str] | None = None,
) -> HTMLResponse:
    token = _login_token(request)
    response = render(
        request,
        "login.html",
        status_code,
        login_token=token,
        next_path=local_path(next_path),
        message=message,
    )
    response.set_cookie(
        LOGIN_COOKIE,
        token,
        max_age=LOGIN_COOKIE_SECONDS,
        path=LOGIN_PATH,
        secure=_secure(request),
        httponly=True,
        samesite="strict",
    )
    for key, value in (headers or {}).items():
        response.headers[key] = value
    return response


def _same_origin(request: Request) -> bool:
    """No ``Origin`` header (older browsers on same-origin posts), or this host's."""
    origin = request.headers.get("origin")
    if origin is None:
        return True
    return urlsplit(origin).netloc.lower() == request.headers.get("host", "").lower()


def _refusal(refused: LoginRefused) -> tuple[str, int, dict[str, str]]:
    """The message, status and headers a refused login is answered with."""
    if refused.retry_after is not None:
        seconds = max(1, math.ceil(refused.retry_after.total_seconds()))
        return (
            f"Too many failed sign-ins from this address. Try again in {seconds} seconds.",
            status.HTTP_429_TOO_MANY_REQUESTS,
            {"Retry-After": str(seconds)},
        )
    if refused.locked_until is not None:
        until = refused.locked_until.strftime("%Y-%m-%d %H:%M:%S UTC")
        return (
            f"Sign-in as this name is locked until {until} after repeated failures.",
            status.HTTP_401_UNAUTHORIZED,
            {},
        )
    return "Wrong name or password.", status.HTTP_401_UNAUTHORIZED, {}


@router.get(LOGIN_PATH, response_class=HTMLResponse, include_in_schema=False)
def login_form(request: Request, next_path: NextQuery = "/") -> HTMLResponse:
    return _login_page(request, next_path)


@router.post(LOGIN_PATH, response_class=HTMLResponse, include_in_schema=False)
def login(
    request: Request,
    name: FormText = "",
    password: FormText = "",
    next_path: NextField = "/",
    csrf_token: Annotated[str, Form(alias=CSRF_FIELD)] = "",
) -> Response:
    held = request.cookies.get(LOGIN_COOKIE, "")
    if (
        not held
        or not hmac.compare_digest(held.encode(), csrf_token.encode())
        or not _same_origin(request)
    ):
        return _login_page(
            request,
            next_path,
            "The sign-in form expired or came from another site. Please sign in again.",
            status.HTTP_403_FORBIDDEN,
        )
    context = web_context(request)
    found = authenticate_password(
        context.catalog,
        name,
        password,
        throttle=context.login_throttle,
        address=client_address(request),
    )
    if isinstance(found, LoginRefused):
        sign_in_refused(request, found.user, "sign-in refused")
        message, code, headers = _refusal(found)
        return _login_page(request, next_path, message, code, headers)
    audit_sign_in(context.catalog, found.name, client_address(request), ok=True)
    earlier = request.cookies.get(SESSION_COOKIE)
    if earlier:  # a browser signing in again leaves no older session behind
        close_session(context.catalog, earlier)
    session = open_session(context.catalog, found, context.session_lifetime)
    target = local_path(next_path)
    if found.must_change_password:
        target = f"{PASSWORD_PATH}?next={quote(target, safe='')}"
    response = RedirectResponse(target, status_code=status.HTTP_303_SEE_OTHER)
    _set_session_cookie(request, response, session)
    response.delete_cookie(LOGIN_COOKIE, path=LOGIN_PATH)
    return response


@router.post("/logout", include_in_schema=False)
def logout(request: Request) -> RedirectResponse:
    """Close this browser's session (the form's CSRF token is checked like any other)."""
    principal = credentials(request)
    cookie = request.cookies.get(SESSION_COOKIE)
    if cookie:
        close_session(web_context(request).catalog, cookie)
        if principal is not None:
            audit_sign_out(web_context(request).catalog, principal.name, client_address(request))
    response = RedirectResponse(LOGIN_PATH, status_code=status.HTTP_303_SEE_OTHER)
    response.delete_cookie(SESSION_COOKIE, path="/")
    return response


def signed_in(request: Request) -> Principal:
    """The session's principal, even one who must change their password (this page is where
    they do)."""
    principal = credentials(request)
    if principal is None:
        raise LoginRequired(here(request))
    request.state.principal = principal
    return principal


SignedIn = Annotated[Principal, Depends(signed_in)]


def _password_page(
    request: Request, principal: Principal, next_path: str, message: str = "", code: int = 200
) -> HTMLResponse:
    return render(
        request,
        "password.html",
        code,
        must_change=principal.must_change_password,
        next_path=local_path(next_path),
        message=message,
    )


@router.get(PASSWORD_PATH, response_class=HTMLResponse, include_in_schema=False)
def password_form(
    request: Request,
    principal: SignedIn,
    next_path: NextQuery = "/",
) -> HTMLResponse:
    return _password_page(request, principal, next_path)


@router.post(PASSWORD_PATH, response_class=HTMLResponse, include_in_schema=False)
def change_password(
    request: Request,
    principal: SignedIn,
    current: FormText = "",
    new: FormText = "",
    confirm: FormText = "",
    next_path: NextField = "/",
) -> Response:
    """Change one's own password: the current one is checked (and counts towards the lock),
    every session of the account is closed, and this browser gets a new one."""
    context = web_context(request)
    if new != confirm:
        return _password_page(request, principal, next_path, "The new passwords differ.", 400)
    if new == current:
        message = "Choose a password other than the current one."
        return _password_page(request, principal, next_path, message, 400)
    found = authenticate_password(
        context.catalog,
        principal.name,
        current,
        throttle=context.login_throttle,
        address=client_address(request),
    )
    if isinstance(found, LoginRefused):
        message, code, _ = _refusal(found)
        if found.retry_after is None and found.locked_until is None:
            message = "The current password is wrong."
        return _password_page(request, principal, next_path, message, code)
    try:
        set_password(context.catalog, principal.name, new, principal.actor)
    except AccountError as exc:
        return _password_page(request, principal, next_path, f"{str(exc).capitalize()}.", 400)
    session = open_session(context.catalog, found, context.session_lifetime)
    response = RedirectResponse(local_path(next_path), status_code=status.HTTP_303_SEE_OTHER)
    _set_session_cookie(request, response, session)
    return response


@router.get("/api/me", response_model=Me, tags=["accounts"])
def me(principal: Annotated[Principal, Depends(require(Role.VIEWER))]) -> Me:
    """The account the request's credentials name, and its role."""
    return Me(
        name=principal.name,
        role=principal.role,
        must_change_password=principal.must_change_password,
    )
