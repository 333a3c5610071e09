"""The quality gate in a running node, through the doors a site uses: a scanner (storescu)
sends phantom CT studies, the route's limits (routes.yaml ``qa_limits``) make the result fail,
and under ``qa: hold`` nothing reaches the PACS until ``pacs-node results release`` (or ever,
after ``reject``); under ``qa: flag`` the result goes out with the failed checks named in the
SR in Orthanc and in the DiagnosticReport on a real FHIR server."""

from __future__ import annotations

import io
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx
import pytest
import yaml
from pydicom import dcmread

from tests.conftest import NodeProcess, free_port, storescu, wait_for
from tests.dicom_factory import write_series
from tests.integration.test_pipeline_orthanc import (
    DICOM_SEND_KEYS,
    KINDS,
    _check_in_orthanc,
    _json,
    _routed_node,
    orthancs,  # noqa: F401 (a fixture)
)
from tests.integration.test_results_fhir_server import fhir_base  # noqa: F401 (a fixture)
from tests.orthanc import OrthancProcess

pytestmark = pytest.mark.integration

# ct-classical's body is litres: a normal range of at most 1 mL fails every result
FAILING_LIMITS = {"sizes": {"body": [0, 1]}}
QUALITY_TEXT = "Quality check failed (size_range)"


def _routes(qa: str, send: dict[str, list[str]]) -> str:
    rule = {
        "name": "ct-body",
        "when": {"modality": "CT", "slices": {"min": 10}},
        "models": ["ct-classical"],
        "send": send,
        "qa": qa,
        "qa_limits": FAILING_LIMITS,
    }
    return yaml.safe_dump({"rules": [rule]})


def _orthanc(tmp_path: Path, port: int, node: NodeProcess) -> OrthancProcess:
    return OrthancProcess(
        tmp_path / "orthanc",
        free_port(),
        port,
        modalities={"node": [node.ae_title, "127.0.0.1", node.port]},
    ).start()


def _send_study(node: NodeProcess, folder: Path) -> str:
    paths = write_series(folder, slices=16, rows=64, columns=64, spacing=(5, 5, 5))
    assert storescu(node, *paths).returncode == 0  # the scanner
    return str(dcmread(paths[0], stop_before_pixels=True).StudyInstanceUID)


def _jobs_done(node: NodeProcess, count: int) -> list[dict[str, Any]] | None:
    jobs = _json(node, "jobs")
    for job in jobs:
        if job["state"] == "failed":
            raise AssertionError(f"job failed: {job['error']}\n{node.log_text()[-3000:]}")
    done = [j for j in jobs if j["state"] == "done"]
    return jobs if len(done) == count else None


def _by_study(jobs: list[dict[str, Any]], study_uid: str) -> dict[str, Any]:
    (job,) = [j for j in jobs if j["study_uid"] == study_uid]
    return job


def test_a_failed_result_is_held_then_released_or_rejected(
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    make_node: Callable[..., NodeProcess],
    orthancs: list[OrthancProcess],  # noqa: F811
) -> None:
    orthanc_port = free_port()
    send = {kind: ["ORTHANC"] for kind in DICOM_SEND_KEYS}
    node = _routed_node(make_node, orthanc_port, _routes("hold", send))
    orthanc = _orthanc(tmp_path, orthanc_port, node)
    orthancs.append(orthanc)

    released_uid = _send_study(node, tmp_path / "a")
    rejected_uid = _send_study(node, tmp_path / "b")
    jobs = wait_for(lambda: _jobs_done(node, 2), 240, interval=0.5, what="both routed jobs")
    for job in jobs:
        quality = job["quality"]
        assert (quality["mode"], quality["verdict"], quality["decision"]) == ("hold", "fail", None)
        (failure,) = quality["failures"]
        assert (failure["check"], failure["label"], failure["limit"]) == (
            "size_range",
            "body",
            "[0, 1] mL",
        )
        assert failure["value"].endswith(" mL")
        assert "larger than the normal range" in failure["message"]

    held = _json(node, "deliveries")
    assert len(held) == 2 * len(KINDS)
    for row in held:
        assert (row["state"], row["held_for"], row["attempts"]) == ("held", "quality", 0), row
        assert "size_range body" in row["last_error"]
    monkeypatch.setenv("COLUMNS", "300")  # the readable listings, unwrapped, say why
    assert "held (quality)" in node.cli("deliveries").stdout
    assert "fail (hold): size_range body" in node.cli("jobs").stdout
    # the outbox keeps running: nothing reaches the PACS while the results are held
    wait_for(lambda: orthanc.get("/system"), 10, what="Orthanc")
    assert orthanc.get("/statistics")["CountInstances"] == 0
    # a held-for-quality delivery is not retried one by one
    retry = node.cli("deliveries", "retry", str(held[0]["id"]), check=False)
    assert retry.returncode == 1

    release_job = _by_study(jobs, released_uid)["id"]
    reject_job = _by_study(jobs, rejected_uid)["id"]
    node.cli("results", "release", str(release_job), "--actor", "dr.house")
    node.cli("results", "reject", str(reject_job), "--actor", "dr.house", "--reason", "nonsense")
    again = node.cli("results", "release", str(reject_job), check=False)
    assert again.returncode == 1  # rejected for good: nothing held is left to release
    assert "no result held" in again.stderr

    def settled() -> list[dict[str, Any]] | None:
        rows = _json(node, "deliveries")
        mine = [d for d in rows if d["job_id"] == release_job]
        return rows if all(d["state"] == "delivered" for d in mine) else None

    rows = wait_for(settled, 60, interval=0.5, what="the released result in the PACS")
    sent = [d for d in rows if d["job_id"] == release_job]
    _check_in_orthanc(orthanc, released_uid, sent)
    # built flagged while held: the radiologist sees the failed checks in what was released
    (sr_row,) = [d for d in sent if d["kind"] == "sr"]
    (text,) = _quality_texts(orthanc, sr_row["sop_instance_uid"])
    assert text.startswith(QUALITY_TEXT)
    rejected = [d for d in rows if d["job_id"] == reject_job]
    assert {d["state"] for d in rejected} == {"rejected"}
    assert {d["last_error"] for d in rejected} == {"rejected: Rejected for Quality Reasons"}
    assert orthanc.get("/statistics")["CountInstances"] == len(sent)
    decisions = {j["id"]: j["quality"]["decision"] for j in _json(node, "jobs")}
    assert decisions == {release_job: "released", reject_job: "rejected"}

    # the study run twice more, both held: once the newer result is released, the older one
    # would reach the PACS after it, so its release is refused (it can still be rejected)
    node.cli("run", released_uid)
    node.cli("run", released_uid)
    rerun = wait_for(lambda: _jobs_done(node, 4), 240, interval=0.5, what="both re-runs")
    older, newer = sorted(j["id"] for j in rerun)[2:]
    node.cli("results", "release", str(newer))
    stale = node.cli("results", "release", str(older), check=False)
    assert stale.returncode == 1
    assert f"job {newer}, a newer result" in stale.stderr
    node.cli("results", "reject", str(older))


