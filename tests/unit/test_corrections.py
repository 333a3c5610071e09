"""The correction workflow: the IOCM rejection note (dciodvfy, highdicom, every rejected object,
the right title), the EHR's entered-in-error Bundle (R4B), and the reject / accept service with
its doors (deliveries stopped, withdrawals queued where the result went, the event, counts)."""

from __future__ import annotations

import io
import json
import logging
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import highdicom as hd
import pytest
from fhir.resources.R4B.bundle import Bundle
from pydicom import Dataset, dcmread
from sqlalchemy import select, update

from pacs_node.actor import Actor
from pacs_node.catalog.db import Catalog, open_catalog
from pacs_node.catalog.deliveries import (
    claim_due,
    mark_dead,
    mark_retry,
    reclaim_expired,
    reset_claims,
    retry_delivery,
)
from pacs_node.catalog.jobs import queue_job
from pacs_node.catalog.models import Delivery, DeliveryState, Job, JobEvent, Result, Role, utcnow
from pacs_node.catalog.quality import hold_for_quality
from pacs_node.config import NodeOptions, Settings
from pacs_node.errors import ResultsError
from pacs_node.imaging import Volume
from pacs_node.inference.labelmap import Labelmap, ModelInfo
from pacs_node.outputs import ROUTABLE, OutputKind
from pacs_node.results import ResultOptions, ResultSet, build_results
from pacs_node.results.fhir import bundle_json, withdrawal_bundle
from pacs_node.results.rejection import KEY_OBJECT_SELECTION, build_rejection_note
from pacs_node.review import RejectionKind
from pacs_node.services import corrections, deliveries
from pacs_node.worker import read_job
from tests.catalog_factory import done_job_with_results
from tests.conftest import run_cli
from tests.integration.test_results_objects import dciodvfy
from tests.results_factory import phantom_study
from tests.web_node import WebNode, web_node

__all__ = ["web_node"]

DICOM_KINDS = ("seg", "sr", "gsps", "key-images", "pdf")
SENT_TO = {**{kind: ["PACS"] for kind in DICOM_KINDS}, "fhir": ["EHR"]}
ALICE = Actor.user("alice")


@pytest.fixture(scope="module")
def source() -> tuple[Volume, Labelmap, ModelInfo]:
    return phantom_study(shape=(8, 24, 24))


@pytest.fixture(scope="module")
def built(source: tuple[Volume, Labelmap, ModelInfo]) -> ResultSet:
    return build_results(*source, ResultOptions(key_images=1))


@pytest.fixture
def catalog(tmp_path: Path) -> Iterator[Catalog]:
    opened = open_catalog(f"sqlite:///{tmp_path / 'c.sqlite'}")
    yield opened
    opened.dispose()


def _settings(tmp_path: Path) -> Settings:
    return Settings(node=NodeOptions(data_dir=tmp_path, fsync=False, min_free_mb=0))


def _headers(built: ResultSet) -> list[Dataset]:
    return [dcmread(io.BytesIO(o.data), stop_before_pixels=True) for o in built.dicom]


# ---------------------------------------------------------------- the rejection note


