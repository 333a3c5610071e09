"""``/api/models``: the installed bundles with their labels, cards and held-out metrics."""

from __future__ import annotations

from fastapi import APIRouter

from pacs_node.services.models import model_details
from pacs_node.web.api.deps import READ, Context, errors
from pacs_node.web.api.schemas import HeldOutOut, ModelOut

router = APIRouter(prefix="/models", tags=["models"])


@router.get("", dependencies=READ, responses=errors())
def list_models(context: Context) -> list[ModelOut]:
    """Every bundle under the models folder."""
    found = []
    for detail in model_details(context.settings):
        entry = detail.entry.as_json()
        held_out = None
        if detail.held_out is not None:
            held_out = HeldOutOut(cases=detail.held_out_cases or 0, labels=detail.held_out)
        found.append(
            ModelOut.model_validate(
                {
                    **entry,
                    "description": detail.description,
                    "intended_use": detail.intended_use,
                    "card": detail.card,
                    "held_out": held_out,
                }
            )
        )
    return found
