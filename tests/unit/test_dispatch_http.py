"""Pure parts of HTTP dispatch, table-driven: FHIR search escaping, Retry-After, HTTP statuses,
and STOW-RS answers that are hostile or malformed."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from email.utils import format_datetime
from pathlib import Path

import httpx
import pytest

from pacs_node.dispatch.dicomweb import StoreResponse, read_answer
from pacs_node.dispatch.fhir import search_request
from pacs_node.dispatch.handler import Parcel, Transient
from pacs_node.dispatch.http import Answer, classify_http, retry_after
from pacs_node.errors import PermanentDelivery, TransientDelivery
from pacs_node.results.fhir import identifier_query, search_escape

NOW = datetime(2026, 12, 5, 12, 0, tzinfo=UTC)


@pytest.mark.parametrize(
    ("raw", "escaped"),
    [
        ("PID-1", "PID-1"),
        ("12#34", "12#34"),  # not special to FHIR: only to URLs, where it is percent-encoded
        ("a,b", "a\\,b"),
        ("a|b", "a\\|b"),
        ("a$b", "a\\$b"),
        ("a\\b", "a\\\\b"),
        ("a,b|c$d\\e", "a\\,b\\|c\\$d\\\\e"),
    ],
)
def test_search_values_are_escaped_as_fhir_requires(raw: str, escaped: str) -> None:
    assert search_escape(raw) == escaped
    query = identifier_query("urn:oid:1.2", raw)
    assert "#" not in query
    assert "&" not in query.removeprefix("identifier=")
    resource, params = search_request(f"Patient?{query}")
    assert (resource, params) == ("Patient", {"identifier": f"urn:oid:1.2|{escaped}"})


@pytest.mark.parametrize(
    ("value", "seconds"),
    [
        ("120", 120.0),
        (format_datetime(NOW + timedelta(seconds=90), usegmt=True), 90.0),
        ("10000000", 86_400.0),  # capped at a day
        ("-5", None),
        ("0", None),
        ("nan", None),
        ("soon", None),
        ("", None),
    ],
)
def test_retry_after(value: str, seconds: float | None) -> None:
    at = retry_after(httpx.Headers({"Retry-After": value}), NOW)
    assert (None if at is None else (at - NOW).total_seconds()) == seconds


@pytest.mark.parametrize(
    ("status", "kind"),
    [
        (301, PermanentDelivery),
        (302, PermanentDelivery),
        (307, PermanentDelivery),
        (400, PermanentDelivery),
        (401, PermanentDelivery),
        (404, PermanentDelivery),
        (408, TransientDelivery),
        (429, TransientDelivery),
        (500, TransientDelivery),
        (503, TransientDelivery),
    ],
)
def test_http_statuses(status: int, kind: type[Exception]) -> None:
    assert isinstance(classify_http(status, "x"), kind)


def _answer(body: bytes, media_type: str = "application/dicom+json") -> Answer:
    return Answer(200, httpx.Headers({"Content-Type": media_type}), body)


@pytest.mark.parametrize(
    "body",
    [
        b"[1, 2]",
        b'{"00081199": {"vr": "SQ", "Value": "not a list"}}',
        b'{"00081199": 7}',
        b'{"00081199": {"vr": "SQ", "Value": [{"00081150": {"vr": "UI"}}]}}',  # no UID
        b"not json",
    ],
)
def test_malformed_stow_answers_acknowledge_nothing(body: bytes) -> None:
    response = StoreResponse.read(_answer(body))
    assert response is None or (not response.stored and not response.failed)


def test_an_xml_answer_with_a_dtd_is_not_read() -> None:
    bomb = b'<?xml version="1.0"?><!DOCTYPE x [<!ENTITY a "aaaa">]><NativeDicomModel/>'
    assert StoreResponse.read(_answer(bomb, "application/dicom+xml")) is None


def test_a_stow_answer_with_failures_is_read_per_instance() -> None:
    body = (
        b'{"00081199": {"vr": "SQ", "Value": [{"00081155": {"vr": "UI", "Value": ["1.1"]}}]},'
        b' "00081198": {"vr": "SQ", "Value": [{"00081155": {"vr": "UI", "Value": ["1.2"]},'
        b' "00081197": {"vr": "US", "Value": [43264]}}]}}'
    )
    response = StoreResponse.read(_answer(body))
    assert response is not None
    assert (response.stored, response.failed) == ({"1.1"}, {"1.2": 0xA900})


@pytest.mark.parametrize("body", [b"", b"  \r\n"])
def test_an_empty_200_stow_answer_delivers_nothing(body: bytes) -> None:
    parcel = Parcel(1, "seg", "1.2.840.10008.5.1.4.1.1.66.4", "1.9", {"ts": Path("x.dcm")})
    outcomes = read_answer(_answer(body), [parcel], ["ts"], NOW)
    assert [type(outcome) for outcome in outcomes] == [Transient]