@pytest.mark.parametrize("kind", list(RejectionKind))
def test_rejection_note_is_a_valid_kos_referencing_every_rejected_object(
    built: ResultSet, kind: RejectionKind, tmp_path: Path
) -> None:
    headers = _headers(built)
    assert {str(h.SOPClassUID) for h in headers} >= {
        "1.2.840.10008.5.1.4.1.1.66.4",  # SEG
        "1.2.840.10008.5.1.4.1.1.88.34",  # Comprehensive 3D SR
        "1.2.840.10008.5.1.4.1.1.11.1",  # GSPS
        "1.2.840.10008.5.1.4.1.1.7",  # key images (Secondary Capture)
        "1.2.840.10008.5.1.4.1.1.104.1",  # PDF
    }
    note = build_rejection_note(headers, kind, datetime(2026, 3, 4, 5, 6, 7, tzinfo=UTC))
    buffer = io.BytesIO()
    note.save_as(buffer, enforce_file_format=True)
    dciodvfy(buffer.getvalue(), tmp_path)

    read = hd.ko.KeyObjectSelectionDocument.from_dataset(dcmread(io.BytesIO(buffer.getvalue())))
    assert read.SOPClassUID == KEY_OBJECT_SELECTION
    assert read.StudyInstanceUID == built.study_instance_uid
    assert read.PatientID == headers[0].PatientID
    title = read.ConceptNameCodeSequence[0]
    expected = {
        RejectionKind.QUALITY: ("113001", "Rejected for Quality Reasons"),
        RejectionKind.PATIENT_SAFETY: ("113037", "Rejected for Patient Safety Reasons"),
    }[kind]
    assert (title.CodeValue, title.CodingSchemeDesignator, title.CodeMeaning) == (
        expected[0],
        "DCM",
        expected[1],
    )
    evidence = {
        (series.SeriesInstanceUID, item.ReferencedSOPClassUID, item.ReferencedSOPInstanceUID)
        for study in read.CurrentRequestedProcedureEvidenceSequence
        for series in study.ReferencedSeriesSequence
        for item in series.ReferencedSOPSequence
    }
    assert evidence == {(h.SeriesInstanceUID, h.SOPClassUID, h.SOPInstanceUID) for h in headers}
    referenced = {
        item.ReferencedSOPSequence[0].ReferencedSOPInstanceUID for item in read.ContentSequence
    }
    assert referenced == {h.SOPInstanceUID for h in headers}
    for header in headers:
        assert read.resolve_reference(header.SOPInstanceUID)[0] == built.study_instance_uid


def test_rejection_note_uids_are_deterministic(built: ResultSet) -> None:
    headers = _headers(built)
    first = build_rejection_note(headers, RejectionKind.QUALITY, datetime.now(UTC))
    again = build_rejection_note(headers[::-1], RejectionKind.QUALITY, datetime.now(UTC))
    other = build_rejection_note(headers, RejectionKind.PATIENT_SAFETY, datetime.now(UTC))
    assert first.SOPInstanceUID == again.SOPInstanceUID
    assert first.SeriesInstanceUID == again.SeriesInstanceUID
    assert other.SOPInstanceUID != first.SOPInstanceUID
    assert OutputKind.REJECTION not in ROUTABLE  # a person's decision, never a route's


# ---------------------------------------------------------------- the EHR's withdrawal


def test_withdrawal_bundle_sets_report_and_observations_entered_in_error(
    built: ResultSet,
) -> None:
    sent = Bundle.model_validate_json(built.fhir_bundle)
    withdrawal = Bundle.model_validate_json(
        bundle_json(withdrawal_bundle(built.fhir_bundle, "Rejected for Quality Reasons"))
    )
    assert withdrawal.type == "transaction"
    assert len(withdrawal.entry) == len(sent.entry)
    withdrawn = 0
    for before, after in zip(sent.entry, withdrawal.entry, strict=True):
        kind = after.resource.get_resource_type()
        assert after.fullUrl == before.fullUrl  # the references still resolve
        if kind not in ("DiagnosticReport", "Observation"):
            assert after.request == before.request
            assert after.resource == before.resource
            continue
        withdrawn += 1
        identifier = after.resource.identifier[0]
        assert after.resource.status == "entered-in-error"
        assert after.request.method == "PUT"
        assert after.request.url == f"{kind}?identifier={identifier.system}|{identifier.value}"
        assert identifier == before.resource.identifier[0]
        if kind == "DiagnosticReport":
            assert after.resource.conclusion.startswith(
                "Entered in error: Rejected for Quality Reasons."
            )
    assert withdrawn == 1 + sum(
        1 for e in sent.entry if e.resource.get_resource_type() == "Observation"
    )


