"""A web face over a catalog holding studies, jobs, results and deliveries in every state an
API test wants: three received studies (CT, MR, CT; different patients, accessions and dates),
jobs done, failed and queued with stage timings, deliveries pending, dead and held by the
quality gate."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from pydicom import dcmread
from sqlalchemy import update

from pacs_node.catalog.jobs import claim_job, fail_job, finish_job, queue_job
from pacs_node.catalog.models import Delivery, DeliveryState
from pacs_node.catalog.quality import hold_for_quality
from pacs_node.catalog.results import StoredEncoding
from pacs_node.routing.rules import RoutesFile
from pacs_node.services import deliveries
from tests.catalog_factory import ingest, queue_stored_results
from tests.dicom_factory import new_uid, write_series
from tests.web_node import WebNode, start_web_node

ROOT = Path(__file__).parents[1]
SEG = "1.2.840.10008.5.1.4.1.1.66.4"
RULE: dict[str, object] = {
    "name": "ct",
    "when": {"modality": "CT"},
    "models": ["ct-classical"],
    "send": {"seg": ["PACS"]},
}


@dataclass
class Populated:
    """The node and what was put into its catalog."""

    web: WebNode
    studies: dict[str, str]  # name -> Study Instance UID
    series: dict[str, list[str]]
    queued_job: int
    done_job: int
    failed_job: int
    dead_delivery: int
    pending_delivery: int
    held_delivery: int

    def ids(self) -> dict[str, Any]:
        return {
            "study": self.studies["a"],
            "job": self.queued_job,
            "delivery": self.dead_delivery,
        }


def _series(
    directory: Path, modality: str, name: str, pid: str, accession: str, date: str
) -> list[Path]:
    paths = write_series(
        directory, modality=modality, slices=4, rows=16, columns=16, patient_name=name
    )
    for path in paths:
        ds = dcmread(path)
        ds.PatientID = pid
        ds.AccessionNumber = accession
        ds.StudyDate = date
        ds.save_as(path)
    return paths


def _populate(web: WebNode, tmp_path: Path) -> Populated:
    catalog, spool_dir = web.catalog, web.settings.node.spool_dir
    studies: dict[str, str] = {}
    study_ids: dict[str, int] = {}
    series: dict[str, list[str]] = {}
    # received in this order: a oldest, c newest
    for key, modality, name, pid, date in (
        ("a", "CT", "Doe^Jane", "PID-A", "20260101"),
        ("b", "MR", "Roe^Richard", "PID-B", "20260315"),
        ("c", "CT", "Doe^John", "PID-C", "20260620"),
    ):
        paths = _series(tmp_path / key, modality, name, pid, f"ACC-{key.upper()}", date)
        study_ids[key], studies[key], series[key] = ingest(catalog, spool_dir, paths)
    a_id = study_ids["a"]
    # the queue hands out the oldest job first: each is settled before the next is queued
    settled = []
    for timings, error in (({"decode": 0.5, "inference": 2.0}, None), ({"decode": 1.5}, "broke")):
        with catalog.sessions.begin() as session:
            job_id = queue_job(session, a_id, "ct-classical", series["a"], {})
            assert claim_job(session, "test") == job_id
            if error is None:
                assert finish_job(session, job_id, "test", timings)
            else:
                assert fail_job(session, job_id, "test", error, timings)
        settled.append(job_id)
    done, failed = settled
    with catalog.sessions.begin() as session:
        queued = queue_job(session, a_id, "ct-classical", series["a"], {})
    item = StoredEncoding("seg", SEG, new_uid(), None, "1.2", b"x")
    studies["d"], studies["e"] = new_uid(), new_uid()
    with catalog.sessions.begin() as session:
        queue_stored_results(
            session, tmp_path / "results", [item], {"seg": ["PACS", "ARCHIVE"]}, studies["d"]
        )
        held_job, _ = queue_stored_results(
            session, tmp_path / "results", [item], {"seg": ["PACS"]}, studies["e"]
        )
        hold_for_quality(session, held_job, [{"check": "c", "label": "l", "message": "m"}])
    by_state: dict[str, list[int]] = {}
    for d in deliveries.list_deliveries(catalog):
        by_state.setdefault(d.state, []).append(d.id)
    dead, pending = sorted(by_state["pending"])
    with catalog.sessions.begin() as session:
        session.execute(
            update(Delivery).where(Delivery.id == dead).values(state=DeliveryState.DEAD)
        )
    (held,) = by_state["held"]
    return Populated(web, studies, series, queued, done, failed, dead, pending, held)


@pytest.fixture
def api_node(tmp_path: Path) -> Iterator[Populated]:
    web = start_web_node(
        tmp_path / "var",
        models_dir=ROOT / "models",
        routes=RoutesFile.model_validate({"rules": [RULE]}),
    )
    try:
        yield _populate(web, tmp_path)
    finally:
        web.server.stop()
        web.recorder.stop()
        web.catalog.dispose()
