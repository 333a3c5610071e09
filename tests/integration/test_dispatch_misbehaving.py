"""STOW-RS and FHIR peers that misbehave, driven through the node's outbox against a catalog:
small HTTP servers on 127.0.0.1 answer from a script. A delivery is ``delivered`` only when the
peer's answer says so for that very object; redirects are never followed; one request per
attempt; the destination's timeout is a total deadline; Retry-After is honoured; the Patient
search is escaped and must find exactly one Patient; each EHR gets its own identifier rules."""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Iterator, Mapping
from datetime import timedelta
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs

import pytest

from pacs_node.catalog.db import Catalog, open_catalog
from pacs_node.catalog.deliveries import list_deliveries
from pacs_node.catalog.models import Delivery, utcnow
from pacs_node.catalog.results import StoredEncoding
from pacs_node.config import NodeOptions, Settings
from pacs_node.destinations import AnyDestination, DicomWebDestination, FhirDestination
from pacs_node.dispatch.outbox import Outbox
from pacs_node.results import build_results
from pacs_node.results.fhir import search_escape
from pacs_node.worker import result_options, stored_encodings
from tests.catalog_factory import queue_stored_results
from tests.conftest import wait_for
from tests.http_server import Reply, Request, scripted
from tests.results_factory import phantom_study

pytestmark = pytest.mark.integration

EXPLICIT_LE = "1.2.840.10008.1.2.1"
CT = "1.2.840.10008.5.1.4.1.1.2"
FHIR_JSON = {"Content-Type": "application/fhir+json"}
DICOM_JSON = {"Content-Type": "application/dicom+json"}


def _settings(tmp_path: Path, destinations: Mapping[str, AnyDestination]) -> Settings:
    return Settings(
        node=NodeOptions(
            data_dir=tmp_path / "var",
            fsync=False,
            delivery_backoff_s=10.0,
            delivery_backoff_max_s=20.0,
        ),
        destinations=dict(destinations),
    )


@pytest.fixture
def catalog(tmp_path: Path) -> Iterator[Catalog]:
    opened = open_catalog(f"sqlite:///{tmp_path / 'c.sqlite'}")
    yield opened
    opened.dispose()


def _queue(
    catalog: Catalog,
    settings: Settings,
    items: list[StoredEncoding],
    destinations: dict[str, list[str]],
) -> None:
    """A job of a stable study whose stored results are to go to ``destinations``."""
    with catalog.sessions.begin() as session:
        queue_stored_results(session, settings.node.data_dir / "results", items, destinations)


def _rows(catalog: Catalog) -> list[Delivery]:
    with catalog.sessions() as session:
        return list(session.query(Delivery).order_by(Delivery.id))


# --- STOW-RS ----------------------------------------------------------------------------------


def _instances(n: int) -> list[StoredEncoding]:
    return [
        StoredEncoding("seg", CT, f"1.2.3.{i}", "1.2.3.100", EXPLICIT_LE, b"DICM" * 8)
        for i in range(n)
    ]


def _stow_answer(stored: list[str], failed: dict[str, int], warning: bool = False) -> bytes:
    def ref(uid: str) -> dict[str, Any]:
        return {
            "00081150": {"vr": "UI", "Value": [CT]},
            "00081155": {"vr": "UI", "Value": [uid]},
        }

    body: dict[str, Any] = {}
    if stored:
        items = [ref(u) for u in stored]
        if warning:
            items[0]["00081196"] = {"vr": "US", "Value": [0xB000]}  # Warning Reason
        body["00081199"] = {"vr": "SQ", "Value": items}
    if failed:
        body["00081198"] = {
            "vr": "SQ",
            "Value": [
                {**ref(u), "00081197": {"vr": "US", "Value": [reason]}}
                for u, reason in failed.items()
            ],
        }
    return json.dumps(body).encode()


def _stow_outbox(
    tmp_path: Path, catalog: Catalog, url: str, n: int, timeout_s: float = 10.0
) -> Outbox:
    web = DicomWebDestination(type="dicomweb", url=f"{url}/dicom-web", timeout_s=timeout_s)
    settings = _settings(tmp_path, {"WEB": web})
    _queue(catalog, settings, _instances(n), {"seg": ["WEB"]})
    return Outbox(catalog, settings)