def test_a_rerun_after_a_reject_gets_new_uids_and_the_same_report(
    source: tuple[Volume, Labelmap, ModelInfo], built: ResultSet
) -> None:
    again = build_results(*source, ResultOptions(key_images=1))
    revised = build_results(*source, ResultOptions(key_images=1, revision=1))
    assert [o.sop_instance_uid for o in again.dicom] == [o.sop_instance_uid for o in built.dicom]
    assert not {o.sop_instance_uid for o in revised.dicom} & {
        o.sop_instance_uid for o in built.dicom
    }

    def report(result: ResultSet) -> Any:
        bundle = Bundle.model_validate_json(result.fhir_bundle)
        (entry,) = [e for e in bundle.entry if e.resource.get_resource_type() == "DiagnosticReport"]
        return entry.request.url

    assert report(revised) == report(built)  # the EHR's one report, updated


# ---------------------------------------------------------------- the service


def test_a_job_after_a_rejected_one_is_a_new_revision(
    catalog: Catalog, built: ResultSet, tmp_path: Path
) -> None:
    settings = _settings(tmp_path)
    first = done_job_with_results(catalog, tmp_path / "results", built, SENT_TO)
    corrections.reject_results(catalog, settings, first, ALICE, "")
    with catalog.sessions.begin() as session:
        study_id = session.scalar(select(Job.study_id).where(Job.id == first))
        assert study_id is not None
        rerun = queue_job(session, study_id, "m", ["1.2.3.4"], {})
        other_series = queue_job(session, study_id, "m", ["1.2.3.5"], {})
    assert read_job(catalog, settings, rerun).revision == 1
    assert read_job(catalog, settings, other_series).revision == 0


def _deliveries(catalog: Catalog, job_id: int) -> dict[tuple[str, str], str]:
    with catalog.sessions() as session:
        rows = session.execute(
            select(Result.kind, Delivery.destination, Delivery.state)
            .join(Result, Result.id == Delivery.result_id)
            .where(Delivery.job_id == job_id)
        ).all()
    states: dict[tuple[str, str], str] = {}
    for kind, destination, state in rows:
        states.setdefault((kind, destination), state.value)
    return states


def _deliver(catalog: Catalog, job_id: int, *kinds: str) -> None:
    with catalog.sessions.begin() as session:
        ids = select(Result.id).where(Result.job_id == job_id, Result.kind.in_(kinds))
        session.execute(
            update(Delivery)
            .where(Delivery.result_id.in_(ids))
            .values(state=DeliveryState.DELIVERED, delivered_at=utcnow())
        )


def _events(catalog: Catalog, job_id: int, kind: str) -> list[dict[str, Any]]:
    with catalog.sessions() as session:
        return [
            e.detail or {}
            for e in session.scalars(
                select(JobEvent).where(JobEvent.job_id == job_id, JobEvent.kind == kind)
            )
        ]


