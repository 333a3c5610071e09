"""STOW-RS and FHIR delivery from the outbox to real servers: Orthanc's DICOMweb plugin takes
the stored SEG and SR; a FHIR server that does not know the patient leaves the Bundle held,
and once the EHR has the patient a retry by hand delivers it."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from pacs_node.catalog.db import open_catalog
from pacs_node.catalog.deliveries import list_deliveries, retry_delivery
from pacs_node.catalog.jobs import queue_job
from pacs_node.config import NodeOptions, Settings
from pacs_node.destinations import DicomWebDestination, FhirDestination
from pacs_node.dispatch.outbox import Outbox
from pacs_node.results import FhirOptions
from pacs_node.worker import run_burst
from tests.catalog_factory import ingest
from tests.conftest import free_port
from tests.dicom_factory import write_series
from tests.integration.test_results_fhir_server import fhir_base  # noqa: F401 (fixture)
from tests.orthanc import OrthancProcess

pytestmark = pytest.mark.integration

ROOT = Path(__file__).resolve().parents[2]
FHIR_JSON = {"Content-Type": "application/fhir+json"}


@pytest.fixture
def orthanc(tmp_path: Path) -> Iterator[OrthancProcess]:
    process = OrthancProcess(tmp_path / "orthanc", free_port(), free_port(), dicomweb=True)
    process.start()
    yield process
    process.stop()


def test_stow_and_fhir_deliveries(
    tmp_path: Path,
    orthanc: OrthancProcess,
    fhir_base: str,  # noqa: F811
) -> None:
    system = FhirOptions().patient_system
    settings = Settings(
        node=NodeOptions(data_dir=tmp_path / "var", models_dir=ROOT / "models", fsync=False),
        destinations={
            "WEB": DicomWebDestination(type="dicomweb", url=f"{orthanc.url}/dicom-web"),
            "EHR": FhirDestination(type="fhir", base_url=fhir_base, patient_system=system),
        },
    )
    catalog = open_catalog(settings.node.catalog_url)
    try:
        paths = write_series(tmp_path / "ct", slices=8, rows=48, columns=48, spacing=(5, 5, 5))
        study_id, study_uid, series = ingest(catalog, settings.node.spool_dir, paths)
        with catalog.sessions.begin() as session:
            queue_job(
                session,
                study_id,
                "ct-classical",
                series,
                {"seg": ["WEB"], "sr": ["WEB"], "fhir": ["EHR"]},
            )
        assert len(run_burst(catalog, settings)) == 1
        outbox = Outbox(catalog, settings)
        try:
            outbox.dispatch_due(wait=True)
            with catalog.sessions() as session:
                rows = {d.kind: d for d in list_deliveries(session)}
            assert rows["seg"].state == "delivered"
            assert rows["sr"].state == "delivered"
            assert (rows["fhir"].state, rows["fhir"].held_for) == ("held", "patient")
            qido = httpx.get(
                f"{orthanc.url}/dicom-web/studies/{study_uid}/instances", timeout=30
            ).json()
            stored = {item["00080018"]["Value"][0] for item in qido}
            assert stored == {rows["seg"].sop_instance_uid, rows["sr"].sop_instance_uid}

            patient = {
                "resourceType": "Patient",
                "identifier": [{"system": system, "value": "TEST-0001"}],
            }
            created = httpx.post(f"{fhir_base}/Patient", json=patient, headers=FHIR_JSON)
            assert created.status_code == 201, created.text
            with catalog.sessions.begin() as session:
                assert retry_delivery(session, rows["fhir"].id)
            outbox.dispatch_due(wait=True)
            with catalog.sessions() as session:
                after = {d.kind: d for d in list_deliveries(session)}
            assert after["fhir"].state == "delivered"
            assert after["fhir"].attempts == 1  # counted afresh after the retry by hand
            reports = httpx.get(f"{fhir_base}/DiagnosticReport", timeout=30).json()
            assert len(reports.get("entry", [])) == 1
        finally:
            outbox.stop()
    finally:
        catalog.dispose()
