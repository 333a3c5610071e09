"""The group deployment end to end: two ingest nodes (one AE title, one PostgreSQL catalog, one
data folder, ``job_queue: celery``) and two ``pacs-node worker`` processes on a Redis broker of
the test's own, a real Orthanc as the PACS and the real FHIR server as the EHR. Four small CT
studies, one split across both nodes: each is routed once, each job runs once, each result is in
Orthanc once and each study has one report on the FHIR server. Then the timer owner is SIGKILLed:
the other node owns the timers within the lease time and routes the next study sent to it.
(A worker SIGKILLed and a broker restart: ``test_celery.py``.)"""

from __future__ import annotations

import time
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx
import pytest
from pydicom import dcmread

from pacs_node.catalog.db import open_catalog
from pacs_node.services.deliveries import list_deliveries
from tests.conftest import NodeProcess, free_port, storescu, wait_for
from tests.dicom_factory import new_uid, write_series
from tests.integration.test_celery import (  # redis_server, workers: fixtures
    RedisServer,
    Workers,
    _events,
    _jobs,
    redis_server,  # noqa: F401
    workers,  # noqa: F401
)
from tests.integration.test_pipeline_orthanc import KINDS, ROUTES_TO_ORTHANC_AND_EHR
from tests.integration.test_results_fhir_server import FhirServer
from tests.integration.test_scale_out import _owner, _routing
from tests.orthanc import OrthancProcess

pytestmark = pytest.mark.integration

ROOT = Path(__file__).resolve().parents[2]
LEASE_S = 3.0


def _ingest_node(
    make_node: Callable[..., NodeProcess],
    name: str,
    shared: Path,
    postgres_url: str,
    broker_url: str,
    prefix: str,
    orthanc_port: int,
    ehr: dict[str, Any],
) -> NodeProcess:
    node = make_node(
        start=False,
        peers=[
            {"ae_title": "ORTHANC", "host": "127.0.0.1", "port": orthanc_port},
            {"ae_title": "STORESCU", "host": "127.0.0.1"},
        ],
        models_dir=str(ROOT / "models"),
        data_dir=str(shared),
        database_url=postgres_url,
        node_id=name,
        job_queue="celery",
        broker_url=broker_url,
        job_queue_prefix=prefix,
        job_lease_s=3.0,
        timer_lease_s=LEASE_S,
        quiet_period_s=1.0,
        dicom_workers=0,
        delivery_backoff_s=0.5,
        delivery_backoff_max_s=2.0,
    )
    node.destinations = {"EHR": ehr}
    node.config_dir.mkdir(parents=True, exist_ok=True)
    (node.config_dir / "routes.yaml").write_text(ROUTES_TO_ORTHANC_AND_EHR)
    return node.start()


def _series(directory: Path, study_uid: str | None = None) -> tuple[str, list[Path]]:
    paths = write_series(
        directory, slices=16, rows=64, columns=64, spacing=(5, 5, 5), study_uid=study_uid
    )
    return str(dcmread(paths[0], stop_before_pixels=True).StudyInstanceUID), paths


def _send(node: NodeProcess, paths: list[Path]) -> None:
    sent = storescu(node, *paths)
    assert sent.returncode == 0, sent.stderr


