"""FHIR: the stored transaction Bundle POSTed to the EHR's base URL.

The node never creates patients: before posting, the Patient is looked up by the identifier
the Bundle references (``patient_search``, built under this destination's identifier rules,
escaped and URL-encoded as FHIR requires). Exactly one match lets the Bundle go; none, or more
than one, *holds* the delivery with that reason (a person has to reconcile the patient), never
retried blindly. A destination with ``create_patient: true`` (test systems) skips the look-up:
its Bundle creates the Patient conditionally. Every entry is a conditional create or update on a
deterministic identifier, so a re-send never duplicates.

Only a transaction-response Bundle whose every entry answers 2xx, with no OperationOutcome of
severity ``error`` or ``fatal`` anywhere (the body, an entry's ``response.outcome`` or
resource), counts as delivered. Otherwise:

- HTTP 3xx (never followed) and other 4xx: permanent; 408, 425, 429 and 5xx: transient, with
  Retry-After honoured;
- a 2xx that is not FHIR JSON (a login page), or an entry that answers 4xx: permanent;
- an entry that answers 5xx/429/408, an error OperationOutcome whose issues are all of the
  codes a server uses for passing trouble (``transient``, ``lock-out``, ``no-store``,
  ``exception``, ``timeout``, ``incomplete``, ``throttled``), a truncated answer, or a
  response with fewer entries than the request: transient (a re-send is harmless: the entries
  are conditional creates and updates);
- any other error OperationOutcome (invalid, not found, business rule...): permanent.

Every request goes through :mod:`.http`: no redirect, the destination's ``timeout_s`` as a
total deadline, one request per attempt.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Sequence
from typing import Any
from urllib.parse import parse_qsl

from pacs_node.destinations import AnyDestination, FhirDestination
from pacs_node.dispatch.handler import Delivered, Held, Outcome, Parcel, Permanent, Transient
from pacs_node.dispatch.http import (
    Answer,
    classify_http,
    client_context,
    exchange,
    retry_after,
)
from pacs_node.errors import DeliveryError, PermanentDelivery

log = logging.getLogger(__name__)

FHIR_JSON = "application/fhir+json"
JSON_TYPES = frozenset({FHIR_JSON, "application/json", "application/json+fhir"})
FAILING_SEVERITIES = frozenset({"error", "fatal"})
PASSING_ISSUES = frozenset(
    {"transient", "lock-out", "no-store", "exception", "timeout", "incomplete", "throttled"}
)
TRANSIENT_ENTRY_STATUSES = frozenset({408, 425, 429})


def search_request(patient_search: str) -> tuple[str, dict[str, str]]:
    """The stored search (``Patient?identifier=...``, escaped and URL-encoded) as a resource
    type and the parameters httpx encodes again: what is searched is exactly what was built."""
    resource, _, query = patient_search.partition("?")
    params = dict(parse_qsl(query, keep_blank_values=True))
    return resource or "Patient", params


def _json(answer: Answer) -> Any:
    if answer.truncated or answer.media_type not in JSON_TYPES:
        return None
    try:
        return json.loads(answer.body)
    except ValueError:
        return None


def failing_issues(outcome: Any) -> list[dict[str, Any]]:
    """The issues of an OperationOutcome with severity error or fatal."""
    if not isinstance(outcome, dict) or outcome.get("resourceType") != "OperationOutcome":
        return []
    issues = outcome.get("issue")
    return [
        i
        for i in (issues if isinstance(issues, list) else [])
        if isinstance(i, dict) and i.get("severity") in FAILING_SEVERITIES
    ]


def _issue_outcome(issues: list[dict[str, Any]], where: str) -> Transient | Permanent:
    codes = sorted({str(i.get("code", "")) for i in issues})
    what = f"FHIR {where}: OperationOutcome {', '.join(codes) or 'error'}"
    if codes and all(code in PASSING_ISSUES for code in codes):
        return Transient(what)
    return Permanent(what)


def _entry_status(entry: Any) -> int | None:
    response = entry.get("response") if isinstance(entry, dict) else None
    status = response.get("status") if isinstance(response, dict) else None
    if not isinstance(status, str):
        return None
    head = status.strip().split(" ", 1)[0]
    return int(head) if head.isdigit() else None


def read_transaction_response(answer: Answer, sent_entries: int) -> Outcome:
    """Whether a 2xx answer to a transaction really delivered it (module docstring)."""
    body = _json(answer)
    if body is None:
        if answer.truncated:
            return Transient("FHIR transaction: answer too large to check")
        kind = answer.media_type or "no content type"
        return Permanent(f"FHIR transaction: HTTP {answer.status} that is not FHIR JSON ({kind})")
    issues = failing_issues(body)
    if issues:
        return _issue_outcome(issues, f"transaction answered {answer.status}")
    if not isinstance(body, dict) or body.get("resourceType") != "Bundle":
        return Permanent("FHIR transaction: the answer is not a Bundle")
    if body.get("type") != "transaction-response":
        return Permanent(f"FHIR transaction: answered a {body.get('type')!s:.40} Bundle")
    entries = body.get("entry")
    entries = entries if isinstance(entries, list) else []
    if len(entries) < sent_entries:
        return Transient(f"FHIR transaction: {len(entries)} of {sent_entries} entries answered")
    for index, entry in enumerate(entries):
        status = _entry_status(entry)
        where = f"entry {index}"
        if status is None:
            return Permanent(f"FHIR transaction: {where} has no response status")
        response = entry.get("response") or {}
        issues = failing_issues(response.get("outcome")) + failing_issues(entry.get("resource"))
        if not 200 <= status < 300:
            if status >= 500 or status in TRANSIENT_ENTRY_STATUSES:
                return Transient(f"FHIR transaction: {where} answered {status}")
            return Permanent(f"FHIR transaction: {where} answered {status}")
        if issues:
            return _issue_outcome(issues, f"{where} answered {status}")
    return Delivered(FHIR_JSON)


def read_search(answer: Answer) -> Outcome | None:
    """None when the search found exactly one Patient; otherwise what to do."""
    if not 200 <= answer.status < 300:
        error = classify_http(answer.status, "Patient search")
        if isinstance(error, PermanentDelivery):
            return Permanent(str(error))
        return Transient(str(error), retry_after(answer.headers))
    body = _json(answer)
    if not isinstance(body, dict) or body.get("resourceType") != "Bundle":
        issues = failing_issues(body)
        if issues:
            return _issue_outcome(issues, "Patient search")
        return Permanent("Patient search: the answer is not a FHIR Bundle")
    entries = body.get("entry")
    matches = [
        e
        for e in (entries if isinstance(entries, list) else [])
        if isinstance(e, dict)
        and isinstance(e.get("resource"), dict)
        and e["resource"].get("resourceType") == "Patient"
        and (e.get("search") or {}).get("mode", "match") == "match"
    ]
    total = body.get("total")
    found = max(len(matches), total if isinstance(total, int) else 0)
    if found == 0:
        return Held("the EHR has no Patient with the study's patient identifier")
    if found > 1:
        return Held(f"the EHR has {found} Patients with the study's patient identifier")
    return None


class FhirHandler:
    """Handler for ``fhir`` destinations; one Bundle per request."""

    batch_size = 1

    def send(self, destination: AnyDestination, parcels: Sequence[Parcel]) -> list[Outcome]:
        if not isinstance(destination, FhirDestination):
            raise PermanentDelivery(f"a {destination.type} destination given to the FHIR client")
        return [self._send_one(destination, parcel) for parcel in parcels]

    def _send_one(self, destination: FhirDestination, parcel: Parcel) -> Outcome:
        if not parcel.encodings:
            return Permanent("no stored Bundle")
        body = next(iter(parcel.encodings.values())).read_bytes()
        headers = {"Accept": FHIR_JSON, **destination.auth.headers()}
        try:
            sent_entries = len(json.loads(body).get("entry") or [])
        except (ValueError, AttributeError):
            return Permanent("the stored Bundle is not readable JSON")
        try:
            tls = client_context(*destination.tls_files())
            if not destination.create_patient and parcel.patient_search:
                resource, params = search_request(parcel.patient_search)
                found = exchange(
                    "GET",
                    f"{destination.base_url}/{resource}",
                    timeout_s=destination.timeout_s,
                    headers=headers,
                    params={**params, "_count": "2"},
                    what="Patient search",
                    tls=tls,
                )
                held = read_search(found)
                if held is not None:
                    return held
            answer = exchange(
                "POST",
                destination.base_url,
                timeout_s=destination.timeout_s,
                headers={**headers, "Content-Type": FHIR_JSON},
                content=body,
                what="FHIR transaction",
                tls=tls,
            )
        except DeliveryError as exc:
            if isinstance(exc, PermanentDelivery):
                return Permanent(str(exc))
            return Transient(str(exc))
        if 200 <= answer.status < 300:
            return read_transaction_response(answer, sent_entries)
        error = classify_http(answer.status, "FHIR transaction")
        issues = failing_issues(_json(answer))
        detail = str(error)
        if issues:
            detail += f": {_issue_outcome(issues, 'transaction').reason}"
        if isinstance(error, PermanentDelivery):
            return Permanent(detail)
        return Transient(detail, retry_after(answer.headers))
