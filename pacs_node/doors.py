"""The doors the node opens beside its DICOM port, found by name when the node starts.

The node hosts its web face without depending on it: the composition names each door by its
import string (as an ASGI server names its app), and the door gets the node's parts. So the
command line, which starts the node, never imports another door's code.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Protocol

from pacs_node.audit.trail import AuditTrail
from pacs_node.catalog.db import Catalog
from pacs_node.config import Settings
from pacs_node.ingest.receive import Receiver
from pacs_node.ingest.spool import Spool

# "module:function": each function takes the NodeParts and returns its Door, or None when the
# configuration turns the door off.
DOORS = ("pacs_node.web.door:open_door",)


@dataclass
class NodeParts:
    """What a door may use of a running node."""

    settings: Settings
    catalog: Catalog
    spool: Spool
    receiver: Receiver
    audit: AuditTrail | None = None  # the node's audit recorder
    # Named liveness checks a door may report (e.g. "job workers": are they alive).
    readiness: dict[str, Callable[[], bool]] = field(default_factory=dict)


class Door(Protocol):
    def start(self) -> None: ...

    def alive(self) -> bool: ...

    def stop(self, timeout: float) -> None: ...


def open_doors(parts: NodeParts) -> list[Door]:
    doors: list[Door] = []
    for name in DOORS:
        module_name, _, attribute = name.partition(":")
        factory = getattr(importlib.import_module(module_name), attribute)
        door = factory(parts)
        if door is not None:
            doors.append(door)
    return doors
