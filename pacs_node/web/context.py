"""What every web route needs from the node, handed to the app once at start."""

from __future__ import annotations

import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import timedelta

from fastapi import Request

from pacs_node.audit.trail import AuditTrail
from pacs_node.catalog.db import Catalog
from pacs_node.config import Settings
from pacs_node.ingest.receive import Receiver
from pacs_node.ingest.spool import Spool
from pacs_node.services.login_throttle import LoginThrottle, VerifiedPasswords

STOW_PARTS = 4  # STOW-RS parts received at once: bounds the memory a burst takes


@dataclass
class WebContext:
    """The node's parts the web face uses. ``receiver`` is None where the app serves reads only
    (no STOW-RS, no upload)."""

    settings: Settings
    catalog: Catalog
    spool: Spool
    receiver: Receiver | None = None
    session_lifetime: timedelta = field(default=timedelta(hours=8))
    # Failed sign-ins per address and per unknown name (in memory: this process's doors).
    login_throttle: LoginThrottle = field(default_factory=lambda: LoginThrottle(burst=10))
    # HTTP Basic pairs verified lately, so each DICOMweb request is not one more argon2 check.
    verified_passwords: VerifiedPasswords = field(default_factory=VerifiedPasswords)
    # The node's audit recorder (queued, folded); None outside a node: events written at once.
    audit: AuditTrail | None = None
    # Named checks ``/readyz`` runs beside the catalog's (e.g. "workers": are they alive).
    readiness: dict[str, Callable[[], bool]] = field(default_factory=dict)
    # STOW-RS writes (parse, spool, header read) running at once in this process; more wait.
    stow_parts: threading.BoundedSemaphore = field(
        default_factory=lambda: threading.BoundedSemaphore(STOW_PARTS)
    )


def web_context(request: Request) -> WebContext:
    context = request.app.state.context
    assert isinstance(context, WebContext)
    return context