def _quality_texts(orthanc: OrthancProcess, sop_instance_uid: str) -> list[str]:
    """The text items of the SR's Qualitative Evaluations container, as Orthanc stores it."""
    (found,) = [
        f
        for f in orthanc.post("/tools/lookup", content=sop_instance_uid)
        if f["Type"] == "Instance"
    ]
    raw = httpx.get(f"{orthanc.url}/instances/{found['ID']}/file", timeout=30)
    sr = dcmread(io.BytesIO(raw.content))
    return [
        str(item.TextValue)
        for container in sr.ContentSequence
        if container.ConceptNameCodeSequence[0].CodeMeaning == "Qualitative Evaluations"
        for item in container.ContentSequence
    ]


def test_a_flagged_result_reaches_the_pacs_and_the_ehr_with_the_failed_checks(
    tmp_path: Path,
    make_node: Callable[..., NodeProcess],
    orthancs: list[OrthancProcess],  # noqa: F811
    fhir_base: str,  # noqa: F811
) -> None:
    orthanc_port = free_port()
    send = {**{kind: ["ORTHANC"] for kind in DICOM_SEND_KEYS}, "fhir": ["EHR"]}
    ehr = {"type": "fhir", "base_url": fhir_base, "create_patient": True}
    node = _routed_node(make_node, orthanc_port, _routes("flag", send), {"EHR": ehr})
    orthanc = _orthanc(tmp_path, orthanc_port, node)
    orthancs.append(orthanc)

    study_uid = _send_study(node, tmp_path / "ct")
    (job,) = wait_for(lambda: _jobs_done(node, 1), 240, interval=0.5, what="the routed job")
    assert (job["quality"]["mode"], job["quality"]["verdict"]) == ("flag", "fail")

    def delivered() -> list[dict[str, Any]] | None:
        rows = _json(node, "deliveries")
        ok = {d["kind"] for d in rows} == KINDS | {"fhir"}
        return rows if ok and all(d["state"] == "delivered" for d in rows) else None

    rows = wait_for(delivered, 120, interval=0.5, what="every delivery")
    _check_in_orthanc(orthanc, study_uid, [d for d in rows if d["kind"] != "fhir"])
    (sr_row,) = [d for d in rows if d["kind"] == "sr"]
    texts = _quality_texts(orthanc, sr_row["sop_instance_uid"])
    assert len(texts) == 1
    assert texts[0].startswith(QUALITY_TEXT)
    assert "Body measures" in texts[0]

    reports = httpx.get(f"{fhir_base}/DiagnosticReport", timeout=30).json()["entry"]
    assert len(reports) == 1
    conclusion = reports[0]["resource"]["conclusion"]
    assert conclusion.split(" (preliminary, verify before use). ")[1].startswith(
        "Quality check failed: Body measures"
    )
    observations = httpx.get(f"{fhir_base}/Observation", timeout=30).json()["entry"]
    noted = [
        o["resource"]
        for o in observations
        if any(QUALITY_TEXT in n["text"] for n in o["resource"].get("note", []))
    ]
    assert noted
    assert {o["bodySite"]["text"] for o in noted} == {"Body"}
