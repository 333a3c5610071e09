"""``pacs-node run --wait``, ``jobs`` and ``deliveries`` through the console script, on a
catalog holding a received study: JSON alone on stdout, transitions refused when not allowed."""

from __future__ import annotations

import json
from pathlib import Path

import yaml

from pacs_node.catalog.db import open_catalog
from tests.catalog_factory import ingest
from tests.conftest import run_cli
from tests.dicom_factory import write_series

ROOT = Path(__file__).parents[2]


def test_run_wait_then_list_retry_and_cancel(tmp_path: Path) -> None:
    config = tmp_path / "cfg"
    config.mkdir()
    data = tmp_path / "var"
    node = {"data_dir": str(data), "models_dir": str(ROOT / "models"), "fsync": False}
    (config / "node.yaml").write_text(yaml.safe_dump(node))
    (config / "peers.yaml").write_text("peers:\n  - {ae_title: CT1, host: 127.0.0.1}\n")
    (config / "routes.yaml").write_text("rules: []\n")
    catalog = open_catalog(f"sqlite:///{(data / 'catalog.sqlite').resolve()}")
    try:
        paths = write_series(tmp_path / "in", slices=8, rows=48, columns=48, spacing=(5, 5, 5))
        _, study_uid, _ = ingest(catalog, data / "spool", paths, "CT1")
    finally:
        catalog.dispose()
    cfg = ("--config", str(config))

    ran = run_cli(
        "run", study_uid, "--model", "ct-classical", "--wait", "--deliver", "--json", *cfg
    )
    (job,) = json.loads(ran.stdout)
    assert job["state"] == "done"
    assert job["study_uid"] == study_uid
    assert job["timings"]["infer_s"] >= 0

    listed = json.loads(run_cli("jobs", "--json", *cfg).stdout)
    assert [j["id"] for j in listed] == [job["id"]]

    deliveries = json.loads(run_cli("deliveries", "--json", *cfg).stdout)
    # SOURCE is CT1, which has no port: every result waits in the node, listed, with the reason
    assert {d["kind"] for d in deliveries} == {"seg", "sr", "gsps", "key-images", "pdf"}
    assert {(d["destination"], d["state"], d["held_for"]) for d in deliveries} == {
        ("CT1", "held", "destination")
    }
    assert "CT1" in deliveries[0]["last_error"]

    retried = run_cli("deliveries", "retry", str(deliveries[0]["id"]), *cfg)
    assert retried.stdout == ""
    pending = json.loads(run_cli("deliveries", "--state", "pending", "--json", *cfg).stdout)
    assert [d["id"] for d in pending] == [deliveries[0]["id"]]

    refused = run_cli("jobs", "cancel", str(job["id"]), *cfg, check=False)  # done is final
    assert refused.returncode == 1
    assert "queued or running" in refused.stderr
    assert run_cli("jobs", "retry", "999", *cfg, check=False).returncode == 1
