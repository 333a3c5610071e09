"""Who asked for a change: a person at a door, a peer AE, or the node itself.

Every command of :mod:`pacs_node.services` takes one and the catalog records it in the event
the change appends (as ``actor`` in the event's detail, ``"kind:name"``), so a study's
timeline and the audit trail say who did what, whichever door it came through.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass


class ActorKind(enum.StrEnum):
    USER = "user"  # a person: a login name at the command line, an account on the web
    PEER = "peer"  # a DICOM peer, by its AE title
    NODE = "node"  # the node on its own account: routing, a worker, the outbox


@dataclass(frozen=True, slots=True)
class Actor:
    kind: ActorKind
    name: str

    @classmethod
    def user(cls, name: str) -> Actor:
        return cls(ActorKind.USER, name)

    @classmethod
    def peer(cls, ae_title: str) -> Actor:
        return cls(ActorKind.PEER, ae_title)

    @classmethod
    def node(cls, part: str) -> Actor:
        return cls(ActorKind.NODE, part)

    @classmethod
    def parse(cls, text: str) -> Actor:
        """The inverse of ``str(actor)``; ValueError for text that is not ``kind:name``."""
        kind, sep, name = text.partition(":")
        if not sep or not name:
            raise ValueError(f"not an actor (kind:name): {text!r}")
        return cls(ActorKind(kind), name)

    def __str__(self) -> str:
        return f"{self.kind.value}:{self.name}"


ROUTING = Actor.node("routing")  # the routes, on a study becoming stable
