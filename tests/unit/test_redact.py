"""Stored reasons: what helps an operator stays, anything that could identify a patient goes."""

from __future__ import annotations

import httpx
import pytest
from hypothesis import given
from hypothesis import strategies as st

from pacs_node.redact import GAP, MAX_REASON, scrub_detail, scrub_reason

KEPT = [
    "the worker died 3 times (last in stage infer); giving up",
    "decode: series 1.2.3.999 has no stored instances",
    "FHIR: ConnectError: [Errno 111] Connection refused",
    "FHIR transaction: ConnectError: [SSL: CERTIFICATE_VERIFY_FAILED] certificate verify failed",
    "TLS files cannot be used: FileNotFoundError",
    "STOW-RS refused 1.2.826.0.1.3680043.8.498.1 (409)",
    "storage commitment failed (reason 0x0110)",
    "the EHR has no Patient with the study's patient identifier",
    "gave up after 12 attempts: HTTP 503 from FHIR transaction",
    "no space left on device",
    "store: TypeError: unsupported type (worker.py:281)",
]

# (raw text, what must not survive)
REMOVED = [
    (
        (
            "HTTP 404 from Patient search: Client error '404 Not Found' for url "
            "'http://ehr.local:8080/fhir/Patient?identifier=urn:oid:1.2.3|MRN778899'"
        ),
        ["MRN778899", "identifier=", "Patient?"],
    ),
    (
        (
            'HTTP 400 from FHIR transaction: {"resourceType": "OperationOutcome", "issue": '
            '[{"severity": "error", "diagnostics": "Patient Doe, Jane born 1970-01-31 not found"}]}'
        ),
        ["Doe", "Jane", "1970", "diagnostics"],
    ),
    ("store: ValueError: Invalid value for VR PN: 'DOE^JANE'", ["DOE", "JANE"]),
    ("patient SMITH^JOHN id 99887766 born 01.02.1970", ["SMITH", "JOHN", "99887766", "1970"]),
    ("identifier 123-45-6789 not unique", ["6789", "123-45"]),
    ("C-STORE failed: association aborted by Baker Long", ["Baker", "Long"]),
    ("<html><title>Login</title><body>Hello Dr. Who</body></html>", ["Hello", "Who", "html"]),
    ("redirected to https://sso.example/login?user=jdoe&next=/Patient/42", ["jdoe", "Patient/42"]),
]


@pytest.mark.parametrize("text", KEPT)
def test_the_nodes_own_reasons_are_kept(text: str) -> None:
    assert scrub_reason(text) == text


@pytest.mark.parametrize(("text", "gone"), REMOVED)
def test_patient_data_is_removed(text: str, gone: list[str]) -> None:
    scrubbed = scrub_reason(text)
    for value in gone:
        assert value not in scrubbed
    assert GAP in scrubbed


def test_exceptions_keep_their_class_and_status() -> None:
    request = httpx.Request("GET", "http://ehr.local/fhir/Patient?identifier=sys|A-77812")
    response = httpx.Response(404, request=request)
    error = httpx.HTTPStatusError(
        "Not Found for 'Patient A-77812'", request=request, response=response
    )
    assert scrub_reason(error) == f"HTTPStatusError: Not Found for {GAP}"
    assert scrub_reason(httpx.ReadTimeout("timed out")) == "ReadTimeout: timed out"
    assert scrub_reason(KeyError("PatientName")) == "KeyError"
    assert scrub_reason(httpx.ConnectError("url http://ehr.local:8443/a?b=JDOE")) == (
        f"ConnectError: url http://ehr.local:8443/{GAP}"
    )


def test_known_names_survive_even_quoted() -> None:
    text = "destination 'PACS_MAIN' is not configured; model 'ct-torso-organs' missing MRN4"
    scrubbed = scrub_reason(text, known=("PACS_MAIN", "ct-torso-organs"))
    assert (
        scrubbed
        == f"destination 'PACS_MAIN' is not configured; model 'ct-torso-organs' missing {GAP}"
    )
    assert "PACS_MAIN" not in scrub_reason(text)


@given(st.text(max_size=600))
def test_any_text_becomes_one_bounded_idempotent_line(text: str) -> None:
    scrubbed = scrub_reason(text)
    assert len(scrubbed) <= MAX_REASON
    assert "\n" not in scrubbed
    assert "\r" not in scrubbed
    assert scrub_reason(scrubbed) == scrubbed


@given(
    st.lists(st.sampled_from(KEPT), min_size=1, max_size=3),
    st.from_regex(r"[A-Z]{2,12}\^[A-Z]{2,12}|[0-9]{6,10}|MRN[0-9]{3,8}", fullmatch=True),
)
def test_an_identifier_anywhere_never_survives(parts: list[str], identifier: str) -> None:
    text = f" {identifier} ".join(parts) + f" ({identifier})"
    assert identifier not in scrub_reason(text)


def test_event_details_scrub_only_their_free_text() -> None:
    detail = {
        "destination": "EHR_MAIN",
        "error": "EHR_MAIN refused: Patient DOE^JANE unknown",
        "instances": 3,
        "reason": "quiet period",
    }
    assert scrub_detail(detail) == {
        "destination": "EHR_MAIN",
        "error": f"EHR_MAIN refused: Patient {GAP} unknown",
        "instances": 3,
        "reason": "quiet period",
    }
