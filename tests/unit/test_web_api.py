"""The JSON API through real HTTP requests: credentials and roles on every operation, study
search and paging, one study in full, jobs, deliveries, re-run, models, routes and status."""

from __future__ import annotations

from typing import Any

from pacs_node.catalog.models import Role
from tests.api_node import Populated, api_node

__all__ = ["api_node"]

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


def _path(template: str, api_node: Populated) -> str:
    return template.format(**api_node.ids())


def test_every_operation_needs_credentials_and_a_viewer_changes_nothing(
    api_node: Populated,
) -> None:
    with api_node.web.client(role=None) as anonymous:
        for template in READS:
            answer = anonymous.get(_path(template, api_node))
            assert answer.status_code == 401, template
            assert answer.json() == {"detail": "authentication required"}
            assert answer.headers["www-authenticate"].startswith("Bearer")
        for method, template in CHANGES:
            assert anonymous.request(method, _path(template, api_node)).status_code == 401
        bad = anonymous.get("/api/studies", headers={"Authorization": "Bearer nonsense"})
        assert bad.status_code == 401
    with api_node.web.client(Role.VIEWER) as viewer:
        for template in READS:
            assert viewer.get(_path(template, api_node)).status_code == 200, template
        before = viewer.get(f"/api/studies/{api_node.studies['a']}").json()
        for method, template in CHANGES:
            answer = viewer.request(method, _path(template, api_node), json={})
            assert answer.status_code == 403, template
            assert answer.json() == {"detail": "the operator role is required"}
        assert viewer.get(f"/api/studies/{api_node.studies['a']}").json() == before


def test_studies_are_searched_and_paged_newest_first(api_node: Populated) -> None:
    a, b, c = (api_node.studies[k] for k in "abc")
    with api_node.web.client(Role.VIEWER) as client:

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
        assert set(uids(state="stable")) == {api_node.studies["d"], api_node.studies["e"]}
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


def test_one_study_in_full_and_how_it_was_routed(api_node: Populated) -> None:
    a = api_node.studies["a"]
    with api_node.web.client(Role.VIEWER) as client:
        detail = client.get(f"/api/studies/{a}").json()
        assert detail["study_uid"] == a
        assert [j["id"] for j in detail["jobs"]] == [
            api_node.done_job,
            api_node.failed_job,
            api_node.queued_job,
        ]
        assert [j["state"] for j in detail["jobs"]] == ["done", "failed", "queued"]
        assert detail["jobs"][0]["timings"] == {"decode": 0.5, "inference": 2.0}
        kinds = [(e["kind"], e["subject"]["kind"]) for e in detail["timeline"]]
        assert kinds[0] == ("receiving", "study")
        assert ("failed", "job") in kinds
        stored = client.get(f"/api/studies/{api_node.studies['d']}").json()
        assert [r["kind"] for r in stored["results"]] == ["seg"]
        assert {d["destination"] for d in stored["deliveries"]} == {"PACS", "ARCHIVE"}

        explained = client.get(f"/api/studies/{a}/explain").json()
        (verdict,) = explained["verdicts"]
        assert (verdict["rule"], verdict["matched"]) == ("ct", True)
        assert verdict["selected"] == api_node.series["a"]
        assert verdict["series"][0]["checks"][0]["attribute"] == "modality"
        assert explained["outcome"] is None  # never routed: the jobs were queued by hand
        mr = client.get(f"/api/studies/{api_node.studies['b']}/explain").json()
        assert mr["verdicts"][0]["matched"] is False

        for path in ("/api/studies/1.2.999", "/api/studies/1.2.999/explain"):
            answer = client.get(path)
            assert answer.status_code == 404
            assert answer.json() == {"detail": "no study 1.2.999"}
        assert client.get("/api/studies/not-a-uid").status_code == 422


