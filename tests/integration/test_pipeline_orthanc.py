"""The node end to end with a real Orthanc as the PACS: a scanner's phantom CT is routed by the
shipped CT rule, and its SEG, SR, GSPS, key images and PDF land in the same study in Orthanc
(REST and DICOMweb) while a real FHIR server gets the DiagnosticReport and its Observations; a
study forwarded by Orthanc's own C-STORE comes back with results; with Orthanc and the EHR down
the deliveries back off, and once they are up everything arrives exactly once."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import sqlite3
import threading
from collections.abc import Callable, Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import httpx
import pytest
import yaml
from fhir.resources.R4B.diagnosticreport import DiagnosticReport
from fhir.resources.R4B.observation import Observation
from orthanc_api_client import OrthancApiClient
from pydicom import dcmread
from sqlalchemy import select

from pacs_node.catalog.db import Catalog, open_catalog
from pacs_node.catalog.models import Delivery, Job, Result
from tests.conftest import NodeProcess, free_port, storescu, wait_for
from tests.dicom_factory import write_series
from tests.integration.test_results_fhir_server import (  # fhir_base: a fixture
    FhirServer,
    fhir_base,  # noqa: F401
)
from tests.orthanc import OrthancProcess

pytestmark = pytest.mark.integration

ROOT = Path(__file__).resolve().parents[2]
KINDS = {"seg", "sr", "gsps", "key-images", "pdf"}
DICOM_SEND_KEYS = ("seg", "sr", "gsps", "key_images", "pdf")  # routes.yaml spelling
FHIR_JSON = {"Content-Type": "application/fhir+json"}
SOP_CLASSES = {
    "seg": "1.2.840.10008.5.1.4.1.1.66.4",
    "sr": "1.2.840.10008.5.1.4.1.1.88.34",  # Comprehensive 3D SR
    "gsps": "1.2.840.10008.5.1.4.1.1.11.1",
    "pdf": "1.2.840.10008.5.1.4.1.1.104.1",
}


@pytest.fixture
def orthancs() -> Iterator[list[OrthancProcess]]:
    started: list[OrthancProcess] = []
    yield started
    for orthanc in started:
        orthanc.stop()


def _node(make_node: Callable[..., NodeProcess], orthanc_dicom_port: int) -> NodeProcess:
    return make_node(
        peers=[
            {"ae_title": "ORTHANC", "host": "127.0.0.1", "port": orthanc_dicom_port},
            {"ae_title": "STORESCU", "host": "127.0.0.1"},
            {"ae_title": "PACSNODE_SCU", "host": "127.0.0.1"},
        ],
        models_dir=str(ROOT / "models"),
        job_workers=1,
        dicom_workers=0,
        delivery_backoff_s=0.5,
        delivery_backoff_max_s=2.0,
    )


def _routed_node(
    make_node: Callable[..., NodeProcess],
    orthanc_port: int,
    routes: str,
    destinations: dict[str, Any] | None = None,
    **options: Any,
) -> NodeProcess:
    """A node that routes what a scanner (STORESCU) sends by ``routes``, Orthanc as a peer."""
    node = make_node(
        start=False,
        peers=[
            {"ae_title": "ORTHANC", "host": "127.0.0.1", "port": orthanc_port},
            {"ae_title": "STORESCU", "host": "127.0.0.1"},
        ],
        models_dir=str(ROOT / "models"),
        job_workers=1,
        quiet_period_s=2.0,
        **options,
    )
    node.destinations = destinations or {}
    node.config_dir.mkdir(parents=True, exist_ok=True)
    (node.config_dir / "routes.yaml").write_text(routes)
    return node.start()


def _json(node: NodeProcess, *args: str) -> Any:
    return json.loads(node.cli(*args, "--json").stdout)


def _received(node: NodeProcess, study_uid: str, count: int) -> bool:
    return any(s["study_uid"] == study_uid and s["instances"] == count for s in node.studies())


def _job_done(node: NodeProcess) -> dict[str, Any] | None:
    jobs = _json(node, "jobs")
    assert jobs, "no job queued"
    if jobs[0]["state"] == "failed":
        raise AssertionError(f"job failed: {jobs[0]['error']}\n{node.log_text()[-3000:]}")
    return jobs[0] if jobs[0]["state"] == "done" else None


def _check_in_orthanc(
    orthanc: OrthancProcess, study_uid: str, deliveries: list[dict[str, Any]]
) -> None:
    assert {d["kind"] for d in deliveries} == KINDS
    for delivery in deliveries:
        found = orthanc.post("/tools/lookup", content=delivery["sop_instance_uid"])
        instances = [f for f in found if f["Type"] == "Instance"]
        assert len(instances) == 1, delivery
        tags = orthanc.get(f"/instances/{instances[0]['ID']}/simplified-tags")
        assert tags["StudyInstanceUID"] == study_uid  # results go into the source study
        if delivery["kind"] in SOP_CLASSES:
            assert tags["SOPClassUID"] == SOP_CLASSES[delivery["kind"]]
    stats = orthanc.get("/statistics")
    assert stats["CountStudies"] == 1


def test_orthanc_forwards_a_study_and_gets_the_results_back(
    tmp_path: Path, make_node: Callable[..., NodeProcess], orthancs: list[OrthancProcess]
) -> None:
    dicom_port = free_port()
    node = _node(make_node, dicom_port)
    orthanc = OrthancProcess(
        tmp_path / "orthanc",
        free_port(),
        dicom_port,
        modalities={"node": [node.ae_title, "127.0.0.1", node.port]},
    ).start()
    orthancs.append(orthanc)
    paths = write_series(tmp_path / "ct", slices=16, rows=64, columns=64, spacing=(5, 5, 5))
    study_uid = str(dcmread(paths[0], stop_before_pixels=True).StudyInstanceUID)
    for path in paths:
        orthanc.post("/instances", content=path.read_bytes())
    (study_id,) = orthanc.get("/studies")
    orthanc.post("/modalities/node/store", json={"Resources": [study_id], "Synchronous": True})
    wait_for(lambda: _received(node, study_uid, 16), 60, what="the study in the node")

    node.cli("run", study_uid, "--model", "ct-classical")
    job = wait_for(lambda: _job_done(node), 180, interval=0.5, what="the job to finish")
    for stage in ("decode_s", "infer_s", "build_s", "store_s", "total_s"):
        assert stage in job["timings"], stage

    def delivered() -> list[dict[str, Any]] | None:
        rows = _json(node, "deliveries")
        return rows if rows and all(d["state"] == "delivered" for d in rows) else None

    deliveries = wait_for(delivered, 60, interval=0.5, what="every delivery")
    assert {d["destination"] for d in deliveries} == {"ORTHANC"}  # SOURCE: the sender
    assert {d["attempts"] for d in deliveries} == {1}
    _check_in_orthanc(orthanc, study_uid, deliveries)
    assert orthanc.get("/statistics")["CountInstances"] == 16 + len(deliveries)

    def committed() -> list[dict[str, Any]] | None:
        rows = _json(node, "deliveries")
        return rows if all(d["commitment"] == "committed" for d in rows) else None

    # Orthanc answers the N-ACTION, then reports on an association of its own to the node's SCP
    wait_for(committed, 60, interval=0.5, what="Orthanc's storage commitment reports")


def test_a_scanner_study_reaches_the_pacs_and_the_ehr_with_no_one_touching_the_node(
    tmp_path: Path,
    make_node: Callable[..., NodeProcess],
    orthancs: list[OrthancProcess],
    fhir_base: str,  # noqa: F811
) -> None:
    from pacs_node.demo import make_study
    from pacs_node.results import FhirOptions

    orthanc_port = free_port()
    # the shipped CT rule (thinnest axial series, ct-torso-organs), sending to both peers
    routes = yaml.safe_load((ROOT / "ae_config" / "routes.yaml").read_text())
    (rule,) = [r for r in routes["rules"] if r["name"] == "ct-body"]
    rule["send"] = {**{kind: ["PACS"] for kind in DICOM_SEND_KEYS}, "fhir": ["EHR"]}
    destinations = {
        "PACS": {"type": "dimse", "peer": "ORTHANC"},
        "EHR": {"type": "fhir", "base_url": fhir_base},
    }
    node = _routed_node(make_node, orthanc_port, yaml.safe_dump({"rules": [rule]}), destinations)
    orthanc = OrthancProcess(
        tmp_path / "orthanc",
        free_port(),
        orthanc_port,
        modalities={"node": [node.ae_title, "127.0.0.1", node.port]},
        dicomweb=True,
    ).start()
    orthancs.append(orthanc)

    study_uid, paths = make_study(tmp_path / "ct", seed=777)
    patient_id = str(dcmread(paths[0], stop_before_pixels=True).PatientID)
    patient = {
        "resourceType": "Patient",
        "identifier": [{"system": FhirOptions().patient_system, "value": patient_id}],
    }
    created = httpx.post(f"{fhir_base}/Patient", json=patient, headers=FHIR_JSON, timeout=30)
    assert created.status_code == 201, created.text

    assert storescu(node, *paths).returncode == 0  # the scanner; nothing else is done by hand
    wait_for(lambda: _json(node, "jobs"), 60, interval=0.5, what="routing after the quiet period")
    job = wait_for(lambda: _job_done(node), 240, interval=0.5, what="the routed job")
    assert (job["rule"], job["model"]) == ("ct-body", "ct-torso-organs")
    for stage in ("decode_s", "infer_s", "build_s", "store_s", "total_s"):
        assert job["timings"][stage] >= 0, stage

    def delivered() -> list[dict[str, Any]] | None:
        rows = _json(node, "deliveries")
        kinds = {d["kind"] for d in rows}
        settled = all(d["state"] == "delivered" for d in rows)
        return rows if kinds == KINDS | {"fhir"} and settled else None

    deliveries = wait_for(delivered, 120, interval=0.5, what="every delivery")
    dicom = [d for d in deliveries if d["kind"] != "fhir"]
    assert {d["destination"] for d in dicom} == {"PACS"}
    _check_in_orthanc(orthanc, study_uid, dicom)
    api = OrthancApiClient(orthanc.url)  # the PACS admin's door: Orthanc's REST API
    orthanc_study = api.studies.lookup(study_uid)
    assert orthanc_study is not None
    rest_modalities = {
        api.series.get(sid).main_dicom_tags.get("Modality")
        for sid in api.studies.get_series_ids(orthanc_study)
    }
    assert {"SEG", "SR", "PR", "OT", "DOC"} <= rest_modalities
    assert len(api.studies.get_pdf_instances(orthanc_study)) == 1
    # the viewers' door: DICOMweb lists the result series in the source study
    series = httpx.get(f"{orthanc.dicomweb_url}/studies/{study_uid}/series", timeout=30).json()
    modalities = {item["00080060"]["Value"][0] for item in series}
    assert {"SEG", "SR", "PR", "OT", "DOC"} <= modalities  # the CT itself went to the node only

    # the EHR: one DiagnosticReport for the study, with its Observations, valid R4
    reports = httpx.get(f"{fhir_base}/DiagnosticReport", timeout=30).json()["entry"]
    assert len(reports) == 1
    report = DiagnosticReport.model_validate(reports[0]["resource"])
    assert report.result, "the report lists no Observation"
    for reference in report.result:  # each one stored on the server, each valid R4
        read = httpx.get(f"{fhir_base}/{reference.reference}", timeout=30)
        assert read.status_code == 200, reference.reference
        Observation.model_validate(read.json())
    (study,) = node.studies()
    assert study["status"] == "done"
    # the EHR on this machine over plain http: allowed, and said once at start
    assert node.log_text().count("over plain http") == 1


def test_outage_backs_off_then_delivers_everything_once(
    tmp_path: Path, make_node: Callable[..., NodeProcess], orthancs: list[OrthancProcess]
) -> None:
    """The PACS is down and the EHR answers 500 (naming the patient) when the results are
    ready. The EHR is reached over HTTPS through a TLS proxy (sekmet-fhir speaks only HTTP)
    whose certificate comes from a private CA. Afterwards no log line at INFO or above and no
    error text in the catalog names the patient, whose birth date pydicom also judged invalid."""
    from pacs_node.dispatch.http import client_context, exchange
    from pacs_node.errors import TransientDelivery
    from tests import phi
    from tests.certs import CertificateAuthority
    from tests.tls_proxy import TlsProxy

    dicom_port, fhir_port = free_port(), free_port()
    ca = CertificateAuthority.create(tmp_path / "pki")
    server = ca.issue("ehr", "CN=ehr.test", hosts=("ehr.test", "127.0.0.1"))
    proxy = TlsProxy(free_port(), fhir_port, server.cert, server.key).start()
    naming = phi.NamingServer(fhir_port)  # the EHR's trouble: 500, with the patient's name
    ehr = {
        "type": "fhir",
        "base_url": f"https://127.0.0.1:{proxy.port}/fhir",
        "tls_ca_file": str(ca.cert),
        "create_patient": True,  # a test EHR: the Bundle brings its Patient
    }
    fhir: FhirServer | None = None
    try:
        node = _routed_node(
            make_node,
            dicom_port,
            ROUTES_TO_ORTHANC_AND_EHR,
            {"EHR": ehr},
            delivery_backoff_s=0.5,
            delivery_backoff_max_s=2.0,
        )
        paths = write_series(tmp_path / "ct", slices=16, rows=64, columns=64, spacing=(5, 5, 5))
        phi.mark_patient(paths)
        study_uid = str(dcmread(paths[0], stop_before_pixels=True).StudyInstanceUID)
        assert storescu(node, *paths).returncode == 0
        wait_for(
            lambda: _json(node, "jobs"), 60, interval=0.5, what="routing after the quiet period"
        )
        wait_for(lambda: _job_done(node), 180, interval=0.5, what="the job to finish")

        def retried() -> list[dict[str, Any]] | None:
            rows = _json(node, "deliveries")
            ok = len(rows) == len(KINDS) + 1 and all(
                d["state"] == "pending" and d["attempts"] >= 3 for d in rows
            )
            return rows if ok else None

        waiting = wait_for(retried, 60, interval=0.5, what="deliveries retried with backoff")
        assert all(d["next_attempt_at"] is not None for d in waiting)
        for delivery in waiting:
            if delivery["kind"] != "fhir":
                assert "association" in (delivery["last_error"] or ""), delivery
            else:  # the EHR's 500 came back through TLS; its body is not kept
                assert "HTTP 500" in (delivery["last_error"] or ""), delivery

        naming.stop()
        orthanc = OrthancProcess(
            tmp_path / "orthanc",
            free_port(),
            dicom_port,
            modalities={"node": [node.ae_title, "127.0.0.1", node.port]},
        ).start()
        orthancs.append(orthanc)
        fhir = FhirServer(tmp_path / "fhir", fhir_port)

        def delivered() -> list[dict[str, Any]] | None:
            rows = _json(node, "deliveries")
            return rows if all(d["state"] == "delivered" for d in rows) else None

        deliveries = wait_for(delivered, 60, interval=0.5, what="every delivery after the outage")
        assert len(deliveries) == len(waiting)  # none lost, none added
        dicom = [d for d in deliveries if d["kind"] != "fhir"]
        _check_in_orthanc(orthanc, study_uid, dicom)
        assert orthanc.get("/statistics")["CountInstances"] == len(dicom)  # each exactly once
        reports = httpx.get(f"{fhir.base}/DiagnosticReport", timeout=30).json()
        assert len(reports.get("entry", [])) == 1  # the report exactly once
        # once delivered, nothing goes out again
        before = {d["id"]: d["attempts"] for d in deliveries}
        after = {d["id"]: d["attempts"] for d in _json(node, "deliveries")}
        assert after == before

        # the proxy's certificate is trusted through tls_ca_file only
        metadata = f"https://127.0.0.1:{proxy.port}/fhir/metadata"
        answer = exchange(
            "GET", metadata, timeout_s=10, headers={}, what="metadata", tls=client_context(ca.cert)
        )
        assert answer.status == 200
        with pytest.raises(TransientDelivery, match="CERTIFICATE_VERIFY_FAILED"):
            exchange("GET", metadata, timeout_s=10, headers={}, what="metadata")

        node.stop()  # every line written, the catalog at rest
        log = node.log_text()
        assert "WARNING py.warnings Invalid value for VR DA" in log, log[-3000:]
        assert phi.log_leaks(log) == []
        catalog = node.data_dir / "catalog.sqlite"
        assert phi.error_texts(catalog) > len(waiting)  # each delivery's error, the events
        assert phi.catalog_leaks(catalog) == []
    finally:
        if fhir is not None:
            fhir.stop()
        naming.stop()
        proxy.stop()


@pytest.mark.parametrize(
    "stages",
    [("infer", "build"), ("extras",)],
    ids=["before-the-first-results", "between-the-seg-and-sr-and-the-rest"],
)
def test_sigkill_during_a_job_loses_nothing_and_duplicates_nothing(
    tmp_path: Path,
    make_node: Callable[..., NodeProcess],
    orthancs: list[OrthancProcess],
    stages: tuple[str, ...],
) -> None:
    """Killed while the model runs, or after the SEG and SR were committed (maybe sent) while
    the rest is built: the job runs again, and every result is stored, delivered and in
    Orthanc exactly once."""
    from tests.catalog_factory import job_events

    dicom_port = free_port()
    node = _node(make_node, dicom_port)
    orthanc = OrthancProcess(tmp_path / "orthanc", free_port(), dicom_port).start()
    orthancs.append(orthanc)
    paths = write_series(tmp_path / "ct", slices=40, rows=128, columns=128, spacing=(3, 2, 2))
    study_uid = str(dcmread(paths[0], stop_before_pixels=True).StudyInstanceUID)
    assert storescu(node, *paths, calling="ORTHANC").returncode == 0
    wait_for(lambda: _received(node, study_uid, 40), 60, what="the study in the node")
    node.cli("run", study_uid, "--model", "ct-classical")

    catalog = open_catalog(f"sqlite:///{(node.data_dir / 'catalog.sqlite').resolve()}")
    try:

        def busy() -> int | None:
            """The job worker's pid once the job is in ``stages``; for the extras, once its
            first commit is in (the stage itself may pass between two polls)."""
            if stages == ("extras",):
                return _worker_after_first_commit(catalog)
            with catalog.sessions() as session:
                job = session.scalars(select(Job)).one()
            running = job.state == "running" and job.stage in stages
            return int((job.claimed_by or "").split(":")[1]) if running else None

        pid = wait_for(busy, 120, interval=0.01, what=f"the job in {' or '.join(stages)}")
        os.kill(pid, signal.SIGSTOP)  # held there until the node and it are killed
        with catalog.sessions() as session:
            assert session.scalars(select(Job)).one().state == "running"
        node.kill()
        with contextlib.suppress(ProcessLookupError):  # a worker outliving its node
            os.kill(pid, signal.SIGKILL)
        node.start()  # the job that was running goes back to the queue and runs again
        job = wait_for(lambda: _job_done(node), 180, interval=0.5, what="the job after restart")
        assert job["attempts"] == 2
        events = job_events(catalog)
    finally:
        catalog.dispose()
    assert "quality" in {kind for kind, _ in events}  # the gate's verdict is recorded
    # the job's own steps; its SEG and SR are committed first (results_first), in whichever
    # run got that far, and their deliveries' events may come before the job's end
    steps = [k for k, _ in events if k in ("queued", "running", "done", "failed")]
    assert steps[:5] == ["queued", "running", "queued", "running", "done"]
    kinds = [k for k, _ in events]
    assert "results_first" in kinds[: kinds.index("done")]
    assert "restart" in [detail for k, detail in events if k == "queued"][1]

    def delivered() -> list[dict[str, Any]] | None:
        rows = _json(node, "deliveries")
        return rows if rows and all(d["state"] == "delivered" for d in rows) else None

    deliveries = wait_for(delivered, 60, interval=0.5, what="every delivery")
    assert len(deliveries) == len({d["sop_instance_uid"] for d in deliveries})  # one set, once
    _check_in_orthanc(orthanc, study_uid, deliveries)
    assert orthanc.get("/statistics")["CountInstances"] == len(deliveries)
    assert {d["kind"] for d in deliveries} == KINDS


def _ct_rule_to(send: dict[str, list[str]]) -> str:
    """routes.yaml with one CT rule (ct-classical) sending its outputs as ``send`` says."""
    rule = {
        "name": "ct-body",
        "when": {"modality": "CT", "slices": {"min": 10}},
        "models": ["ct-classical"],
        "send": send,
    }
    return yaml.safe_dump({"rules": [rule]})


ROUTES_TO_ORTHANC = _ct_rule_to({kind: ["ORTHANC"] for kind in DICOM_SEND_KEYS})
ROUTES_TO_ORTHANC_AND_EHR = _ct_rule_to(
    {**{kind: ["ORTHANC"] for kind in DICOM_SEND_KEYS}, "fhir": ["EHR"]}
)


def test_a_scanner_study_is_routed_and_results_forwarded_back_start_no_second_job(
    tmp_path: Path, make_node: Callable[..., NodeProcess], orthancs: list[OrthancProcess]
) -> None:
    orthanc_port = free_port()
    node = _routed_node(make_node, orthanc_port, ROUTES_TO_ORTHANC)
    orthanc = OrthancProcess(
        tmp_path / "orthanc",
        free_port(),
        orthanc_port,
        modalities={"node": [node.ae_title, "127.0.0.1", node.port]},
    ).start()
    orthancs.append(orthanc)

    paths = write_series(tmp_path / "ct", slices=16, rows=64, columns=64, spacing=(5, 5, 5))
    study_uid = str(dcmread(paths[0], stop_before_pixels=True).StudyInstanceUID)
    assert storescu(node, *paths).returncode == 0  # the scanner
    wait_for(lambda: _json(node, "jobs"), 30, interval=0.5, what="routing after the quiet period")
    job = wait_for(lambda: _job_done(node), 180, interval=0.5, what="the routed job")
    assert job["rule"] == "ct-body"
    assert job["model"] == "ct-classical"
    assert "infer_s" in job["timings"]

    def delivered() -> list[dict[str, Any]] | None:
        rows = _json(node, "deliveries")
        return (
            rows
            if len(rows) == len(KINDS) and all(d["state"] == "delivered" for d in rows)
            else None
        )

    deliveries = wait_for(delivered, 60, interval=0.5, what="every delivery")
    _check_in_orthanc(orthanc, study_uid, deliveries)
    (study,) = node.studies()
    assert study["status"] == "done"

    # Orthanc forwards the whole study, our results included, back to the node.
    (orthanc_study,) = orthanc.get("/studies")
    orthanc.post("/modalities/node/store", json={"Resources": [orthanc_study], "Synchronous": True})
    total = 16 + len(deliveries)
    wait_for(lambda: _received(node, study_uid, total), 60, what="the results in the node")
    wait_for(
        lambda: (
            any("own output returned" in line for line in node.log_text().splitlines())
            or _study_events(node, study_uid, "own output returned")
        ),
        30,
        what="the study to settle again",
    )
    assert len(_json(node, "jobs")) == 1  # no second job
    (study,) = node.studies()
    assert study["status"] == "done"


def _study_events(node: NodeProcess, study_uid: str, kind: str) -> bool:
    with sqlite3.connect(node.data_dir / "catalog.sqlite") as db:
        row = db.execute(
            "select count(*) from study_events e join studies s on s.id = e.study_id "
            "where s.study_uid = ? and e.kind = ?",
            (study_uid, kind),
        ).fetchone()
    return bool(row[0])


class ArrivalWatch:
    """When each result reached Orthanc: its REST ``/changes`` feed polled every 50 ms (its own
    change dates have whole seconds only), each new instance stamped with the wall clock that
    the node's catalog uses too."""

    def __init__(self, orthanc: OrthancProcess) -> None:
        self.orthanc = orthanc
        self.arrived: dict[str, datetime] = {}  # SOP Instance UID -> first seen
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._follow, daemon=True)

    def __enter__(self) -> ArrivalWatch:
        self._thread.start()
        return self

    def __exit__(self, *_: object) -> None:
        self._stop.set()
        self._thread.join(10)

    def _follow(self) -> None:
        since = 0
        while not self._stop.wait(0.05):
            changes = self.orthanc.get(f"/changes?since={since}&limit=100")
            seen = datetime.now(UTC)
            for change in changes["Changes"]:
                if change["ChangeType"] == "NewInstance":
                    tags = self.orthanc.get(f"/instances/{change['ID']}/simplified-tags")
                    self.arrived.setdefault(tags["SOPInstanceUID"], seen)
            since = changes["Last"]


