"""The JSON API under ``/api``: one router per topic, each on the service layer. Reads need the
viewer role, changes the operator role (and name the caller as the actor); the OpenAPI
document is ``/api/openapi.json``."""

from __future__ import annotations

from fastapi import APIRouter
from fastapi.routing import APIRoute

from pacs_node.web.api import audit, deliveries, jobs, models, review, routes, status, studies


def _operation_id(route: APIRoute) -> str:
    """The route function's name (``list_studies``, ``cancel_job``): unique across the API,
    and what a client generated from the document calls it."""
    return route.name


router = APIRouter(prefix="/api", generate_unique_id_function=_operation_id)
for topic in (studies, jobs, deliveries, models, routes, status, review, audit):
    router.include_router(topic.router)