def test_jobs_are_listed_cancelled_and_retried_by_the_operator(api_node: Populated) -> None:
    with api_node.web.client(Role.OPERATOR) as client:
        assert client.get("/api/jobs").json()["total"] == 5  # and the two stored-results jobs
        listed = client.get("/api/jobs", params={"study_uid": api_node.studies["a"]}).json()
        assert [j["id"] for j in listed["items"]] == [
            api_node.queued_job,
            api_node.failed_job,
            api_node.done_job,
        ]
        failed = client.get("/api/jobs", params={"state": "failed"}).json()
        assert (failed["total"], failed["items"][0]["id"]) == (1, api_node.failed_job)
        assert failed["items"][0]["error"]  # scrubbed of what could be patient data
        either = client.get("/api/jobs", params={"state": ["failed", "done"]}).json()
        assert either["total"] == 2
        of_b = client.get("/api/jobs", params={"study_uid": api_node.studies["b"]}).json()
        assert of_b["total"] == 0

        job = api_node.queued_job
        assert client.get(f"/api/jobs/{job}").json()["state"] == "queued"
        cancelled = client.post(f"/api/jobs/{job}/cancel")
        assert cancelled.status_code == 200
        assert cancelled.json()["state"] == "cancelled"
        again = client.post(f"/api/jobs/{job}/cancel")
        assert again.status_code == 409
        assert "cancelled" in again.json()["detail"]
        assert client.post(f"/api/jobs/{api_node.done_job}/retry").status_code == 409
        retried = client.post(f"/api/jobs/{job}/retry")
        assert retried.json()["state"] == "queued"

        for path in ("/api/jobs/999999", "/api/jobs/999999/cancel", "/api/jobs/999999/retry"):
            answer = client.request("GET" if path.endswith("999") else "POST", path)
            assert answer.status_code == 404, path
            assert answer.json() == {"detail": "no job 999999"}
        assert client.get("/api/jobs/0").status_code == 422
        assert client.get("/api/jobs/abc").status_code == 422

        timeline = client.get(f"/api/studies/{api_node.studies['a']}").json()["timeline"]
    by_hand = [(e["kind"], e["actor"]) for e in timeline if e["subject"]["id"] == str(job)]
    assert by_hand[-2:] == [("cancelled", "user:test-operator"), ("queued", "user:test-operator")]


def test_deliveries_are_listed_by_state_and_retried(api_node: Populated) -> None:
    with api_node.web.client(Role.OPERATOR) as client:
        listed = client.get("/api/deliveries").json()
        assert listed["total"] == 3
        made = (api_node.dead_delivery, api_node.pending_delivery, api_node.held_delivery)
        assert [d["id"] for d in listed["items"]] == sorted(made, reverse=True)
        dead = client.get("/api/deliveries", params={"state": "dead"}).json()["items"]
        assert [d["id"] for d in dead] == [api_node.dead_delivery]
        archive = client.get("/api/deliveries", params={"destination": "ARCHIVE"}).json()
        assert archive["total"] == 1

        retried = client.post(f"/api/deliveries/{api_node.dead_delivery}/retry")
        assert retried.status_code == 200
        assert (retried.json()["state"], retried.json()["attempts"]) == ("pending", 0)
        pending = client.post(f"/api/deliveries/{api_node.pending_delivery}/retry")
        assert pending.status_code == 409
        held = client.post(f"/api/deliveries/{api_node.held_delivery}/retry")
        assert held.status_code == 409
        assert "quality gate" in held.json()["detail"]
        missing = client.post("/api/deliveries/999999/retry")
        assert missing.status_code == 404
        assert missing.json() == {"detail": "no delivery 999999"}
        events = client.get(f"/api/studies/{api_node.studies['d']}").json()["timeline"]
    assert ("delivery_retry", "user:test-operator") in [(e["kind"], e["actor"]) for e in events]


def test_a_study_is_run_again_for_a_model(api_node: Populated) -> None:
    a, b = api_node.studies["a"], api_node.studies["b"]
    with api_node.web.client(Role.OPERATOR) as client:
        routed = client.post(f"/api/studies/{a}/rerun")
        assert routed.status_code == 202, routed.text
        (job,) = routed.json()["jobs"]
        assert (job["rule"], job["model"], job["state"]) == ("ct", "ct-classical", "queued")
        assert job["series_uids"] == api_node.series["a"]
        assert job["destinations"] == {"seg": ["PACS"]}

        body = {"model": "ct-classical", "series": api_node.series["a"]}
        chosen = client.post(f"/api/studies/{a}/rerun", json=body)
        assert chosen.status_code == 202, chosen.text
        assert chosen.json()["jobs"][0]["series_uids"] == api_node.series["a"]

        refusals = [
            (b, {}, 422, "nothing to run"),  # MR: no rule matches
            (b, {"model": "ct-classical"}, 422, "nothing to run"),  # and no CT series
            (a, {"model": "no-such-model"}, 422, "no model"),
            (a, {"series": api_node.series["b"]}, 422, "not in study"),
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
    queued_by = client_events(api_node, a, "queued")
    assert queued_by[-2:] == ["user:test-operator", "user:test-operator"]


def client_events(api_node: Populated, study_uid: str, kind: str) -> list[str | None]:
    with api_node.web.client(Role.VIEWER) as client:
        timeline = client.get(f"/api/studies/{study_uid}").json()["timeline"]
    return [e["actor"] for e in timeline if e["kind"] == kind]


def test_models_routes_and_status(api_node: Populated) -> None:
    with api_node.web.client(Role.VIEWER) as client:
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
