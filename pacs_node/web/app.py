"""The web application: one FastAPI app with every HTTP door, built on the service layer."""

from __future__ import annotations

from fastapi import FastAPI, Request
from fastapi.responses import RedirectResponse
from fastapi.staticfiles import StaticFiles

from pacs_node import __version__
from pacs_node.web import health, stow, upload
from pacs_node.web.context import WebContext
from pacs_node.web.pages import STATIC_DIR, LoginRequired, login_redirect


def create_app(context: WebContext) -> FastAPI:
    app = FastAPI(
        title="pacs-node",
        version=__version__,
        openapi_url="/api/openapi.json",
        docs_url="/api/docs",
        redoc_url=None,
    )
    app.state.context = context
    app.mount("/static", StaticFiles(directory=STATIC_DIR), name="static")
    app.include_router(health.router)
    app.include_router(stow.router)
    app.include_router(upload.router)

    @app.exception_handler(LoginRequired)
    def _login(_request: Request, exc: LoginRequired) -> RedirectResponse:
        return RedirectResponse(login_redirect(exc.next_path), status_code=303)

    return app
