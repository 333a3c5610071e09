"""The JSON API under ``/api``: one router per topic, each on the service layer. Reads need the
viewer role, changes the operator role (and name the caller as the actor); the OpenAPI
document is ``/api/openapi.json``."""

from __future__ import annotations

from fastapi import APIRouter

from pacs_node.web.api import deliveries, jobs, models, routes, status, studies

router = APIRouter(prefix="/api")
for topic in (studies, jobs, deliveries, models, routes, status):
    router.include_router(topic.router)
