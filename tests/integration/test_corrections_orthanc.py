"""A result rejected after it went out, against a real Orthanc and a real FHIR server: the
operator's reject through the JSON API sends Orthanc the IOCM rejection note (a Key Object
Selection Document titled 113001) and sets the EHR's DiagnosticReport and Observations
entered-in-error; a re-run of the same result brings the one report back to preliminary."""

from __future__ import annotations

from typing import Any

import httpx
import pytest

from pacs_node.catalog.models import Role
from pacs_node.config import Settings
from pacs_node.destinations import DimseDestination, FhirDestination
from pacs_node.dispatch.outbox import Outbox
from pacs_node.results import FhirOptions, ResultOptions, build_results
from pacs_node.services import deliveries
from tests.catalog_factory import done_job_with_results
from tests.conftest import wait_for
from tests.integration.test_results_fhir_server import fhir_base
from tests.orthanc import OrthancProcess, orthanc
from tests.results_factory import phantom_study
from tests.web_node import WebNode, web_node

__all__ = ["fhir_base", "orthanc", "web_node"]

pytestmark = pytest.mark.integration

KOS = "1.2.840.10008.5.1.4.1.1.88.59"
FHIR_JSON = {"Content-Type": "application/fhir+json"}
DICOM_KINDS = ("seg", "sr", "gsps", "key-images", "pdf")


def _report(base: str) -> dict[str, Any]:
    (entry,) = httpx.get(f"{base}/DiagnosticReport", timeout=30).json()["entry"]
    report: dict[str, Any] = entry["resource"]
    return report


def _observation_statuses(base: str, report: dict[str, Any]) -> set[str]:
    return {
        httpx.get(f"{base}/{ref['reference']}", timeout=30).json()["status"]
        for ref in report["result"]
    }


def test_reject_after_delivery_withdraws_the_result_from_pacs_and_ehr(
    web_node: WebNode, orthanc: OrthancProcess, fhir_base: str
) -> None:
    volume, labelmap, info = phantom_study(shape=(8, 24, 24))
    built = build_results(volume, labelmap, info, ResultOptions(key_images=1))
    patient = {
        "resourceType": "Patient",
        "identifier": [{"system": FhirOptions().patient_system, "value": "PID-4711"}],
    }
    created = httpx.post(f"{fhir_base}/Patient", json=patient, headers=FHIR_JSON, timeout=30)
    assert created.status_code == 201, created.text
    settings = Settings(
        node=web_node.settings.node.model_copy(update={"delivery_backoff_s": 0.2}),
        destinations={
            "PACS": DimseDestination(
                type="dimse",
                ae_title=orthanc.ae_title,
                host="127.0.0.1",
                port=orthanc.dicom_port,
                storage_commitment=False,
            ),
            "EHR": FhirDestination(type="fhir", base_url=fhir_base),
        },
    )
    results_dir = settings.node.data_dir / "results"
    send = {**{kind: ["PACS"] for kind in DICOM_KINDS}, "fhir": ["EHR"]}
    job_id = done_job_with_results(web_node.catalog, results_dir, built, send)
    outbox = Outbox(web_node.catalog, settings)

    def settled() -> bool:
        outbox.dispatch_due(wait=True)
        rows = deliveries.list_deliveries(web_node.catalog)
        failing = [(r.kind, r.state, r.last_error) for r in rows if r.state in ("dead", "held")]
        assert not failing, failing
        return all(r.state == "delivered" for r in rows)

    wait_for(settled, 60, interval=0.2, what="the result in Orthanc and the EHR")
    assert _report(fhir_base)["status"] == "preliminary"

    with web_node.client(Role.OPERATOR) as client:
        answer = client.post(
            f"/api/jobs/{job_id}/reject", json={"reason": "segmentation off", "kind": "quality"}
        )
    assert answer.status_code == 200, answer.text
    rejection = answer.json()
    assert (rejection["dicom_destinations"], rejection["fhir_destinations"]) == (["PACS"], ["EHR"])
    wait_for(settled, 60, interval=0.2, what="the withdrawal in Orthanc and the EHR")

    found = httpx.get(
        f"{orthanc.dicomweb_url}/instances", params={"SOPClassUID": KOS}, timeout=30
    ).json()
    assert [item["00080018"]["Value"][0] for item in found] == [rejection["note_uid"]]
    assert found[0]["0020000D"]["Value"][0] == built.study_instance_uid
    (match,) = orthanc.post("/tools/lookup", content=rejection["note_uid"])
    tags = orthanc.get(f"/instances/{match['ID']}/simplified-tags")
    assert tags["ConceptNameCodeSequence"][0]["CodeValue"] == "113001"
    referenced = {
        item["ReferencedSOPInstanceUID"]
        for series in tags["CurrentRequestedProcedureEvidenceSequence"][0][
            "ReferencedSeriesSequence"
        ]
        for item in series["ReferencedSOPSequence"]
    }
    assert referenced == {o.sop_instance_uid for o in built.dicom}

    report = _report(fhir_base)
    assert report["status"] == "entered-in-error"
    assert _observation_statuses(fhir_base, report) == {"entered-in-error"}

    # a re-run gives the same result: the one report is updated, and preliminary again
    done_job_with_results(web_node.catalog, results_dir, built, {"fhir": ["EHR"]})
    wait_for(settled, 60, interval=0.2, what="the re-run's report in the EHR")
    report = _report(fhir_base)
    assert report["status"] == "preliminary"
    assert _observation_statuses(fhir_base, report) == {"preliminary"}
