"""``/api/deliveries``: the outbox by state, and retrying a delivery."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Query, status

from pacs_node.catalog.deliveries import HELD_FOR_QUALITY
from pacs_node.catalog.models import DeliveryState
from pacs_node.services import deliveries, search
from pacs_node.web.api.deps import (
    DEFAULT_LIMIT,
    READ,
    Context,
    Limit,
    Offset,
    Operator,
    RowId,
    conflict,
    errors,
    not_found,
)
from pacs_node.web.api.schemas import DeliveryOut, Page

router = APIRouter(prefix="/deliveries", tags=["deliveries"])


@router.get("", dependencies=READ, responses=errors(status.HTTP_422_UNPROCESSABLE_CONTENT))
def list_deliveries(
    context: Context,
    state: Annotated[list[DeliveryState] | None, Query(description="any of these states")] = None,
    destination: Annotated[str | None, Query(max_length=64)] = None,
    limit: Limit = DEFAULT_LIMIT,
    offset: Offset = 0,
) -> Page[DeliveryOut]:
    """Deliveries, the newest first."""
    found = search.search_deliveries(
        context.catalog, limit, offset, states=state or (), destination=destination
    )
    return Page[DeliveryOut](
        items=[DeliveryOut.model_validate(d.as_json()) for d in found.items],
        total=found.total,
        limit=found.limit,
        offset=found.offset,
    )


@router.post(
    "/{delivery_id}/retry",
    responses=errors(
        status.HTTP_404_NOT_FOUND, status.HTTP_409_CONFLICT, status.HTTP_422_UNPROCESSABLE_CONTENT
    ),
)
def retry_delivery(context: Context, delivery_id: RowId, principal: Operator) -> DeliveryOut:
    """held | dead -> pending now. A result the quality gate holds is released as a whole,
    on the review page, not here."""
    before = search.find_delivery(context.catalog, delivery_id)
    if before is None:
        raise not_found(f"delivery {delivery_id}")
    if not deliveries.retry_delivery(context.catalog, delivery_id, principal.actor):
        held = " by the quality gate" if before.held_for == HELD_FOR_QUALITY else ""
        raise conflict(
            f"delivery {delivery_id} is {before.state}{held}: only a held or dead one is retried"
        )
    after = search.find_delivery(context.catalog, delivery_id)
    if after is None:  # its study was removed meanwhile
        raise not_found(f"delivery {delivery_id}")
    return DeliveryOut.model_validate(after.as_json())
