"""The web face as one of the node's doors (see :mod:`pacs_node.doors`)."""

from __future__ import annotations

from datetime import timedelta

from pacs_node.actor import Actor
from pacs_node.config import NODE_FILE
from pacs_node.doors import NodeParts
from pacs_node.services.accounts import ensure_first_admin
from pacs_node.services.login_throttle import LoginThrottle
from pacs_node.web.app import create_app
from pacs_node.web.context import WebContext
from pacs_node.web.https import web_server_context
from pacs_node.web.server import WebServer


def open_door(parts: NodeParts) -> WebServer | None:
    """The web server on ``web_host:web_port``, bound already (HTTPS with ``web_tls``); None
    when ``web_port`` is 0.
    A catalog without accounts gets its first one here (see
    :func:`~pacs_node.services.accounts.ensure_first_admin`), so the node is usable at once."""
    options = parts.settings.node
    if options.web_port == 0:
        return None
    ensure_first_admin(parts.catalog, options.data_dir, Actor.node("web"))
    context = WebContext(
        settings=parts.settings,
        catalog=parts.catalog,
        spool=parts.spool,
        receiver=parts.receiver,
        session_lifetime=timedelta(hours=options.session_hours),
        login_throttle=LoginThrottle(burst=options.login_failures_per_address),
        readiness=parts.readiness,
        audit=parts.audit,
    )
    config_dir = parts.settings.config_dir
    source = str(config_dir / NODE_FILE) if config_dir else "the embedded defaults"
    tls = web_server_context(options, source) if options.web_tls else None
    return WebServer(create_app(context), options.web_host, options.web_port, source, tls)