def test_reject_withdraws_what_went_out_and_stops_the_rest(
    catalog: Catalog, built: ResultSet, tmp_path: Path
) -> None:
    settings = _settings(tmp_path)
    results_dir = tmp_path / "results"
    job_id = done_job_with_results(catalog, results_dir, built, SENT_TO, "2.1.0")
    _deliver(catalog, job_id, "seg", "sr", "fhir")  # the rest is still pending

    done = corrections.reject_results(
        catalog, settings, job_id, ALICE, "liver traced into the kidney", "patient-safety"
    )

    assert done.kind is RejectionKind.PATIENT_SAFETY
    assert done.stopped == 3  # gsps, key images, pdf
    assert done.dicom_destinations == ("PACS",)
    assert done.fhir_destinations == ("EHR",)
    states = _deliveries(catalog, job_id)
    assert states[("gsps", "PACS")] == states[("pdf", "PACS")] == "rejected"
    assert states[("seg", "PACS")] == states[("fhir", "EHR")] == "delivered"
    assert states[("rejection", "PACS")] == states[("rejection", "EHR")] == "pending"
    with catalog.sessions() as session:
        assert session.scalar(select(Job.qa_decision).where(Job.id == job_id)) == "rejected"
        rows = session.scalars(select(Result).where(Result.kind == "rejection")).all()
    (note_row,) = [r for r in rows if r.sop_class_uid]
    (fhir_row,) = [r for r in rows if not r.sop_class_uid]
    assert note_row.sop_class_uid == KEY_OBJECT_SELECTION
    assert note_row.sop_instance_uid == done.note_uid
    note = dcmread(results_dir / next(iter(note_row.encodings.values())))
    assert note.ConceptNameCodeSequence[0].CodeValue == "113037"
    rejected = {
        item.ReferencedSOPInstanceUID
        for series in note.CurrentRequestedProcedureEvidenceSequence[0].ReferencedSeriesSequence
        for item in series.ReferencedSOPSequence
    }
    assert rejected == {o.sop_instance_uid for o in built.dicom}  # sent or not
    bundle = json.loads((results_dir / next(iter(fhir_row.encodings.values()))).read_bytes())
    Bundle.model_validate(bundle)
    statuses = {
        e["resource"]["resourceType"]: e["resource"]["status"]
        for e in bundle["entry"]
        if e["resource"]["resourceType"] in ("DiagnosticReport", "Observation")
    }
    assert statuses == {"DiagnosticReport": "entered-in-error", "Observation": "entered-in-error"}
    assert fhir_row.destination == "EHR"
    assert fhir_row.patient_search == built.patient_search

    (event,) = _events(catalog, job_id, "rejected")
    assert event["actor"] == "user:alice"
    assert event["reason_text"] == "liver traced into the kidney"
    assert (event["code"], event["meaning"]) == ("113037", "Rejected for Patient Safety Reasons")
    assert (event["model"], event["model_version"]) == ("m", "2.1.0")
    assert event["deliveries"] == 3

    with pytest.raises(corrections.ReviewRefused, match="rejected already"):
        corrections.reject_results(catalog, settings, job_id, ALICE, "again")
    with pytest.raises(corrections.ReviewRefused, match="re-run"):
        corrections.accept_results(catalog, job_id, ALICE)
    with pytest.raises(corrections.UnknownJob):
        corrections.reject_results(catalog, settings, 999, ALICE, "")


def test_reject_of_nothing_sent_only_marks_and_stops(
    catalog: Catalog, built: ResultSet, tmp_path: Path
) -> None:
    job_id = done_job_with_results(catalog, tmp_path / "results", built, SENT_TO)
    done = corrections.reject_results(catalog, _settings(tmp_path), job_id, ALICE, "noise")
    assert done.stopped == len(built.dicom) + 1
    assert (done.note_uid, done.dicom_destinations, done.fhir_destinations) == (None, (), ())
    assert set(_deliveries(catalog, job_id).values()) == {"rejected"}
    assert not (tmp_path / "results" / str(job_id) / "rejection").exists()
    (event,) = _events(catalog, job_id, "rejected")
    assert (event["code"], event["model_version"]) == ("113001", "1.0.0")


def test_reject_of_an_older_result_leaves_the_newer_report_alone(
    catalog: Catalog, built: ResultSet, tmp_path: Path
) -> None:
    two_ehrs = {**SENT_TO, "fhir": ["EHR", "EHR2"]}
    older, newer = (
        done_job_with_results(catalog, tmp_path / "results", built, two_ehrs) for _ in range(2)
    )
    _deliver(catalog, older, *DICOM_KINDS, "fhir")
    with catalog.sessions.begin() as session:  # EHR's one report now holds the newer result
        session.execute(
            update(Delivery)
            .where(Delivery.job_id == newer, Delivery.destination == "EHR")
            .values(state=DeliveryState.DELIVERED, delivered_at=utcnow())
        )
    done = corrections.reject_results(catalog, _settings(tmp_path), older, ALICE, "")
    assert (done.dicom_destinations, done.fhir_destinations) == (("PACS",), ("EHR2",))
    assert done.fhir_kept == ("EHR",)
    states = _deliveries(catalog, older)
    assert ("rejection", "EHR") not in states
    assert states[("rejection", "EHR2")] == "pending"  # the newer Bundle has not reached it
    (event,) = _events(catalog, older, "rejected")
    assert event["fhir_kept"] == ["EHR"]