def test_two_ingest_nodes_and_two_workers_deliver_each_result_once_and_survive_a_node_kill(
    tmp_path: Path,
    postgres_url: str,
    make_node: Callable[..., NodeProcess],
    redis_server: RedisServer,  # noqa: F811
    workers: Callable[..., Workers],  # noqa: F811
) -> None:
    """(The database fixture first: it is dropped after the nodes stop.)"""
    orthanc_port, fhir_port = free_port(), free_port()
    ehr = {"type": "fhir", "base_url": f"http://127.0.0.1:{fhir_port}/fhir"}
    ehr["create_patient"] = True  # a test EHR: the Bundle brings its Patient
    fhir = FhirServer(tmp_path / "fhir", fhir_port)
    orthanc = OrthancProcess(tmp_path / "orthanc", free_port(), orthanc_port).start()
    shared, prefix = tmp_path / "shared", f"t{uuid.uuid4().hex[:8]}."
    nodes = [
        _ingest_node(
            make_node, name, shared, postgres_url, redis_server.url, prefix, orthanc_port, ehr
        )
        for name in ("node-a", "node-b")
    ]
    catalog = open_catalog(postgres_url, run_migrations=False)
    pool = workers(nodes[0].config_dir)
    pool.start(), pool.start()
    try:
        wait_for(lambda: _owner(catalog) in ("node-a", "node-b"), 10, what="a timer owner")
        # 1. Four studies: one split across both nodes, the others one to each in turn.
        split, split_paths = _series(tmp_path / "split")
        _send(nodes[0], split_paths[:8])
        _send(nodes[1], split_paths[8:])
        studies = [split]
        for number in range(3):
            study_uid, paths = _series(tmp_path / f"s{number}")
            _send(nodes[number % 2], paths)
            studies.append(study_uid)

        def delivered() -> list[dict[str, Any]] | None:
            rows = [row.as_json() for row in list_deliveries(catalog)]  # `deliveries --json`
            for row in rows:
                assert row["state"] in ("pending", "sending", "delivered"), row
            done = len(rows) == len(studies) * (len(KINDS) + 1)
            return rows if done and all(d["state"] == "delivered" for d in rows) else None

        deliveries = wait_for(delivered, 70, interval=0.5, what="every result delivered")

        # routed once: one stable event and one job per study (and model)
        for study_uid in studies:
            assert _routing(catalog, study_uid) == ("stable", 1, 1, 1), study_uid
        assert [s["instances"] for s in nodes[0].studies() if s["study_uid"] == split] == [16]
        # each job ran once, on a worker
        jobs = _jobs(catalog)
        assert len({(j.study_id, j.model) for j in jobs.values()}) == len(jobs) == len(studies)
        for job in jobs.values():
            assert (job.state, job.attempts) == ("done", 1), job.error
            assert [kind for kind, _ in _events(catalog, job.id)] == ["queued", "running", "done"]
            worker_pids = {str(p.pid) for p in pool.processes}
            assert str(job.claimed_by).split(":")[1] in worker_pids, job.claimed_by
        # each result in Orthanc once, each report on the FHIR server once
        dicom = [d for d in deliveries if d["kind"] != "fhir"]
        assert len({d["sop_instance_uid"] for d in dicom}) == len(dicom)
        for delivery in dicom:
            found = orthanc.post("/tools/lookup", content=delivery["sop_instance_uid"])
            assert len([f for f in found if f["Type"] == "Instance"]) == 1, delivery
        assert orthanc.get("/statistics")["CountInstances"] == len(dicom)
        assert sorted(d["job_id"] for d in deliveries if d["kind"] == "fhir") == sorted(
            int(job_id) for job_id in jobs
        )  # one report per job, so per study
        reports = httpx.get(f"{fhir.base}/DiagnosticReport", timeout=30).json()
        assert len(reports.get("entry", [])) == len(studies)

        # 2. The timer owner SIGKILLed: the other takes over within the lease and routes.
        owner = _owner(catalog)
        victim, survivor = (nodes[0], nodes[1]) if owner == "node-a" else (nodes[1], nodes[0])
        victim.kill()
        killed = time.monotonic()
        later = new_uid()
        _send(survivor, _series(tmp_path / "later", study_uid=later)[1])
        other = "node-b" if owner == "node-a" else "node-a"
        wait_for(lambda: _owner(catalog) == other, 2 * LEASE_S + 5, what="the takeover")
        took_over = time.monotonic() - killed
        wait_for(lambda: _routing(catalog, later)[2] > 0, 20, what="the later study routed")
        assert took_over < LEASE_S + LEASE_S / 3 + 3, took_over  # expiry + one renewal + slack
        assert _routing(catalog, later) == ("stable", 1, 1, 1)
    finally:
        catalog.dispose()
        pool.stop_all()
        orthanc.stop()
        fhir.stop()
