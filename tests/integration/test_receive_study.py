"""A scanner (dcmtk storescu) sends a CT and an MR series; the node stores, catalogs, assembles."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

import httpx
import pydicom
import pytest

from tests.conftest import NodeProcess, run_cli, storescu, wait_for
from tests.dicom_factory import new_uid, write_study
from tests.web_node import scrape

pytestmark = pytest.mark.integration


def _dataset_bytes(path: Path) -> bytes:
    """The encoded data set after the file meta group, as it travelled over the network."""
    with path.open("rb") as handle:
        ds = pydicom.dcmread(handle, stop_before_pixels=True)
        del ds
    raw = path.read_bytes()
    meta_end = 132 + 12 + int.from_bytes(raw[140:144], "little")
    return raw[meta_end:]


def test_ct_and_mr_series_become_one_stable_study(
    make_node: Callable[..., NodeProcess], tmp_path: Path
) -> None:
    node = make_node(quiet_period_s=2.0)
    assert node.studies() == []
    empty = node.cli("studies", "--json")
    assert empty.stdout.strip() == "[]"

    study_uid = write_study(tmp_path / "study", [("CT", 120), ("MR", 20)])
    sent = storescu(node, tmp_path / "study", extra=("+sd", "+r"))
    assert sent.returncode == 0, sent.stderr

    def stable() -> list[dict[str, object]] | None:
        studies = node.studies()
        return studies if studies and studies[0]["state"] == "stable" else None

    studies = wait_for(stable, 30, what="the study to become stable")
    assert len(studies) == 1
    study = studies[0]
    assert study["study_uid"] == study_uid
    assert study["instances"] == 140
    assert isinstance(study["instances"], int)
    series = sorted(study["series"], key=lambda s: s["modality"])
    assert [(s["modality"], s["instances"]) for s in series] == [("CT", 120), ("MR", 20)]
    assert all(s["series_uid"] for s in series)

    # The web face of the running node: ready with its job workers, and /metrics counts what
    # the Storage SCP's worker processes recorded (read from the catalog, not from memory).
    web = f"http://127.0.0.1:{node.node['web_port']}"
    ready = httpx.get(f"{web}/readyz", timeout=10).json()
    checks = {"catalog": "ok", "storage scp": "ok", "recorder": "ok", "job workers": "ok"}
    checks["audit trail"] = "ok"
    checks["node registration"] = "ok"
    assert ready == {"status": "ready", "checks": checks}
    received = scrape(web)[1]
    assert received[("pacs_node_received_instances_total", ())] == 140
    assert received[("pacs_node_instances", ())] == 140

    # Stored exactly as received: the data set bytes are those of the file storescu sent.
    for source in sorted((tmp_path / "study").rglob("*.dcm"))[:5]:
        ds = pydicom.dcmread(source, stop_before_pixels=True)
        stored = (
            node.data_dir
            / "spool"
            / ds.StudyInstanceUID
            / ds.SeriesInstanceUID
            / f"{ds.SOPInstanceUID}.dcm"
        )
        assert _dataset_bytes(stored) == _dataset_bytes(source)
        meta = pydicom.dcmread(stored, stop_before_pixels=True).file_meta
        assert meta.SourceApplicationEntityTitle.strip() == "STORESCU"

    # A late instance puts the study back to receiving and records that it changed.
    late = write_study(tmp_path / "late", [("CT", 1)])
    assert late != study_uid
    ds = pydicom.dcmread(next((tmp_path / "late").rglob("*.dcm")))
    ds.StudyInstanceUID = study_uid
    ds.SOPInstanceUID = new_uid()
    ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    late_file = tmp_path / "late.dcm"
    ds.save_as(late_file)
    assert storescu(node, late_file).returncode == 0
    reopened = wait_for(
        lambda: [s for s in node.studies() if s["reopened_count"] == 1], 20, what="reopen"
    )
    assert reopened[0]["instances"] == 141
    wait_for(
        lambda: node.studies()[0]["state"] == "stable", 30, what="stable again after the change"
    )


def test_studies_json_is_only_json_on_stdout(make_node: Callable[..., NodeProcess]) -> None:
    node = make_node()
    result = node.cli("studies", "--json")
    assert json.loads(result.stdout) == []
    assert "storage SCP" not in result.stdout


def test_echo_and_version(make_node: Callable[..., NodeProcess]) -> None:
    node = make_node()
    target = f"{node.ae_title}@127.0.0.1:{node.port}"
    ok = run_cli("echo", target, "--calling-ae", "PACSNODE_SCU")
    assert "success" in ok.stdout
    unknown_caller = run_cli("echo", target, "--calling-ae", "INTRUDER", check=False)
    assert unknown_caller.returncode != 0
    wrong_called = run_cli(
        "echo", f"OTHER@127.0.0.1:{node.port}", "--calling-ae", "PACSNODE_SCU", check=False
    )
    assert wrong_called.returncode != 0
    assert run_cli("version").stdout.startswith("pacs-node ")
