"""The web application: one FastAPI app with every HTTP door, built on the service layer."""

from __future__ import annotations

from fastapi import FastAPI, Request
from fastapi.responses import RedirectResponse
from fastapi.staticfiles import StaticFiles

from pacs_node import __version__
from pacs_node.web import (
    accounts,
    api,
    dashboard,
    health,
    metrics,
    qido,
    review,
    stow,
    upload,
    viewer,
    wado,
)
from pacs_node.web.context import WebContext
from pacs_node.web.csrf import FormCsrf
from pacs_node.web.pages import STATIC_DIR, PageRedirect


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
    app.add_middleware(FormCsrf)
    app.include_router(health.router)
    app.include_router(review.router)
    app.include_router(accounts.router)
    app.include_router(api.router)
    app.include_router(metrics.router)
    app.include_router(qido.router)
    app.include_router(wado.router)
    app.include_router(dashboard.router)
    app.include_router(viewer.router)
    app.include_router(stow.router)
    app.include_router(upload.router)

    @app.exception_handler(PageRedirect)
    def _redirect(_request: Request, exc: PageRedirect) -> RedirectResponse:
        return RedirectResponse(exc.location, status_code=303)

    return app
