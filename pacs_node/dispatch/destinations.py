"""Which destination a delivery's name means at the moment it is sent.

A name is a destination of ``peers.yaml`` (see :mod:`pacs_node.destinations`), or a peer's AE
title when that peer has a port; anything else leaves the delivery held, with the reason why.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Protocol

from pacs_node.destinations import SOURCE, AnyDestination, DimseDestination


class PeerAddress(Protocol):
    """What resolution needs of a peer of peers.yaml."""

    @property
    def ae_title(self) -> str: ...
    @property
    def host(self) -> str | None: ...
    @property
    def port(self) -> int | None: ...


@dataclass(frozen=True)
class Unresolved:
    """A destination name that leads nowhere yet: its deliveries wait, held, with this reason."""

    reason: str


def resolve(
    name: str,
    destinations: Mapping[str, AnyDestination],
    peers: Sequence[PeerAddress],
) -> AnyDestination | Unresolved:
    """The destination a delivery's name means now: a configured one, or a peer's port."""
    if name == SOURCE:
        return Unresolved("the AE that sent the study is not known")
    configured = destinations.get(name)
    by_title = {p.ae_title: p for p in peers}
    if isinstance(configured, DimseDestination) and configured.peer is not None:
        peer = by_title.get(configured.peer)
        if peer is None or peer.host is None or peer.port is None:
            return Unresolved(f"peer {configured.peer} has no host and port")
        return configured.model_copy(
            update={"peer": None, "ae_title": peer.ae_title, "host": peer.host, "port": peer.port}
        )
    if configured is not None:
        return configured
    peer = by_title.get(name)
    if peer is None:
        return Unresolved(f"no destination or peer named {name} is configured")
    if peer.port is None or peer.host is None:
        return Unresolved(f"peer {name} has no host and port to send results to")
    return DimseDestination(type="dimse", ae_title=peer.ae_title, host=peer.host, port=peer.port)
