"""The web application: one FastAPI app with every HTTP door, built on the service layer."""

from __future__ import annotations

from typing import Annotated

from fastapi import Depends, FastAPI, Request
from fastapi.responses import JSONResponse, RedirectResponse
from fastapi.staticfiles import StaticFiles

from pacs_node import __version__
from pacs_node.catalog.models import Role
from pacs_node.services.accounts import Principal
from pacs_node.services.audit import PatientReads
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
from pacs_node.web.audit import AuditReads
from pacs_node.web.auth import require
from pacs_node.web.context import WebContext
from pacs_node.web.csrf import FormCsrf
from pacs_node.web.pages import STATIC_DIR, PageRedirect

Viewer = Annotated[Principal, Depends(require(Role.VIEWER))]


def create_app(context: WebContext) -> FastAPI:
    app = FastAPI(
        title="pacs-node",
        version=__version__,
        # served below, to signed-in users only (the API holds no open resource); no
        # browsable docs page: it loads its scripts from a CDN a hospital network may not reach
        openapi_url=None,
        docs_url=None,
        redoc_url=None,
    )
    app.state.context = context
    app.mount("/static", StaticFiles(directory=STATIC_DIR), name="static")
    app.add_middleware(FormCsrf)
    app.add_middleware(
        AuditReads, reads=PatientReads(context.catalog, context.settings.node.ae_title)
    )
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

    @app.get("/api/openapi.json", include_in_schema=False)
    def openapi_document(
        _user: Annotated[Principal, Depends(require(Role.VIEWER))],
    ) -> JSONResponse:
        return JSONResponse(app.openapi())

    @app.exception_handler(PageRedirect)
    def _redirect(_request: Request, exc: PageRedirect) -> RedirectResponse:
        return RedirectResponse(exc.location, status_code=303)

    return app