def test_the_seg_and_sr_reach_the_pacs_before_the_pdf_is_built(
    tmp_path: Path, make_node: Callable[..., NodeProcess], orthancs: list[OrthancProcess]
) -> None:
    """Results first: a scanner study's SEG and SR are in Orthanc before the node has built
    and stored the PDF of the same job (its delivery row is made in the commit that stores
    it), and the job is still one job that ends done with every result delivered once."""
    orthanc_port = free_port()
    node = _routed_node(make_node, orthanc_port, ROUTES_TO_ORTHANC)
    orthanc = OrthancProcess(
        tmp_path / "orthanc",
        free_port(),
        orthanc_port,
        modalities={"node": [node.ae_title, "127.0.0.1", node.port]},
    ).start()
    orthancs.append(orthanc)

    from dataclasses import replace

    from phantom.render import TRAINING, render_ct
    from phantom.writers import write_dicom

    # a phantom torso (body, lungs, bone for ct-classical) long enough that its presentation
    # state, key images and PDF take seconds: the SEG and SR must not wait for them
    ranges = replace(
        TRAINING,
        thickness_mm=(4.0, 4.0),
        pixel_mm=(1.8, 1.8),
        coverage_mm=(240.0, 240.0),
        fov_scale=(1.1, 1.1),
        noise=(10.0, 10.0),
        metal=False,
    )
    paths = write_dicom(render_ct(31, ranges), tmp_path / "ct")
    study_uid = str(dcmread(paths[0], stop_before_pixels=True).StudyInstanceUID)
    catalog = open_catalog(f"sqlite:///{(node.data_dir / 'catalog.sqlite').resolve()}")
    stopped: list[int] = []
    try:
        with ArrivalWatch(orthanc) as watch:
            assert storescu(node, *paths).returncode == 0  # the scanner
            # the job worker is stopped once it is building the rest: its SEG and SR are
            # committed and its stage's write too (it holds no catalog lock), and the PDF
            # cannot be built while the SEG and SR go out
            pid = wait_for(
                lambda: _worker_after_first_commit(catalog, stage="extras"),
                180,
                interval=0.01,
                what="the job building the rest",
            )
            os.kill(pid, signal.SIGSTOP)
            stopped.append(pid)
            first = _stored(catalog)
            assert set(first) == {"seg", "sr"}, first  # nothing of the rest stored yet
            wait_for(
                lambda: {first["seg"], first["sr"]} <= set(watch.arrived),
                60,
                interval=0.1,
                what="the SEG and SR in Orthanc while the job worker is stopped",
            )
            assert set(_stored(catalog)) == {"seg", "sr"}  # still no PDF result or delivery
            assert _delivery_kinds(catalog) == {"seg", "sr"}
            os.kill(stopped.pop(), signal.SIGCONT)

            job = wait_for(lambda: _job_done(node), 180, interval=0.5, what="the routed job")
            assert len(_json(node, "jobs")) == 1  # still one job per study and model

            def delivered() -> list[dict[str, Any]] | None:
                rows = _json(node, "deliveries")
                settled = all(d["state"] == "delivered" for d in rows)
                return rows if {d["kind"] for d in rows} == KINDS and settled else None

            deliveries = wait_for(delivered, 60, interval=0.5, what="every delivery")
            wait_for(
                lambda: {d["sop_instance_uid"] for d in deliveries} <= set(watch.arrived),
                10,
                what="every arrival seen",
            )
    finally:
        for pid in stopped:
            os.kill(pid, signal.SIGCONT)
        catalog.dispose()
    assert job["state"] == "done"
    _check_in_orthanc(orthanc, study_uid, deliveries)  # each once, in the source study
    assert len(deliveries) == len({d["sop_instance_uid"] for d in deliveries})
    assert orthanc.get("/statistics")["CountInstances"] == len(deliveries)

    (pdf,) = [d for d in deliveries if d["kind"] == "pdf"]
    pdf_stored = datetime.fromisoformat(pdf["created_at"])  # after the PDF was built
    arrived = {d["kind"]: watch.arrived[d["sop_instance_uid"]] for d in deliveries}
    for kind in ("seg", "sr"):
        assert arrived[kind] < pdf_stored, (kind, arrived, pdf_stored, job["timings"])
    assert watch.arrived[pdf["sop_instance_uid"]] > pdf_stored


def _worker_after_first_commit(catalog: Catalog, stage: str | None = None) -> int | None:
    """The pid of the job worker running the one job, once its first commit (the SEG and SR
    and their deliveries) is in the catalog (and the job in ``stage``, if given); None
    before."""
    with catalog.sessions() as session:
        job = session.scalars(select(Job)).one_or_none()
        if job is None or job.state != "running" or job.claimed_by is None:
            return None
        if stage is not None and job.stage != stage:
            return None
        if session.scalar(select(Delivery.id).where(Delivery.job_id == job.id).limit(1)) is None:
            return None
        return int(job.claimed_by.split(":")[1])  # host:pid:label


def _stored(catalog: Catalog) -> dict[str, str]:
    """The stored results' kinds and SOP Instance UIDs."""
    with catalog.sessions() as session:
        return {
            str(kind): str(uid)
            for kind, uid in session.execute(select(Result.kind, Result.sop_instance_uid))
        }


def _delivery_kinds(catalog: Catalog) -> set[str]:
    with catalog.sessions() as session:
        return {
            str(kind)
            for kind in session.scalars(
                select(Result.kind).join(Delivery, Delivery.result_id == Result.id)
            )
        }
