"""``/api/status``: the node's health as ``pacs-node status`` reports it, with the readiness
checks (workers alive) of the running node."""

from __future__ import annotations

from fastapi import APIRouter

from pacs_node.services.status import node_health
from pacs_node.web.api.deps import READ, Context, errors
from pacs_node.web.api.schemas import StatusOut

router = APIRouter(prefix="/status", tags=["status"])


@router.get("", dependencies=READ, responses=errors())
def node_status(context: Context) -> StatusOut:
    health = node_health(context.settings)
    checks = {name: bool(probe()) for name, probe in context.readiness.items()}
    return StatusOut.model_validate({**health.as_json(), "checks": checks})
