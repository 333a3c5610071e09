"""The FHIR Bundle against a real FHIR R4 server (sekmet-fhir, in its own venv).

The EHR holds the Patient and the ServiceRequest; posting the Bundle twice leaves one
DiagnosticReport; a study whose patient the server does not know is refused as a whole (the
transaction rolls back), which dispatch shows as a held delivery, and nothing is created.
"""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from pacs_node.results import ResultOptions, build_results
from tests.conftest import free_port, wait_for
from tests.results_factory import phantom_study

pytestmark = pytest.mark.integration

ROOT = Path(__file__).resolve().parents[2]
FHIR_VENV = Path(os.environ.get("PACS_NODE_FHIR_VENV", ROOT / ".venv-fhir"))
SEKMET = FHIR_VENV / "bin" / "sekmet"
JSON = {"Content-Type": "application/fhir+json"}


def _ensure_sekmet() -> None:
    """sekmet-fhir gets a venv of its own: its pins must not touch the node's. ``make test``
    installs it first; a server that cannot be installed fails the test."""
    if SEKMET.exists():
        return
    subprocess.run([sys.executable, "-m", "venv", str(FHIR_VENV)], check=True, timeout=120)
    install = subprocess.run(
        [str(FHIR_VENV / "bin" / "pip"), "install", "--quiet", "sekmet-fhir"],
        capture_output=True,
        text=True,
        timeout=600,
        check=False,
    )
    if install.returncode != 0 or not SEKMET.exists():  # `make fhir-server` installs it first
        pytest.fail(f"sekmet-fhir could not be installed: {install.stderr[-500:]}")


class FhirServer:
    """sekmet-fhir serving ``http://127.0.0.1:PORT/fhir`` until :meth:`stop`."""

    def __init__(self, workdir: Path, port: int) -> None:
        _ensure_sekmet()
        self.workdir = workdir
        self.root = f"http://127.0.0.1:{port}"
        self.base = f"{self.root}/fhir"
        workdir.mkdir(parents=True, exist_ok=True)
        log = (workdir / "server.log").open("wb")
        self.process = subprocess.Popen(
            [str(SEKMET), "serve", "--host", "127.0.0.1", "--port", str(port)],
            cwd=workdir,
            env={**os.environ, "SEKMET_BASE_URL": self.root},
            stdout=log,
            stderr=log,
        )
        try:
            wait_for(self._ready, 60, what="the FHIR server")
        except BaseException:
            self.stop()
            raise

    def _ready(self) -> bool:
        if self.process.poll() is not None:
            raise AssertionError((self.workdir / "server.log").read_text())
        try:
            return httpx.get(f"{self.base}/metadata", timeout=1).status_code == 200
        except httpx.HTTPError:
            return False

    def stop(self) -> None:
        self.process.terminate()
        self.process.wait(30)


@pytest.fixture(scope="module")
def fhir_base(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    server = FhirServer(tmp_path_factory.mktemp("sekmet"), free_port())
    try:
        yield server.base
    finally:
        server.stop()


def _count(base: str, resource: str) -> int:
    bundle = httpx.get(f"{base}/{resource}", timeout=30).json()
    return len(bundle.get("entry", []))


def test_bundle_posted_twice_leaves_one_report(fhir_base: str) -> None:
    options = ResultOptions(key_images=1)
    volume, labelmap, info = phantom_study(shape=(10, 32, 32))
    result = build_results(volume, labelmap, info, options)
    system = options.fhir.patient_system
    patient = {
        "resourceType": "Patient",
        "identifier": [{"system": system, "value": "PID-4711"}],
        "name": [{"family": "Doe", "given": ["Jane"]}],
    }
    order = {
        "resourceType": "ServiceRequest",
        "status": "active",
        "intent": "order",
        "identifier": [{"system": options.fhir.accession_system, "value": "ACC-77"}],
        "subject": {"reference": f"Patient?identifier={system}|PID-4711"},
        "code": {"text": "CT abdomen"},
    }
    created = httpx.post(f"{fhir_base}/Patient", json=patient, headers=JSON, timeout=30)
    assert created.status_code == 201, created.text
    patient_id = created.json()["id"]
    order["subject"] = {"reference": f"Patient/{patient_id}"}
    assert httpx.post(
        f"{fhir_base}/ServiceRequest", json=order, headers=JSON, timeout=30
    ).is_success
    for _ in range(2):  # a retry re-sends the same stored bytes
        response = httpx.post(fhir_base, content=result.fhir_bundle, headers=JSON, timeout=60)
        assert response.status_code == 200, response.text
    assert _count(fhir_base, "DiagnosticReport") == 1
    reports = httpx.get(f"{fhir_base}/DiagnosticReport", timeout=30).json()["entry"]
    report = reports[0]["resource"]
    assert report["subject"]["reference"] == f"Patient/{patient_id}"
    assert report["status"] == "preliminary"
    assert _count(fhir_base, "Patient") == 1
    assert _count(fhir_base, "ImagingStudy") == 1
    assert _count(fhir_base, "Device") == 1
    searched = httpx.get(f"{fhir_base}/Patient", params={"identifier": f"{system}|PID-4711"})
    assert len(searched.json().get("entry", [])) == 1


def test_unknown_patient_is_refused_and_nothing_is_created(fhir_base: str) -> None:
    volume, labelmap, info = phantom_study(shape=(10, 32, 32))
    options = ResultOptions(key_images=1)
    result = build_results(volume, labelmap, info, options)
    stranger = result.fhir_bundle.replace(b"PID-4711", b"PID-UNKNOWN")
    before = _count(fhir_base, "DiagnosticReport")
    response = httpx.post(fhir_base, content=stranger, headers=JSON, timeout=60)
    assert 400 <= response.status_code < 500  # dispatch holds the delivery, never guesses
    assert response.json()["resourceType"] == "OperationOutcome"
    assert _count(fhir_base, "DiagnosticReport") == before
    lookup = httpx.get(
        f"{fhir_base}/Patient",
        params={"identifier": f"{options.fhir.patient_system}|PID-UNKNOWN"},
        timeout=30,
    )
    assert lookup.json().get("entry", []) == []