def test_a_newer_result_not_yet_at_the_ehr_does_not_stop_the_withdrawal(
    catalog: Catalog, built: ResultSet, tmp_path: Path
) -> None:
    older, newer = (
        done_job_with_results(catalog, tmp_path / "results", built, SENT_TO) for _ in range(2)
    )
    _deliver(catalog, older, *DICOM_KINDS, "fhir")
    _deliver(catalog, newer, *DICOM_KINDS)  # at the PACS; its Bundle still pending to the EHR
    done = corrections.reject_results(catalog, _settings(tmp_path), older, ALICE, "")
    assert (done.fhir_destinations, done.fhir_kept) == (("EHR",), ())
    assert _deliveries(catalog, older)[("rejection", "EHR")] == "pending"


def test_a_rejected_result_is_never_claimed_again_nor_retried(
    catalog: Catalog, built: ResultSet, tmp_path: Path
) -> None:
    to_pacs = {kind: ["PACS"] for kind in ("seg", "sr", "gsps")}
    job_id = done_job_with_results(catalog, tmp_path / "results", built, to_pacs)
    now = utcnow()
    with catalog.sessions.begin() as session:  # all three are being sent when the reject comes
        (restarted,) = claim_due(session, "PACS", 1, now, "node/1/a", now + timedelta(hours=1))
        assert len(claim_due(session, "PACS", 1, now, "node/2/b", now - timedelta(seconds=1))) == 1
        (failing,) = claim_due(session, "PACS", 1, now, "node/3/c", now + timedelta(hours=1))
    done = corrections.reject_results(catalog, _settings(tmp_path), job_id, ALICE, "wrong")
    assert done.stopped == 0
    with catalog.sessions.begin() as session:
        mark_dead(session, failing, "refused")
        assert reset_claims(session, [restarted.claimed_by or ""]) == 1
        assert reclaim_expired(session, utcnow()) == 1
    with catalog.sessions.begin() as session:
        claimed = claim_due(session, "PACS", 10, utcnow(), "node/4/d")
    assert [c.kind for c in claimed] == ["rejection"]  # only the note that withdraws it
    states = _deliveries(catalog, job_id)
    assert states[("seg", "PACS")] == states[("sr", "PACS")] == "rejected"
    with catalog.sessions.begin() as session:
        assert not retry_delivery(session, failing.delivery_id, ALICE)
    assert _deliveries(catalog, job_id)[("gsps", "PACS")] == "dead"


