"""An operator's day in headless Chromium against a whole node, a real Orthanc and a real FHIR
server: sign in through the login page, watch a scanner's study arrive and its job finish on the
studies page, open the viewer and switch a segment off, send a dead delivery again from the
deliveries page, then reject the result in the viewer and find the IOCM rejection note in
Orthanc and the EHR's report entered-in-error. Screenshots of each step are kept beside the
test."""

from __future__ import annotations

import json
import subprocess
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import yaml
from pydicom import dcmread
from selenium import webdriver
from selenium.webdriver.common.by import By

from tests.browser import chromium
from tests.conftest import PACS_NODE, NodeProcess, clean_env, free_port, storescu, wait_for
from tests.integration.test_dashboard_browser import canvas_rgb, drawn
from tests.integration.test_results_fhir_server import fhir_base
from tests.orthanc import OrthancProcess

__all__ = ["chromium", "fhir_base"]

pytestmark = pytest.mark.integration

ROOT = Path(__file__).resolve().parents[2]
KOS = "1.2.840.10008.5.1.4.1.1.88.59"
FHIR_JSON = {"Content-Type": "application/fhir+json"}
PASSWORD = "a long operator password"


@pytest.fixture
def orthanc_pacs(tmp_path: Path) -> Iterator[list[OrthancProcess]]:
    started: list[OrthancProcess] = []
    yield started
    for orthanc in started:
        orthanc.stop()


def _deliveries(node: NodeProcess) -> list[dict[str, Any]]:
    return json.loads(node.cli("deliveries", "--json").stdout)  # type: ignore[no-any-return]


def _add_operator(node: NodeProcess) -> None:
    """The admin's door for accounts: ``pacs-node users add`` with the password on stdin."""
    done = subprocess.run(
        [
            PACS_NODE,
            "users",
            "add",
            "carla",
            "--role",
            "operator",
            "--password-stdin",
            "--config",
            str(node.config_dir),
        ],
        input=PASSWORD + "\n",
        capture_output=True,
        text=True,
        env=clean_env(),
        timeout=120,
        check=False,
    )
    assert done.returncode == 0, done.stderr


