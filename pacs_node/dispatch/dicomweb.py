"""STOW-RS (PS3.18 10.5): results to a DICOMweb service, one multipart request per batch.

The stored Part 10 bytes go out as ``multipart/related; type="application/dicom"`` through
:mod:`.http` (httpx: no redirect followed, the destination's ``timeout_s`` as a total deadline,
one POST per outbox attempt). The answer decides each instance (PS3.18 10.5.3):

- 200 (all stored), 202 (some failed, or stored with warnings), 409 (none stored): the Store
  Instances Response Module (``application/dicom+json``, or ``application/dicom+xml``). An
  instance in the Referenced SOP Sequence (0008,1199) is delivered (a Warning Reason still
  stores it); one in the Failed SOP Sequence (0008,1198) fails by its Failure Reason
  (0008,1197), read as a C-STORE status (0xA7xx out of resources and 0x0110 processing failure
  are transient; 0x0122, 0xA9xx and 0xCxxx permanent). An instance in neither list was not
  acknowledged: transient. A 200 with no body at all acknowledges nothing (the response is
  required): transient; a 200 with another kind of body (a login page) is not a STOW-RS
  answer: permanent.
- 3xx: permanent (a wrong URL or a login page in front of the service; redirects are never
  followed); other 4xx: permanent; 408, 425, 429 and 5xx: transient, and a Retry-After puts
  the next attempt no earlier than it asks.
"""

from __future__ import annotations

import json
import logging
import secrets
from collections.abc import Sequence
from datetime import datetime
from pathlib import Path
from typing import Any
from xml.etree import ElementTree

from pacs_node.destinations import AnyDestination, DicomWebDestination
from pacs_node.dispatch.dimse import classify_status
from pacs_node.dispatch.handler import Delivered, Outcome, Parcel, Permanent, Transient
from pacs_node.dispatch.http import (
    Answer,
    classify_http,
    client_context,
    exchange,
    retry_after,
)
from pacs_node.errors import PermanentDelivery
from pacs_node.statuses import PROCESSING_FAILURE

log = logging.getLogger(__name__)

DICOM_JSON = "application/dicom+json"
DICOM_XML = "application/dicom+xml"
REFERENCED_SOP_SEQUENCE = "00081199"
FAILED_SOP_SEQUENCE = "00081198"
REFERENCED_SOP_INSTANCE_UID = "00081155"
FAILURE_REASON = "00081197"
PER_INSTANCE_STATUSES = frozenset({200, 202, 409})


def multipart(parts: Sequence[bytes]) -> tuple[str, bytes]:
    """(Content-Type, body) of a multipart/related request of application/dicom parts."""
    boundary = secrets.token_hex(24)
    while any(boundary.encode("ascii") in part for part in parts):
        boundary = secrets.token_hex(24)
    body = bytearray()
    for part in parts:
        body += f"--{boundary}\r\nContent-Type: application/dicom\r\n\r\n".encode("ascii")
        body += part
        body += b"\r\n"
    body += f"--{boundary}--\r\n".encode("ascii")
    content_type = f'multipart/related; type="application/dicom"; boundary={boundary}'
    return content_type, bytes(body)


class StoreResponse:
    """The Store Instances Response: instances stored, and those failed with their reason."""

    def __init__(self, stored: set[str], failed: dict[str, int]) -> None:
        nameless = {"", "None"}  # an item without a SOP Instance UID names nothing
        self.stored = stored - nameless
        self.failed = {uid: reason for uid, reason in failed.items() if uid not in nameless}

    @classmethod
    def read(cls, answer: Answer) -> StoreResponse | None:
        """The response in the answer's body; None when it holds none we can read."""
        if not answer.body.strip() or answer.truncated:
            return None
        try:
            if answer.media_type in (DICOM_JSON, "application/json"):
                return cls._from_json(json.loads(answer.body))
            if answer.media_type in (DICOM_XML, "application/xml", "text/xml"):
                return cls._from_xml(answer.body)
        except (ValueError, TypeError, KeyError, IndexError, ElementTree.ParseError):
            return None
        return None

    @classmethod
    def _from_json(cls, data: Any) -> StoreResponse:
        if isinstance(data, list) and len(data) == 1:  # some servers wrap it in an array
            data = data[0]
        if not isinstance(data, dict):
            raise ValueError("not a DICOM JSON object")

        def items(tag: str) -> list[dict[str, Any]]:
            element = data.get(tag) or {}
            values = element.get("Value") or [] if isinstance(element, dict) else []
            return [v for v in values if isinstance(v, dict)]

        def first(item: dict[str, Any], tag: str) -> Any:
            element = item.get(tag) or {}
            values = element.get("Value") if isinstance(element, dict) else None
            return values[0] if isinstance(values, list) and values else None

        referenced = items(REFERENCED_SOP_SEQUENCE)
        stored = {str(first(i, REFERENCED_SOP_INSTANCE_UID)) for i in referenced}
        failed: dict[str, int] = {}
        for item in items(FAILED_SOP_SEQUENCE):
            reason = first(item, FAILURE_REASON)
            failed[str(first(item, REFERENCED_SOP_INSTANCE_UID))] = (
                int(reason) if isinstance(reason, int | float | str) else PROCESSING_FAILURE
            )
        return cls(stored, failed)

    @classmethod
    def _from_xml(cls, body: bytes) -> StoreResponse:
        """PS3.19 Native DICOM Model (expat refuses external entities; the body is bounded)."""
        if b"<!DOCTYPE" in body or b"<!ENTITY" in body:
            raise ValueError("a DTD in a STOW-RS answer")
        root = ElementTree.fromstring(body)

        def items(tag: str) -> list[ElementTree.Element]:
            return [
                item
                for attribute in root.findall("DicomAttribute")
                if attribute.get("tag", "").upper() == tag
                for item in attribute.findall("Item")
            ]

        def first(item: ElementTree.Element, tag: str) -> str | None:
            for attribute in item.findall("DicomAttribute"):
                if attribute.get("tag", "").upper() == tag:
                    value = attribute.find("Value")
                    return (value.text or "").strip() if value is not None else None
            return None

        referenced = items(REFERENCED_SOP_SEQUENCE)
        stored = {str(first(i, REFERENCED_SOP_INSTANCE_UID)) for i in referenced}
        failed: dict[str, int] = {}
        for item in items(FAILED_SOP_SEQUENCE):
            reason = first(item, FAILURE_REASON)
            failed[str(first(item, REFERENCED_SOP_INSTANCE_UID))] = (
                int(reason) if reason and reason.isdigit() else PROCESSING_FAILURE
            )
        return cls(stored, failed)


