"""The web face as one of the node's doors (see :mod:`pacs_node.doors`)."""

from __future__ import annotations

from pacs_node.doors import NodeParts
from pacs_node.web.app import create_app
from pacs_node.web.context import WebContext
from pacs_node.web.server import WebServer


def open_door(parts: NodeParts) -> WebServer | None:
    """The web server on ``web_host:web_port``, bound already; None when ``web_port`` is 0."""
    options = parts.settings.node
    if options.web_port == 0:
        return None
    context = WebContext(
        settings=parts.settings,
        catalog=parts.catalog,
        spool=parts.spool,
        receiver=parts.receiver,
        readiness=parts.readiness,
    )
    return WebServer(create_app(context), options.web_host, options.web_port)
