"""What every server-rendered page shares: the templates, the signed-in user and the CSRF token
their forms and scripts send back, the redirect to the login page for a browser without a
session, and to the password page for a user who must change theirs first."""

from __future__ import annotations

from pathlib import Path
from typing import Any
from urllib.parse import quote

from fastapi import HTTPException, Request, status
from fastapi.responses import HTMLResponse
from fastapi.templating import Jinja2Templates

from pacs_node.catalog.models import Role
from pacs_node.services.accounts import Principal
from pacs_node.web.auth import credentials

TEMPLATES = Jinja2Templates(directory=str(Path(__file__).parent / "templates"))
STATIC_DIR = Path(__file__).parent / "static"
LOGIN_PATH = "/login"
PASSWORD_PATH = "/account/password"


class PageRedirect(Exception):
    """A page the browser may not see yet: answered with a redirect (303) to ``location``."""

    def __init__(self, location: str) -> None:
        self.location = location


class LoginRequired(PageRedirect):
    """A page asked for without a session: to the login page, and back here after it."""

    def __init__(self, next_path: str) -> None:
        super().__init__(login_redirect(next_path))
        self.next_path = next_path


class PasswordChangeRequired(PageRedirect):
    """A page asked for by a user who must first change their password."""

    def __init__(self, next_path: str) -> None:
        super().__init__(f"{PASSWORD_PATH}?next={quote(next_path, safe='')}")
        self.next_path = next_path


def here(request: Request) -> str:
    """The path and query of ``request``, to come back to after a detour."""
    return request.url.path + (f"?{request.url.query}" if request.url.query else "")


def page_user(role: Role = Role.VIEWER) -> Any:
    """A dependency for pages: the signed-in principal holding ``role``; a browser without a
    session is sent to the login page, one whose password must change to the password page
    (and back here after either)."""

    def dependency(request: Request) -> Principal:
        principal = credentials(request)
        if principal is None:
            raise LoginRequired(here(request))
        if principal.must_change_password:
            raise PasswordChangeRequired(here(request))
        if not principal.may(role):
            raise HTTPException(status.HTTP_403_FORBIDDEN, f"the {role.value} role is required")
        request.state.principal = principal
        return principal

    return dependency


def login_redirect(next_path: str) -> str:
    return f"{LOGIN_PATH}?next={quote(next_path, safe='')}"


def render(request: Request, template: str, status_code: int = 200, **context: Any) -> HTMLResponse:
    """A page with the principal and the CSRF token its forms must send back."""
    context.setdefault("principal", getattr(request.state, "principal", None))
    context.setdefault("csrf_token", getattr(request.state, "csrf_token", ""))
    principal = context["principal"]
    context.setdefault("may_operate", principal is not None and principal.may(Role.OPERATOR))
    return TEMPLATES.TemplateResponse(request, template, context, status_code=status_code)
