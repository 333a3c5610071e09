"""DICOM UID validation: the only gate between network input and file names."""

from __future__ import annotations

import re

from pacs_node.errors import InvalidUID, MissingAttribute

MAX_UID_LENGTH = 64
# PS3.5 9.1: digits and dots, components without leading zeros ("0" alone is fine).
_STRICT = re.compile(r"(0|[1-9][0-9]*)(\.(0|[1-9][0-9]*))*")
# What real devices send: some write components with leading zeros. Still only digits and dots,
# so it can never leave the spool directory.
_LENIENT = re.compile(r"[0-9]+(\.[0-9]+)*")


def is_valid_uid(value: str, *, strict: bool = False) -> bool:
    """True when ``value`` is a UID the node accepts (``strict`` also refuses leading zeros)."""
    if not value or len(value) > MAX_UID_LENGTH:
        return False
    pattern = _STRICT if strict else _LENIENT
    return pattern.fullmatch(value) is not None


def require_uid(value: object, attribute: str) -> str:
    """Return ``value`` as a validated UID string or raise the matching ingest error."""
    if value is None:
        raise MissingAttribute(f"{attribute} is missing")
    text = str(value).strip("\0 ")
    if not text:
        raise MissingAttribute(f"{attribute} is empty")
    if not is_valid_uid(text):
        raise InvalidUID(f"{attribute} is not a valid UID ({len(text)} characters)")
    return text