def test_a_redirect_to_a_login_page_is_not_delivered_and_posted_once(
    tmp_path: Path, catalog: Catalog
) -> None:
    def script(request: Request) -> Reply:
        if request.path == "/login":
            return Reply(200, b"<html>Sign in</html>", {"Content-Type": "text/html"})
        return Reply(302, b"", {"Location": "/login"})

    with scripted(script) as server:
        outbox = _stow_outbox(tmp_path, catalog, server.url, 2)
        try:
            assert outbox.dispatch_due(wait=True) == 1
        finally:
            outbox.stop()
    assert len(server.of("POST", "/dicom-web/studies")) == 1  # no hidden retries
    assert server.of("GET") == []  # the redirect was not followed
    rows = _rows(catalog)
    assert [r.state.value for r in rows] == ["dead", "dead"]
    assert all("302" in (r.last_error or "") for r in rows)
    posted = server.requests[0]
    assert posted.headers["Content-Type"].startswith('multipart/related; type="application/dicom"')


def test_a_200_login_page_is_not_a_stow_answer(tmp_path: Path, catalog: Catalog) -> None:
    page = Reply(200, b"<html>Sign in</html>", {"Content-Type": "text/html"})
    with scripted(lambda _r: page) as server:
        outbox = _stow_outbox(tmp_path, catalog, server.url, 1)
        try:
            outbox.dispatch_due(wait=True)
        finally:
            outbox.stop()
    (row,) = _rows(catalog)
    assert row.state.value == "dead"
    assert "not a STOW-RS answer" in (row.last_error or "")


def test_a_stalled_server_is_cut_at_the_deadline(tmp_path: Path, catalog: Catalog) -> None:
    """The server answers 200 at once, then trickles a byte every 0.2 s: httpx's per-read
    timeout never fires, the destination's total deadline does."""
    trickle = Reply(200, b"{}", DICOM_JSON, stall_s=20.0)
    with scripted(lambda _r: trickle) as server:
        outbox = _stow_outbox(tmp_path, catalog, server.url, 1, timeout_s=1.0)
        try:
            started = time.monotonic()
            outbox.dispatch_due(wait=True)
            took = time.monotonic() - started
            wait_for(  # the server still trickles: the request's thread stops by itself
                lambda: not any(t.name == "dispatch-http" for t in threading.enumerate()),
                5,
                what="the abandoned request's thread to end",
            )
        finally:
            outbox.stop()
    assert took < 3.0, took
    (row,) = _rows(catalog)
    assert row.state.value == "pending"  # transient: retried later
    assert "within 1 s" in (row.last_error or "")
    assert len(server.of("POST")) == 1


def test_202_settles_each_instance_by_its_own_outcome(tmp_path: Path, catalog: Catalog) -> None:
    answer = _stow_answer(
        stored=["1.2.3.0", "1.2.3.1"],  # the first with a warning: stored all the same
        failed={"1.2.3.2": 0xA900, "1.2.3.3": 0xA700},  # mismatch: permanent; resources: later
        warning=True,
    )  # 1.2.3.4 is in neither list: not acknowledged
    with scripted(lambda _r: Reply(202, answer, DICOM_JSON)) as server:
        outbox = _stow_outbox(tmp_path, catalog, server.url, 5)
        try:
            outbox.dispatch_due(wait=True)
        finally:
            outbox.stop()
    states = [r.state.value for r in _rows(catalog)]
    assert states == ["delivered", "delivered", "dead", "pending", "pending"]
    assert len(server.of("POST")) == 1  # one request for the batch


def test_409_stores_nothing(tmp_path: Path, catalog: Catalog) -> None:
    answer = _stow_answer(stored=[], failed={"1.2.3.0": 0xC000, "1.2.3.1": 0x0110})
    with scripted(lambda _r: Reply(409, answer, DICOM_JSON)) as server:
        outbox = _stow_outbox(tmp_path, catalog, server.url, 2)
        try:
            outbox.dispatch_due(wait=True)
        finally:
            outbox.stop()
    rows = _rows(catalog)
    assert [r.state.value for r in rows] == ["dead", "pending"]
    assert "0xC000" in (rows[0].last_error or "")


def test_200_in_dicom_xml_is_read_too(tmp_path: Path, catalog: Catalog) -> None:
    xml = (
        b'<?xml version="1.0"?><NativeDicomModel>'
        b'<DicomAttribute tag="00081199" vr="SQ"><Item number="1">'
        b'<DicomAttribute tag="00081155" vr="UI"><Value number="1">1.2.3.0</Value>'
        b"</DicomAttribute></Item></DicomAttribute></NativeDicomModel>"
    )
    reply = Reply(200, xml, {"Content-Type": "application/dicom+xml"})
    with scripted(lambda _r: reply) as server:
        outbox = _stow_outbox(tmp_path, catalog, server.url, 2)
        try:
            outbox.dispatch_due(wait=True)
        finally:
            outbox.stop()
    assert [r.state.value for r in _rows(catalog)] == ["delivered", "pending"]