def test_an_operator_signs_in_follows_a_study_retries_a_delivery_and_rejects_the_result(
    tmp_path: Path,
    make_node: Callable[..., NodeProcess],
    orthanc_pacs: list[OrthancProcess],
    fhir_base: str,
    chromium: webdriver.Chrome,
) -> None:
    from pacs_node.demo import make_study
    from pacs_node.results import FhirOptions

    orthanc_port = free_port()
    routes = yaml.safe_load((ROOT / "ae_config" / "routes.yaml").read_text())
    (rule,) = [r for r in routes["rules"] if r["name"] == "ct-body"]
    dicom = ("seg", "sr", "gsps", "key_images")
    rule["send"] = {**{kind: ["PACS"] for kind in dicom}, "pdf": ["ARCHIVE"], "fhir": ["EHR"]}
    node = make_node(
        start=False,
        peers=[
            {"ae_title": "ORTHANC", "host": "127.0.0.1", "port": orthanc_port},
            {"ae_title": "STORESCU", "host": "127.0.0.1"},
        ],
        models_dir=str(ROOT / "models"),
        job_workers=1,
        delivery_max_attempts=1,  # the archive that is down: dead at its first refusal
        delivery_backoff_s=0.5,
    )
    node.destinations = {
        "PACS": {"type": "dimse", "peer": "ORTHANC"},
        "ARCHIVE": {"type": "dimse", "ae_title": "ARCHIVE", "host": "127.0.0.1", "port": 9},
        "EHR": {"type": "fhir", "base_url": fhir_base},
    }
    node.config_dir.mkdir(parents=True, exist_ok=True)
    (node.config_dir / "routes.yaml").write_text(yaml.safe_dump({"rules": [rule]}))
    node.start()
    orthanc = OrthancProcess(
        tmp_path / "orthanc",
        free_port(),
        orthanc_port,
        modalities={"node": [node.ae_title, "127.0.0.1", node.port]},
        dicomweb=True,
    ).start()
    orthanc_pacs.append(orthanc)
    _add_operator(node)
    web = f"http://127.0.0.1:{node.node['web_port']}"
    driver = chromium

    def shot(name: str) -> None:
        driver.save_screenshot(str(tmp_path / f"{name}.png"))

    # sign in through the login page; the studies page is where it lands
    driver.get(f"{web}/")
    wait_for(lambda: "/login" in driver.current_url, 10, what="the login page")
    driver.find_element(By.NAME, "name").send_keys("carla")
    driver.find_element(By.NAME, "password").send_keys(PASSWORD)
    driver.find_element(By.CSS_SELECTOR, "form button[type=submit]").click()
    wait_for(lambda: driver.current_url.rstrip("/") == web, 15, what="signed in")
    shot("1-signed-in")

    # a scanner sends a study; the page shows it arrive and its job run to the end
    study_uid, paths = make_study(tmp_path / "ct", seed=4711)
    patient_id = str(dcmread(paths[0], stop_before_pixels=True).PatientID)
    patient = {
        "resourceType": "Patient",
        "identifier": [{"system": FhirOptions().patient_system, "value": patient_id}],
    }
    assert httpx.post(f"{fhir_base}/Patient", json=patient, headers=FHIR_JSON).status_code == 201
    assert storescu(node, *paths).returncode == 0

    def row_text() -> str:
        return str(
            driver.execute_script(
                "const row = document.querySelector(arguments[0]);return row ? row.innerText : '';",
                f'tr[data-study="{study_uid}"]',
            )
        )

    wait_for(row_text, 30, what="the study on the studies page")
    shot("2-study-arrived")
    wait_for(lambda: "ct-torso-organs: done" in row_text(), 240, what="the job done, on the page")
    shot("3-job-done")

    # the archive is down: its delivery dies; the operator sends it again from the page
    def dead() -> list[dict[str, Any]]:
        return [d for d in _deliveries(node) if d["state"] == "dead"]

    (gone,) = wait_for(dead, 60, what="the archive's delivery dead")
    driver.get(f"{web}/deliveries")
    button = f'tr[data-delivery="{gone["id"]}"] form button'
    driver.find_element(By.CSS_SELECTOR, button).click()
    wait_for(lambda: "retried=" in driver.current_url, 10, what="the retry answered")
    shot("4-delivery-retried")
    # the retry is on the study's timeline, by the operator; the archive refuses once more
    token = json.loads(node.cli("tokens", "create", "carla", "--json").stdout)["token"]
    detail = httpx.get(
        f"{web}/api/studies/{study_uid}", headers={"Authorization": f"Bearer {token}"}, timeout=30
    ).json()
    retries = [e for e in detail["timeline"] if e["kind"] == "delivery_retry"]
    assert [(e["actor"], e["detail"]["delivery"]) for e in retries] == [("user:carla", gone["id"])]
    wait_for(
        lambda: next(d for d in _deliveries(node) if d["id"] == gone["id"])["state"] == "dead",
        60,
        what="the dead delivery tried again",
    )

    # every other result reached Orthanc and the EHR
    def settled() -> bool:
        rows = [d for d in _deliveries(node) if d["destination"] != "ARCHIVE"]
        return bool(rows) and all(d["state"] == "delivered" for d in rows)

    wait_for(settled, 120, what="the results in Orthanc and the EHR")

    # the viewer: the segmentation drawn; a segment switched off changes the canvas
    driver.get(f"{web}/studies/{study_uid}")
    link = driver.execute_script("return document.querySelector('a.open-viewer').href")
    driver.get(link)
    wait_for(lambda: drawn(driver), 30, what="the first slice drawn")
    before, shown = canvas_rgb(driver), drawn(driver)
    driver.find_element(By.CSS_SELECTOR, "input.segment").click()
    wait_for(lambda: drawn(driver) != shown, 15, what="the canvas redrawn")
    assert (canvas_rgb(driver) != before).any()
    shot("5-viewer")

    # reject it in the viewer, for quality
    driver.find_element(By.CSS_SELECTOR, "#reject-form input[name=reason]").send_keys(
        "liver outline leaks into the right kidney"
    )
    driver.find_element(By.ID, "reject").click()
    wait_for(lambda: "done=rejected" in driver.current_url, 15, what="the rejection answered")
    assert driver.find_element(By.ID, "review-state").text.startswith("This result was rejected")
    shot("6-rejected")

    def note_in_orthanc() -> list[Any]:
        return httpx.get(
            f"{orthanc.dicomweb_url}/instances", params={"SOPClassUID": KOS}, timeout=30
        ).json()

    (note,) = wait_for(note_in_orthanc, 60, what="the rejection note in Orthanc")
    assert note["0020000D"]["Value"][0] == study_uid

    def report_status() -> str:
        bundle = httpx.get(f"{fhir_base}/DiagnosticReport", timeout=30).json()
        return str(bundle["entry"][0]["resource"]["status"])

    wait_for(lambda: report_status() == "entered-in-error", 60, what="the report withdrawn")
