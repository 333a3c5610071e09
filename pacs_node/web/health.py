"""``/healthz`` (the process answers) and ``/readyz`` (the catalog answers): open to all, and
holding no patient data."""

from __future__ import annotations

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse
from sqlalchemy import text

from pacs_node.web.context import web_context

router = APIRouter(include_in_schema=False)


@router.get("/healthz")
def healthz() -> dict[str, str]:
    return {"status": "ok"}


@router.get("/readyz")
def readyz(request: Request) -> JSONResponse:
    context = web_context(request)
    checks: dict[str, str] = {}
    try:
        with context.catalog.engine.connect() as connection:
            connection.execute(text("SELECT 1"))
        checks["catalog"] = "ok"
    except Exception as exc:  # any failure means not ready; the reason is not patient data
        checks["catalog"] = f"unreachable: {type(exc).__name__}"
    for name, probe in context.readiness.items():
        try:
            checks[name] = "ok" if probe() else "down"
        except Exception as exc:  # a probe that fails says "not ready", never 500
            checks[name] = f"unknown: {type(exc).__name__}"
    ready = all(value == "ok" for value in checks.values())
    return JSONResponse(
        {"status": "ready" if ready else "not ready", "checks": checks},
        status_code=200 if ready else 503,
    )