def test_503_retry_after_is_honoured(tmp_path: Path, catalog: Catalog) -> None:
    busy = Reply(503, b"busy", {"Retry-After": "120", "Content-Type": "text/plain"})
    with scripted(lambda _r: busy) as server:
        outbox = _stow_outbox(tmp_path, catalog, server.url, 1)
        try:
            outbox.dispatch_due(wait=True)
            assert outbox.dispatch_due(wait=True) == 0  # not before its time
        finally:
            outbox.stop()
    (row,) = _rows(catalog)
    assert row.state.value == "pending"
    assert row.next_attempt_at is not None
    assert row.next_attempt_at - utcnow() > timedelta(seconds=110)  # backoff alone: <= 10 s
    assert len(server.of("POST")) == 1


# --- FHIR -------------------------------------------------------------------------------------


def _searchset(*ids: str) -> bytes:
    return json.dumps(
        {
            "resourceType": "Bundle",
            "type": "searchset",
            "total": len(ids),
            "entry": [
                {"resource": {"resourceType": "Patient", "id": i}, "search": {"mode": "match"}}
                for i in ids
            ],
        }
    ).encode()


def _transaction_response(request: Request, outcome: dict[str, Any] | None = None) -> bytes:
    sent = json.loads(request.body)["entry"]
    entries: list[dict[str, Any]] = [{"response": {"status": "201 Created"}} for _ in sent]
    if outcome is not None:
        entries[-1]["response"]["outcome"] = outcome
    return json.dumps(
        {"resourceType": "Bundle", "type": "transaction-response", "entry": entries}
    ).encode()


class Ehr:
    """A FHIR server that knows ``patients`` matches for any identifier search and answers
    transactions with ``answer`` (default: every entry 201 Created)."""

    def __init__(self, patients: int = 1, answer: Any = None) -> None:
        self.patients = patients
        self.answer = answer

    def __call__(self, request: Request) -> Reply:
        if request.method == "GET" and request.path.endswith("/Patient"):
            ids = [f"p{i}" for i in range(self.patients)]
            return Reply(200, _searchset(*ids), FHIR_JSON)
        if request.method == "POST":
            if self.answer is not None:
                return self.answer(request)  # type: ignore[no-any-return]
            return Reply(200, _transaction_response(request), FHIR_JSON)
        return Reply(404, b"", FHIR_JSON)


def _fhir_job(
    tmp_path: Path,
    catalog: Catalog,
    destinations: Mapping[str, FhirDestination],
    patient_id: str = "PID-1",
) -> Outbox:
    """Results of a phantom study whose PatientID is ``patient_id``, built as the worker builds
    them for these FHIR destinations, stored and queued."""
    settings = _settings(tmp_path, destinations)
    volume, labelmap, info = phantom_study(shape=(6, 24, 24))
    for header in volume.headers:
        header.PatientID = patient_id
    names = list(destinations)
    options = result_options(settings, {"fhir": names})
    built = build_results(volume, labelmap, info, options)
    items = [i for i in stored_encodings(built, names) if i.kind == "fhir"]
    _queue(catalog, settings, items, {"fhir": names})
    return Outbox(catalog, settings)


def _ehr(url: str, system: str = "urn:oid:1.2.3") -> FhirDestination:
    return FhirDestination(type="fhir", base_url=f"{url}/fhir", patient_system=system)


@pytest.mark.parametrize("patient_id", ["12#34", "a,b|c$d\\e"])
def test_the_patient_search_is_escaped_and_exact(
    tmp_path: Path, catalog: Catalog, patient_id: str
) -> None:
    with scripted(Ehr()) as server:
        outbox = _fhir_job(tmp_path, catalog, {"EHR": _ehr(server.url)}, patient_id)
        try:
            outbox.dispatch_due(wait=True)
        finally:
            outbox.stop()
    (search,) = server.of("GET", "/fhir/Patient")
    wanted = f"urn:oid:1.2.3|{search_escape(patient_id)}"
    assert search.params["identifier"] == [wanted]  # decoded from the wire: nothing cut off
    assert "#" not in search.query
    (posted,) = server.of("POST", "/fhir")
    bundle = json.loads(posted.body)
    report = next(
        e["resource"]
        for e in bundle["entry"]
        if e["resource"]["resourceType"] == "DiagnosticReport"
    )
    reference = report["subject"]["reference"]
    assert reference.startswith("Patient?")
    assert parse_qs(reference.partition("?")[2])["identifier"] == [wanted]
    (row,) = _rows(catalog)
    assert row.state.value == "delivered"


