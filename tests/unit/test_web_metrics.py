"""``/metrics``: open, parsed by prometheus_client's own text parser, every value read from the
catalog (what other processes recorded counts too), and no patient data in it."""

from __future__ import annotations

from pathlib import Path

from sqlalchemy import func, select

from pacs_node.catalog.jobs import claim_job, fail_job, finish_job, queue_job
from pacs_node.catalog.models import Instance
from pacs_node.catalog.results import StoredEncoding
from pacs_node.ingest.scp import FAILED_COUNTER, REJECTED_COUNTER
from tests.catalog_factory import ingest, queue_stored_results
from tests.conftest import wait_for
from tests.dicom_factory import new_uid, write_series
from tests.web_node import WebNode, scrape, web_node

__all__ = ["web_node"]


def test_metrics_count_what_the_catalog_holds(web_node: WebNode, tmp_path: Path) -> None:
    catalog = web_node.catalog
    text, before = scrape(web_node.url)
    assert before[("pacs_node_catalog_up", ())] == 1
    assert before[("pacs_node_received_instances_total", ())] == 0
    assert before[("pacs_node_queue_depth", ())] == 0
    assert before[("pacs_node_jobs", (("state", "queued"),))] == 0

    paths = write_series(tmp_path / "in", slices=5, rows=16, columns=16, patient_name="Secret^Name")
    study_id, study_uid, _ = ingest(catalog, web_node.settings.node.spool_dir, paths)
    ingest(catalog, web_node.settings.node.spool_dir, paths)  # a replay counts nothing again
    # the counts the Storage SCP's processes send through the recorder
    web_node.recorder.count(REJECTED_COUNTER)
    web_node.recorder.count(FAILED_COUNTER, 2)
    with catalog.sessions.begin() as session:
        for timings, error in (({"decode": 1.0, "inference": 4.0}, None), ({"decode": 3.0}, "x")):
            job_id = queue_job(session, study_id, "ct-classical", [], {})
            assert claim_job(session, "w") == job_id
            if error is None:
                assert finish_job(session, job_id, "w", timings)
            else:
                assert fail_job(session, job_id, "w", error, timings)
        queue_job(session, study_id, "ct-classical", [], {})
        item = StoredEncoding("seg", "1.2.840.10008.5.1.4.1.1.66.4", new_uid(), None, "1.2", b"x")
        queue_stored_results(session, tmp_path / "results", [item], {"seg": ["A", "B"]}, new_uid())
        stored = session.scalar(select(func.sum(Instance.size_bytes)))

    def counted() -> bool:
        return scrape(web_node.url)[1][("pacs_node_failed_instances_total", ())] == 2

    wait_for(counted, 10, what="the recorder's counts in the catalog")
    text, after = scrape(web_node.url)
    assert after[("pacs_node_received_instances_total", ())] == 5
    assert after[("pacs_node_received_bytes_total", ())] == stored
    assert after[("pacs_node_instances", ())] == 5
    assert after[("pacs_node_instance_bytes", ())] == stored
    assert after[("pacs_node_rejected_associations_total", ())] == 1
    jobs = {state: after[("pacs_node_jobs", (("state", state),))] for state in ("queued", "done")}
    assert jobs == {"queued": 2, "done": 1}  # the stored-results job is queued too
    assert after[("pacs_node_jobs", (("state", "failed"),))] == 1
    assert after[("pacs_node_queue_depth", ())] == 2
    assert after[("pacs_node_deliveries", (("state", "pending"),))] == 2
    assert after[("pacs_node_deliveries", (("state", "dead"),))] == 0
    assert after[("pacs_node_studies", (("state", "receiving"),))] == 1
    assert after[("pacs_node_studies", (("state", "stable"),))] == 1
    # stage seconds over the finished jobs: decode ran in both (1 s and 3 s), inference in one
    decode = {
        q: after[("pacs_node_job_stage_seconds", (("quantile", q), ("stage", "decode")))]
        for q in ("0.5", "0.9")
    }
    assert decode == {"0.5": 1.0, "0.9": 3.0}
    assert after[("pacs_node_job_stage_recent_jobs", (("stage", "decode"),))] == 2
    assert after[("pacs_node_job_stage_recent_jobs", (("stage", "inference"),))] == 1
    assert after[("pacs_node_recorder_catalog_available", ())] == 1
    for private in ("Secret", "TEST-0001", study_uid, "ACC0001"):
        assert private not in text