def failure_outcome(uid: str, reason: int, status: int) -> Outcome:
    """A Failed SOP Sequence entry as an outcome: its Failure Reason read as a C-STORE status
    (0x0110 processing failure and 0xA7xx out of resources may pass; refusals do not)."""
    outcome = classify_status(reason)
    what = f"STOW-RS HTTP {status}: {uid} failed, reason 0x{reason:04X}"
    if isinstance(outcome, Permanent):
        return Permanent(what)
    return Transient(what)


def read_answer(
    answer: Answer, parcels: Sequence[Parcel], chosen: Sequence[str], now: datetime | None = None
) -> list[Outcome]:
    """One outcome per parcel from a STOW-RS answer (see the module docstring)."""
    status = answer.status
    if status not in PER_INSTANCE_STATUSES:
        error = classify_http(status, "STOW-RS")
        if isinstance(error, PermanentDelivery):
            detail = answer.text().strip()
            return [Permanent(f"{error}: {detail}" if detail else str(error))] * len(parcels)
        return [Transient(f"{error}", retry_after(answer.headers, now))] * len(parcels)
    response = StoreResponse.read(answer)
    if response is None:
        if status == 200 and not answer.body.strip():
            # PS3.18 requires the Store Instances Response: a proxy or a cut connection can
            # answer an empty 200 for a request the service never stored.
            return [Transient("STOW-RS HTTP 200 without a body: nothing acknowledged")] * len(
                parcels
            )
        if status == 200:
            kind = answer.media_type or "no content type"
            return [Permanent(f"STOW-RS HTTP 200 that is not a STOW-RS answer ({kind})")] * len(
                parcels
            )
        return [Transient(f"STOW-RS HTTP {status} without a readable response")] * len(parcels)
    outcomes: list[Outcome] = []
    for parcel, ts in zip(parcels, chosen, strict=True):
        uid = parcel.sop_instance_uid or ""
        if uid in response.failed:
            outcomes.append(failure_outcome(uid, response.failed[uid], status))
        elif uid in response.stored:
            outcomes.append(Delivered(ts))
        else:
            outcomes.append(Transient(f"STOW-RS HTTP {status}: {uid} not acknowledged"))
    return outcomes


class StowHandler:
    """Handler for ``dicomweb`` destinations."""

    batch_size = 16

    def send(self, destination: AnyDestination, parcels: Sequence[Parcel]) -> list[Outcome]:
        if not isinstance(destination, DicomWebDestination):
            raise PermanentDelivery(f"a {destination.type} destination given to STOW-RS")
        chosen: list[tuple[str, Path]] = [next(iter(p.encodings.items())) for p in parcels]
        content_type, body = multipart([path.read_bytes() for _, path in chosen])
        headers = {
            "Content-Type": content_type,
            "Accept": f"{DICOM_JSON}, {DICOM_XML};q=0.5",
            **destination.auth.headers(),
        }
        answer = exchange(
            "POST",
            f"{destination.url}/studies",
            timeout_s=destination.timeout_s,
            headers=headers,
            content=body,
            what="STOW-RS",
            tls=client_context(*destination.tls_files()),
        )
        outcomes = read_answer(answer, parcels, [ts for ts, _ in chosen])
        log.debug(
            "STOW-RS answer",
            extra={"status": answer.status, "instances": len(parcels)},
        )
        return outcomes
