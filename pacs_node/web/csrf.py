"""CSRF tokens from HTML forms: the ``csrf_token`` field of a form a browser session posts is
moved into the ``X-CSRF-Token`` header, so the one check in
:func:`pacs_node.web.auth.credentials` serves forms and scripts alike.

Only what the check would refuse anyway is touched: an unsafe request with the session cookie,
no CSRF header and a URL-encoded body of at most :data:`MAX_FORM_BYTES`. The body is read,
the field looked up and the same bytes handed on to the route. Any other request (a multipart
upload, a larger form) goes on untouched and, without the header, is refused (403).
"""

from __future__ import annotations

from urllib.parse import parse_qsl

from starlette.datastructures import Headers
from starlette.requests import cookie_parser
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from pacs_node.web.auth import CSRF_FIELD, CSRF_HEADER, SAFE_METHODS, SESSION_COOKIE

FORM_TYPE = "application/x-www-form-urlencoded"
MAX_FORM_BYTES = 64 * 1024


class FormCsrf:
    """ASGI middleware: a session form's ``csrf_token`` field becomes its CSRF header."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["method"] in SAFE_METHODS:
            await self.app(scope, receive, send)
            return
        headers = Headers(scope=scope)
        media_type = headers.get("content-type", "").partition(";")[0].strip().lower()
        if (
            CSRF_HEADER in headers
            or media_type != FORM_TYPE
            or SESSION_COOKIE not in cookie_parser(headers.get("cookie", ""))
        ):
            await self.app(scope, receive, send)
            return
        read: list[Message] = []
        body = b""
        more = True
        while more and len(body) <= MAX_FORM_BYTES:
            message = await receive()
            read.append(message)
            if message["type"] != "http.request":
                break
            body += message.get("body", b"")
            more = message.get("more_body", False)
        if not more and len(body) <= MAX_FORM_BYTES:
            token = _field(body, CSRF_FIELD)
            if token is not None:
                raw = [(k, v) for k, v in scope["headers"] if k.lower() != CSRF_HEADER.encode()]
                raw.append((CSRF_HEADER.encode("latin-1"), token.encode("latin-1", "replace")))
                scope = {**scope, "headers": raw}

        async def replay() -> Message:
            if read:
                return read.pop(0)
            return await receive()

        await self.app(scope, replay, send)


def _field(body: bytes, name: str) -> str | None:
    """The first value of ``name`` in a URL-encoded body, None when absent or unreadable."""
    try:
        pairs = parse_qsl(body.decode("utf-8"), keep_blank_values=True)
    except (UnicodeDecodeError, ValueError):
        return None
    return next((value for key, value in pairs if key == name), None)
