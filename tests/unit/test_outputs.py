"""Output kinds: one enum, and routes.yaml's spelling of it read back to the same kinds."""

from __future__ import annotations

from pacs_node.outputs import (
    ROUTABLE,
    ROUTE_KEYS,
    SENT_TO_SOURCE,
    OutputKind,
    kind_of_route_key,
    route_key,
)
from pacs_node.routing.plan import DEFAULT_SEND


def test_routes_yaml_keeps_its_spelling() -> None:
    assert ROUTE_KEYS == ("seg", "sr", "gsps", "key_images", "pdf", "fhir")
    assert list(DEFAULT_SEND) == ["seg", "sr", "gsps", "key_images", "pdf"]


def test_every_route_key_reads_back_as_its_kind() -> None:
    for kind in ROUTABLE:
        assert OutputKind(kind_of_route_key(route_key(kind))) is kind
    assert kind_of_route_key("key_images") == OutputKind.KEY_IMAGES == "key-images"


def test_what_goes_back_to_the_sender_is_routable_and_not_fhir() -> None:
    assert set(SENT_TO_SOURCE) < set(ROUTABLE)
    assert OutputKind.FHIR not in SENT_TO_SOURCE
