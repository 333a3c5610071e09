"""The JSON API through real HTTP requests: credentials and roles on every operation, study
search and paging, one study in full, jobs, deliveries, re-run, models, routes and status."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from pydicom import dcmread
from sqlalchemy import update

from pacs_node.catalog.jobs import claim_job, fail_job, finish_job, queue_job
from pacs_node.catalog.models import Delivery, DeliveryState, Role
from pacs_node.catalog.quality import hold_for_quality
from pacs_node.catalog.results import StoredEncoding
from pacs_node.routing.rules import RoutesFile
from tests.catalog_factory import ingest, queue_stored_results
from tests.dicom_factory import new_uid, write_series
from tests.web_node import WebNode, start_web_node

ROOT = Path(__file__).parents[2]
SEG = "1.2.840.10008.5.1.4.1.1.66.4"
RULE: dict[str, object] = {
    "name": "ct",
    "when": {"modality": "CT"},
    "models": ["ct-classical"],
    "send": {"seg": ["PACS"]},
}
# Every change the API offers, as (method, path template): a viewer gets 403 on each.
CHANGES = [
    ("POST", "/api/jobs/{job}/cancel"),
    ("POST", "/api/jobs/{job}/retry"),
    ("POST", "/api/deliveries/{delivery}/retry"),
    ("POST", "/api/studies/{study}/rerun"),
]
READS = [
    "/api/studies",
    "/api/studies/{study}",
    "/api/studies/{study}/explain",
    "/api/jobs",
    "/api/jobs/{job}",
    "/api/deliveries",
    "/api/models",
    "/api/routes",
    "/api/status",
]


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
    page = web.client(Role.VIEWER).get("/api/deliveries", params={"limit": 10}).json()["items"]
    by_state: dict[str, list[int]] = {}
    for d in page:
        by_state.setdefault(d["state"], []).append(d["id"])
    dead, pending = sorted(by_state["pending"])
    with catalog.sessions.begin() as session:
        session.execute(
            update(Delivery).where(Delivery.id == dead).values(state=DeliveryState.DEAD)
        )
    (held,) = by_state["held"]
    return Populated(web, studies, series, queued, done, failed, dead, pending, held)


@pytest.fixture
def node(tmp_path: Path) -> Iterator[Populated]:
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


def _path(template: str, node: Populated) -> str:
    return template.format(**node.ids())


def test_every_operation_needs_credentials_and_a_viewer_changes_nothing(node: Populated) -> None:
    with node.web.client(role=None) as anonymous:
        for template in READS:
            answer = anonymous.get(_path(template, node))
            assert answer.status_code == 401, template
            assert answer.json() == {"detail": "authentication required"}
            assert answer.headers["www-authenticate"].startswith("Bearer")
        for method, template in CHANGES:
            assert anonymous.request(method, _path(template, node)).status_code == 401
        bad = anonymous.get("/api/studies", headers={"Authorization": "Bearer nonsense"})
        assert bad.status_code == 401
    with node.web.client(Role.VIEWER) as viewer:
        for template in READS:
            assert viewer.get(_path(template, node)).status_code == 200, template
        before = viewer.get(f"/api/studies/{node.studies['a']}").json()
        for method, template in CHANGES:
            answer = viewer.request(method, _path(template, node), json={})
            assert answer.status_code == 403, template
            assert answer.json() == {"detail": "the operator role is required"}
        assert viewer.get(f"/api/studies/{node.studies['a']}").json() == before


def test_studies_are_searched_and_paged_newest_first(node: Populated) -> None:
    a, b, c = (node.studies[k] for k in "abc")
    with node.web.client(Role.VIEWER) as client:

        def uids(**params: Any) -> list[str]:
            answer = client.get("/api/studies", params=params)
            assert answer.status_code == 200, answer.text
            return [s["study_uid"] for s in answer.json()["items"]]

        everything = client.get("/api/studies").json()
        assert everything["total"] == 5  # a, b, c and the two stored-results studies
        assert [s["study_uid"] for s in everything["items"]][-3:] == [c, b, a]
        assert uids(patient_name="doe") == [c, a]
        assert uids(patient_name="DOE^JANE") == [a]
        assert uids(patient_id="pid-b") == [b]
        assert uids(accession_number="ACC-C") == [c]
        assert uids(study_date_from="20260301") == [c, b]
        assert uids(study_date_from="20260301", study_date_to="20260331") == [b]
        assert uids(modality="mr") == [b]
        assert uids(modality="CT", patient_name="jane") == [a]
        assert uids(patient_name="%") == []  # a wildcard is a character like any other
        assert set(uids(state="stable")) == {node.studies["d"], node.studies["e"]}
        assert len(uids(state=["stable", "receiving"])) == 5

        first = client.get("/api/studies", params={"limit": 2, "offset": 0}).json()
        second = client.get("/api/studies", params={"limit": 2, "offset": 2}).json()
        last = client.get("/api/studies", params={"limit": 2, "offset": 4}).json()
        assert (first["total"], first["limit"], first["offset"]) == (5, 2, 0)
        pages = [s["study_uid"] for p in (first, second, last) for s in p["items"]]
        assert pages == [s["study_uid"] for s in everything["items"]]
        assert len(last["items"]) == 1

        found = client.get("/api/studies", params={"accession_number": "ACC-A"}).json()["items"]
        (study,) = found
        assert study["patient_id"] == "PID-A"
        assert study["series"][0]["modality"] == "CT"
        assert study["series"][0]["instances"] == 4
        for params in (
            {"study_date_from": "2026-01-01"},
            {"limit": 0},
            {"offset": -1},
            {"state": "x"},
        ):
            answer = client.get("/api/studies", params=params)
            assert answer.status_code == 422, params
            assert "detail" in answer.json()


def test_one_study_in_full_and_how_it_was_routed(node: Populated) -> None:
    a = node.studies["a"]
    with node.web.client(Role.VIEWER) as client:
        detail = client.get(f"/api/studies/{a}").json()
        assert detail["study_uid"] == a
        assert [j["id"] for j in detail["jobs"]] == [
            node.done_job,
            node.failed_job,
            node.queued_job,
        ]
        assert [j["state"] for j in detail["jobs"]] == ["done", "failed", "queued"]
        assert detail["jobs"][0]["timings"] == {"decode": 0.5, "inference": 2.0}
        kinds = [(e["kind"], e["subject"]["kind"]) for e in detail["timeline"]]
        assert kinds[0] == ("receiving", "study")
        assert ("failed", "job") in kinds
        stored = client.get(f"/api/studies/{node.studies['d']}").json()
        assert [r["kind"] for r in stored["results"]] == ["seg"]
        assert {d["destination"] for d in stored["deliveries"]} == {"PACS", "ARCHIVE"}

        explained = client.get(f"/api/studies/{a}/explain").json()
        (verdict,) = explained["verdicts"]
        assert (verdict["rule"], verdict["matched"]) == ("ct", True)
        assert verdict["selected"] == node.series["a"]
        assert verdict["series"][0]["checks"][0]["attribute"] == "modality"
        assert explained["outcome"] is None  # never routed: the jobs were queued by hand
        mr = client.get(f"/api/studies/{node.studies['b']}/explain").json()
        assert mr["verdicts"][0]["matched"] is False

        for path in ("/api/studies/1.2.999", "/api/studies/1.2.999/explain"):
            answer = client.get(path)
            assert answer.status_code == 404
            assert answer.json() == {"detail": "no study 1.2.999"}
        assert client.get("/api/studies/not-a-uid").status_code == 422


def test_jobs_are_listed_cancelled_and_retried_by_the_operator(node: Populated) -> None:
    with node.web.client(Role.OPERATOR) as client:
        assert client.get("/api/jobs").json()["total"] == 5  # and the two stored-results jobs
        listed = client.get("/api/jobs", params={"study_uid": node.studies["a"]}).json()
        assert [j["id"] for j in listed["items"]] == [
            node.queued_job,
            node.failed_job,
            node.done_job,
        ]
        failed = client.get("/api/jobs", params={"state": "failed"}).json()
        assert (failed["total"], failed["items"][0]["id"]) == (1, node.failed_job)
        assert failed["items"][0]["error"]  # scrubbed of what could be patient data
        either = client.get("/api/jobs", params={"state": ["failed", "done"]}).json()
        assert either["total"] == 2
        assert client.get("/api/jobs", params={"study_uid": node.studies["b"]}).json()["total"] == 0

        job = node.queued_job
        assert client.get(f"/api/jobs/{job}").json()["state"] == "queued"
        cancelled = client.post(f"/api/jobs/{job}/cancel")
        assert cancelled.status_code == 200
        assert cancelled.json()["state"] == "cancelled"
        again = client.post(f"/api/jobs/{job}/cancel")
        assert again.status_code == 409
        assert "cancelled" in again.json()["detail"]
        assert client.post(f"/api/jobs/{node.done_job}/retry").status_code == 409
        retried = client.post(f"/api/jobs/{job}/retry")
        assert retried.json()["state"] == "queued"

        for path in ("/api/jobs/999999", "/api/jobs/999999/cancel", "/api/jobs/999999/retry"):
            answer = client.request("GET" if path.endswith("999") else "POST", path)
            assert answer.status_code == 404, path
            assert answer.json() == {"detail": "no job 999999"}
        assert client.get("/api/jobs/0").status_code == 422
        assert client.get("/api/jobs/abc").status_code == 422

        timeline = client.get(f"/api/studies/{node.studies['a']}").json()["timeline"]
    by_hand = [(e["kind"], e["actor"]) for e in timeline if e["subject"]["id"] == str(job)]
    assert by_hand[-2:] == [("cancelled", "user:test-operator"), ("queued", "user:test-operator")]


def test_deliveries_are_listed_by_state_and_retried(node: Populated) -> None:
    with node.web.client(Role.OPERATOR) as client:
        listed = client.get("/api/deliveries").json()
        assert listed["total"] == 3
        assert [d["id"] for d in listed["items"]] == sorted(
            (node.dead_delivery, node.pending_delivery, node.held_delivery), reverse=True
        )
        dead = client.get("/api/deliveries", params={"state": "dead"}).json()["items"]
        assert [d["id"] for d in dead] == [node.dead_delivery]
        archive = client.get("/api/deliveries", params={"destination": "ARCHIVE"}).json()
        assert archive["total"] == 1

        retried = client.post(f"/api/deliveries/{node.dead_delivery}/retry")
        assert retried.status_code == 200
        assert (retried.json()["state"], retried.json()["attempts"]) == ("pending", 0)
        pending = client.post(f"/api/deliveries/{node.pending_delivery}/retry")
        assert pending.status_code == 409
        held = client.post(f"/api/deliveries/{node.held_delivery}/retry")
        assert held.status_code == 409
        assert "quality gate" in held.json()["detail"]
        missing = client.post("/api/deliveries/999999/retry")
        assert missing.status_code == 404
        assert missing.json() == {"detail": "no delivery 999999"}
        events = client.get(f"/api/studies/{node.studies['d']}").json()["timeline"]
    assert ("delivery_retry", "user:test-operator") in [(e["kind"], e["actor"]) for e in events]


def test_a_study_is_run_again_for_a_model(node: Populated) -> None:
    a, b = node.studies["a"], node.studies["b"]
    with node.web.client(Role.OPERATOR) as client:
        routed = client.post(f"/api/studies/{a}/rerun")
        assert routed.status_code == 202, routed.text
        (job,) = routed.json()["jobs"]
        assert (job["rule"], job["model"], job["state"]) == ("ct", "ct-classical", "queued")
        assert job["series_uids"] == node.series["a"]
        assert job["destinations"] == {"seg": ["PACS"]}

        chosen = client.post(
            f"/api/studies/{a}/rerun", json={"model": "ct-classical", "series": node.series["a"]}
        )
        assert chosen.status_code == 202
        assert chosen.json()["jobs"][0]["series_uids"] == node.series["a"]

        refusals = [
            (b, {}, 422, "nothing to run"),  # MR: no rule matches
            (b, {"model": "ct-classical"}, 422, "nothing to run"),  # and no CT series
            (a, {"model": "no-such-model"}, 422, "no model"),
            (a, {"series": node.series["b"]}, 422, "not in study"),
            ("1.2.999", {}, 404, "no study 1.2.999"),
        ]
        for study, body, code, detail in refusals:
            answer = client.post(f"/api/studies/{study}/rerun", json=body)
            assert answer.status_code == code, (body, answer.text)
            assert detail in answer.json()["detail"]
        for body in ({"model": "../etc"}, {"series": ["x"]}, {"other": 1}):
            assert client.post(f"/api/studies/{a}/rerun", json=body).status_code == 422
        jobs = client.get("/api/jobs", params={"study_uid": a, "state": "queued"}).json()
    assert jobs["total"] == 3  # the one queued before and the two re-runs
    queued_by = client_events(node, a, "queued")
    assert queued_by[-2:] == ["user:test-operator", "user:test-operator"]


def client_events(node: Populated, study_uid: str, kind: str) -> list[str | None]:
    with node.web.client(Role.VIEWER) as client:
        timeline = client.get(f"/api/studies/{study_uid}").json()["timeline"]
    return [e["actor"] for e in timeline if e["kind"] == kind]


def test_models_routes_and_status(node: Populated) -> None:
    with node.web.client(Role.VIEWER) as client:
        models = {m["name"]: m for m in client.get("/api/models").json()}
        routes = client.get("/api/routes").json()
        status = client.get("/api/status").json()
    classical = models["ct-classical"]
    assert classical["kind"] == "classical"
    assert classical["card"].startswith("# ct-classical")
    assert [label["name"] for label in classical["labels"]][:2] == ["body", "lung_left"]
    assert classical["allowed"] is True
    organs = models["ct-torso-organs"]
    assert organs["held_out"]["cases"] > 0
    assert 0.5 < organs["held_out"]["labels"]["liver"]["dice_mean"] <= 1.0
    assert "not for clinical use" in organs["intended_use"]
    assert "path" not in organs  # the server's folders are not the caller's business

    (rule,) = routes
    assert (rule["name"], rule["models"], rule["when"]) == (
        "ct",
        ["ct-classical"],
        {"modality": {"match": ["CT"]}} | rule["when"],
    )
    assert rule["send"] == {"seg": ["PACS"]}

    assert status["healthy"] is True
    assert status["catalog_reachable"] is True
    assert status["studies"] == 5
    assert status["checks"] == {}