def test_a_reject_is_recorded_though_the_stored_results_cannot_be_read(
    catalog: Catalog, built: ResultSet, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    results_dir = tmp_path / "results"
    job_id = done_job_with_results(catalog, results_dir, built, SENT_TO)
    _deliver(catalog, job_id, "seg", "fhir")
    with catalog.sessions.begin() as session:  # a job run before the version was kept
        session.execute(
            update(JobEvent)
            .where(JobEvent.job_id == job_id, JobEvent.kind == "done")
            .values(detail={})
        )
    for path in (results_dir / str(job_id)).rglob("*.*"):
        path.write_bytes(b"junk")
    with caplog.at_level(logging.WARNING, logger="pacs_node.services.corrections"):
        done = corrections.reject_results(catalog, _settings(tmp_path), job_id, ALICE, "bad")
    assert (done.note_uid, done.dicom_destinations, done.fhir_destinations) == (None, (), ())
    assert done.not_withdrawn == ("PACS", "EHR")
    assert done.stopped == len(built.dicom) - 1
    states = _deliveries(catalog, job_id)
    assert states[("pdf", "PACS")] == "rejected"
    assert ("rejection", "PACS") not in states
    (event,) = _events(catalog, job_id, "rejected")
    assert event["model_version"] is None
    assert _events(catalog, job_id, "not_withdrawn") == [{"destinations": ["PACS", "EHR"]}]
    levels = {r.levelname for r in caplog.records}
    assert levels >= {"WARNING", "ERROR"}
    assert built.patient_search not in caplog.text


def test_a_failed_attempt_after_the_reject_ends_the_delivery(
    catalog: Catalog, built: ResultSet, tmp_path: Path
) -> None:
    job_id = done_job_with_results(catalog, tmp_path / "results", built, {"seg": ["PACS"]})
    with catalog.sessions.begin() as session:
        (sending,) = claim_due(session, "PACS", 10, utcnow())
    done = corrections.reject_results(catalog, _settings(tmp_path), job_id, ALICE, "wrong")
    assert done.dicom_destinations == ("PACS",)  # it may arrive: the note follows it
    with catalog.sessions.begin() as session:
        mark_retry(session, sending, "association aborted", utcnow())
    assert _deliveries(catalog, job_id)[("seg", "PACS")] == "rejected"  # never sent again
    assert _deliveries(catalog, job_id)[("rejection", "PACS")] == "pending"


def test_quality_gate_reject_and_accept_are_the_review_path(
    catalog: Catalog, built: ResultSet, tmp_path: Path
) -> None:
    failed = [{"check": "c", "label": "l", "message": "m"}]
    held, released, other = (
        done_job_with_results(catalog, tmp_path / "results", built, SENT_TO, version, model)
        for version, model in (("1.0.0", "m"), ("1.0.0", "m"), ("2.0.0", "m2"))
    )
    with catalog.sessions.begin() as session:
        hold_for_quality(session, held, failed)
        hold_for_quality(session, released, failed)
    bob = Actor.user("bob")
    assert deliveries.reject_result(catalog, held, bob, "blurred") == len(SENT_TO)
    (event,) = _events(catalog, held, "rejected")
    assert (event["actor"], event["code"], event["reason_text"]) == (
        "user:bob",
        "113001",
        "blurred",
    )
    assert set(_deliveries(catalog, held).values()) == {"rejected"}

    accepted = corrections.accept_results(catalog, released, bob)
    assert accepted.released == len(SENT_TO)  # the held result is sent now
    assert set(_deliveries(catalog, released).values()) == {"pending"}
    assert corrections.accept_results(catalog, other, bob).released == 0
    assert [c.as_json() for c in corrections.review_counts(catalog)] == [
        {"model": "m", "model_version": "1.0.0", "accepted": 1, "rejected": 1},
        {"model": "m2", "model_version": "2.0.0", "accepted": 1, "rejected": 0},
    ]
    corrections.reject_results(catalog, _settings(tmp_path), other, bob, "on second look")
    counts = {c.model_version: (c.accepted, c.rejected) for c in corrections.review_counts(catalog)}
    assert counts == {"1.0.0": (1, 1), "2.0.0": (0, 1)}  # each job's latest review counts


# ---------------------------------------------------------------- the JSON API


def test_api_rejects_accepts_and_counts(web_node: WebNode, built: ResultSet) -> None:
    results_dir = web_node.settings.node.data_dir / "results"
    rejected = done_job_with_results(web_node.catalog, results_dir, built, SENT_TO)
    accepted = done_job_with_results(web_node.catalog, results_dir, built, SENT_TO)
    _deliver(web_node.catalog, rejected, *DICOM_KINDS)
    body = {"reason": "wrong patient", "kind": "patient-safety"}
    with web_node.client(Role.VIEWER) as viewer:
        assert viewer.post(f"/api/jobs/{rejected}/reject", json=body).status_code == 403
        assert viewer.post(f"/api/jobs/{accepted}/accept").status_code == 403
        assert viewer.get("/api/reviews").json() == []
    with web_node.client(role=None) as anonymous:
        assert anonymous.post(f"/api/jobs/{rejected}/reject", json=body).status_code == 401
    with web_node.client(Role.OPERATOR) as operator:
        answer = operator.post(f"/api/jobs/{rejected}/reject", json=body)
        assert answer.status_code == 200, answer.text
        assert answer.json()["code"] == "113037"
        assert answer.json()["dicom_destinations"] == ["PACS"]
        assert answer.json()["stopped"] == 1  # the FHIR Bundle, never sent
        assert operator.post(f"/api/jobs/{rejected}/reject", json=body).status_code == 409
        assert operator.post("/api/jobs/999/reject", json=body).status_code == 404
        for bad_body in ({"reason": "x", "kind": "whim"}, {}, {"reason": ""}, {"reason": "  "}):
            bad = operator.post(f"/api/jobs/{accepted}/reject", json=bad_body)
            assert bad.status_code == 422, bad_body
        for path in (
            f"/api/jobs/{2**70}/reject",
            f"/api/jobs/{2**70}/accept",
            "/api/jobs/0/accept",
        ):
            assert operator.post(path, json=body).status_code == 422, path
        assert operator.post(f"/api/jobs/{accepted}/accept").json() == {
            "job_id": accepted,
            "released": 0,
        }
        counts = operator.get("/api/reviews").json()
    assert counts == [{"model": "m", "model_version": "1.0.0", "accepted": 1, "rejected": 1}]
    (event,) = _events(web_node.catalog, rejected, "rejected")
    assert event["actor"] == "user:test-operator"


def test_api_answers_409_when_the_node_refuses(
    web_node: WebNode, monkeypatch: pytest.MonkeyPatch
) -> None:
    def failing(*_args: Any, **_kwargs: Any) -> corrections.Rejection:
        raise ResultsError("a stored result cannot be written")

    monkeypatch.setattr(corrections, "reject_results", failing)
    with web_node.client(Role.OPERATOR) as operator:
        answer = operator.post("/api/jobs/1/reject", json={"reason": "wrong"})
    assert answer.status_code == 409
    assert "cannot be written" in answer.text


# ---------------------------------------------------------------- the command line


def test_cli_rejects_for_patient_safety_and_accepts(built: ResultSet, tmp_path: Path) -> None:
    config, data = tmp_path / "cfg", tmp_path / "var"
    config.mkdir()
    (config / "node.yaml").write_text(f"data_dir: {data}\nfsync: false\n")
    catalog = open_catalog(f"sqlite:///{(data / 'catalog.sqlite').resolve()}")
    try:
        rejected = done_job_with_results(catalog, data / "results", built, SENT_TO)
        accepted = done_job_with_results(catalog, data / "results", built, SENT_TO, "1", "m2")
        _deliver(catalog, rejected, "seg")
    finally:
        catalog.dispose()
    cfg = ("--config", str(config), "--actor", "dr.house")

    reject = ("results", "reject", str(rejected), "--reason", "another patient's CT")
    ran = run_cli(*reject, "--patient-safety", *cfg)
    assert "rejection note (Rejected for Patient Safety Reasons) queued to PACS" in ran.stderr
    assert "report entered-in-error" not in ran.stderr  # the Bundle never went out
    assert "accepted" in run_cli("results", "accept", str(accepted), *cfg).stderr

    catalog = open_catalog(f"sqlite:///{(data / 'catalog.sqlite').resolve()}")
    try:
        (event,) = _events(catalog, rejected, "rejected")
        assert (event["actor"], event["code"]) == ("user:dr.house", "113037")
        assert event["reason_text"] == "another patient's CT"
        assert _deliveries(catalog, rejected)[("rejection", "PACS")] == "pending"
        counts = [(c.model, c.accepted, c.rejected) for c in corrections.review_counts(catalog)]
        assert counts == [("m", 0, 1), ("m2", 1, 0)]
    finally:
        catalog.dispose()
