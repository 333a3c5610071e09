"""The kinds of result object, named once: the enum the results, the catalog and the UIDs use,
and the spelling ``routes.yaml`` gives them.

``routes.yaml`` writes a kind with ``_`` where the enum has ``-`` (``key_images`` for
``key-images``); that spelling stays the routes' (and so the queued jobs') own, and is read back
as the enum's only through :func:`kind_of_route_key`.
"""

from __future__ import annotations

from enum import StrEnum


class OutputKind(StrEnum):
    """One result object kind; part of every UID we derive, and the key of its series number."""

    SEG = "seg"
    SEG_JPEG2000 = "seg-jpeg2000"
    SR = "sr"
    GSPS = "gsps"
    KEY_IMAGES = "key-images"
    PDF = "pdf"
    FHIR = "fhir"
    # An IOCM rejection note (Key Object Selection) or the EHR's entered-in-error Bundle that
    # withdraws a rejected result: made by a person's decision, never named by a route.
    REJECTION = "rejection"


def route_key(kind: OutputKind) -> str:
    """How ``routes.yaml`` (``send:``) and a queued job's destinations spell ``kind``."""
    return kind.value.replace("-", "_")


def kind_of_route_key(key: str) -> str:
    """The :class:`OutputKind` value a ``send:`` key names (``key_images`` -> ``key-images``)."""
    return key.replace("_", "-")


# What a route may send, in the order error messages list them ...
ROUTABLE = (
    OutputKind.SEG,
    OutputKind.SR,
    OutputKind.GSPS,
    OutputKind.KEY_IMAGES,
    OutputKind.PDF,
    OutputKind.FHIR,
)
ROUTE_KEYS = tuple(route_key(kind) for kind in ROUTABLE)
# ... and what goes back to the sender when a rule says nothing (no FHIR: it has no EHR).
SENT_TO_SOURCE = (
    OutputKind.SEG,
    OutputKind.SR,
    OutputKind.GSPS,
    OutputKind.KEY_IMAGES,
    OutputKind.PDF,
)
