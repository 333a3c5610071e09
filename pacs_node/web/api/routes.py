"""``/api/routes``: the routing rules as the node loaded them (``explain`` for one study lives
with the studies)."""

from __future__ import annotations

from fastapi import APIRouter

from pacs_node.web.api.deps import READ, Context, errors
from pacs_node.web.api.schemas import RouteOut

router = APIRouter(prefix="/routes", tags=["routes"])


@router.get("", dependencies=READ, responses=errors())
def list_routes(context: Context) -> list[RouteOut]:
    """Every rule of routes.yaml, in the order they are tried."""
    return [
        RouteOut.model_validate(
            {
                **rule.model_dump(mode="json"),
                "when": rule.when.model_dump(mode="json", exclude_none=True),
            }
        )
        for rule in context.settings.routes.rules
    ]