def test_two_patient_matches_hold_the_delivery(tmp_path: Path, catalog: Catalog) -> None:
    with scripted(Ehr(patients=2)) as server:
        outbox = _fhir_job(tmp_path, catalog, {"EHR": _ehr(server.url)})
        try:
            outbox.dispatch_due(wait=True)
        finally:
            outbox.stop()
    (row,) = _rows(catalog)
    assert (row.state.value, row.held_for) == ("held", "patient")
    assert "2 Patients" in (row.last_error or "")
    assert server.of("POST") == []  # nothing posted for a patient that is not certain


def test_no_patient_match_holds_the_delivery(tmp_path: Path, catalog: Catalog) -> None:
    with scripted(Ehr(patients=0)) as server:
        outbox = _fhir_job(tmp_path, catalog, {"EHR": _ehr(server.url)})
        try:
            outbox.dispatch_due(wait=True)
        finally:
            outbox.stop()
    (row,) = _rows(catalog)
    assert (row.state.value, row.held_for) == ("held", "patient")
    assert server.of("POST") == []


def _error(code: str) -> dict[str, Any]:
    return {
        "resourceType": "OperationOutcome",
        "issue": [{"severity": "error", "code": code, "diagnostics": "Patient PID-1 refused"}],
    }


@pytest.mark.parametrize(
    ("answer", "state"),
    [
        # a 200 whose body is an error OperationOutcome
        (lambda _r: Reply(200, json.dumps(_error("invalid")).encode(), FHIR_JSON), "dead"),
        (lambda _r: Reply(200, json.dumps(_error("transient")).encode(), FHIR_JSON), "pending"),
        # a 200 transaction-response with an entry carrying an error outcome
        (lambda r: Reply(200, _transaction_response(r, _error("processing")), FHIR_JSON), "dead"),
        # a 200 transaction-response with an entry that failed
        (
            lambda _r: Reply(
                200,
                json.dumps(
                    {
                        "resourceType": "Bundle",
                        "type": "transaction-response",
                        "entry": [{"response": {"status": "500 Internal Server Error"}}] * 50,
                    }
                ).encode(),
                FHIR_JSON,
            ),
            "pending",
        ),
        # a 200 that is a login page
        (lambda _r: Reply(200, b"<html>Sign in</html>", {"Content-Type": "text/html"}), "dead"),
        # a redirect
        (lambda _r: Reply(302, b"", {"Location": "/login"}), "dead"),
    ],
    ids=["outcome-invalid", "outcome-transient", "entry-outcome", "entry-500", "html", "302"],
)
def test_a_transaction_that_failed_is_not_delivered(
    tmp_path: Path, catalog: Catalog, answer: Any, state: str
) -> None:
    with scripted(Ehr(answer=answer)) as server:
        outbox = _fhir_job(tmp_path, catalog, {"EHR": _ehr(server.url)})
        try:
            outbox.dispatch_due(wait=True)
        finally:
            outbox.stop()
    (row,) = _rows(catalog)
    assert row.state.value == state, row.last_error
    assert "PID-1" not in (row.last_error or "")  # the EHR's diagnostics are not kept
    assert len(server.of("POST")) == 1
    assert server.of("GET", "/login") == []


def test_each_ehr_gets_its_own_identifier_rules(tmp_path: Path, catalog: Catalog) -> None:
    with scripted(Ehr()) as first, scripted(Ehr()) as second:
        outbox = _fhir_job(
            tmp_path,
            catalog,
            {
                "EHR-A": _ehr(first.url, "urn:oid:1.1.1"),
                "EHR-B": _ehr(second.url, "urn:oid:2.2.2"),
            },
        )
        try:
            outbox.dispatch_due(wait=True)
        finally:
            outbox.stop()
    for server, system in ((first, "urn:oid:1.1.1"), (second, "urn:oid:2.2.2")):
        (search,) = server.of("GET", "/fhir/Patient")
        assert search.params["identifier"] == [f"{system}|PID-1"]
        (posted,) = server.of("POST", "/fhir")
        assert f"{system}|PID-1".encode() in posted.body
    with catalog.sessions() as session:
        rows = list_deliveries(session)
    assert sorted((d.destination, d.state) for d in rows) == [
        ("EHR-A", "delivered"),
        ("EHR-B", "delivered"),
    ]
