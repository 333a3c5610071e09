"""Device classes (``pacs_node.queue`` of a bundle, ``pacs-node worker --queues``), apart from
the registry so that the worker's command line reads them without loading numpy: its thread
limits must be set before that (see :mod:`pacs_node.cpus`)."""

from __future__ import annotations

import re

DEFAULT_QUEUE = "cpu"
_QUEUE = re.compile(r"^[a-z0-9][a-z0-9_-]{0,31}$")


def valid_queue(name: str) -> bool:
    """A device class a bundle and ``pacs-node worker --queues`` may name."""
    return bool(_QUEUE.match(name))
