"""``pacs-node demo`` against a node the test starts: the phantom study is received, routed by
the shipped rules, processed, and its results wait in the node (no destination is configured);
an unrouted study and a node that does not answer end with the reason and a non-zero status."""

from __future__ import annotations

import json
import re
import shutil
from collections.abc import Callable
from pathlib import Path

import pytest

from tests.conftest import NodeProcess, free_port, run_cli

pytestmark = pytest.mark.integration

ROOT = Path(__file__).resolve().parents[2]


def _node(make_node: Callable[..., NodeProcess], routes: bool) -> NodeProcess:
    node = make_node(
        start=False,
        models_dir=str(ROOT / "models"),
        quiet_period_s=1.0,
        job_workers=1,
        dicom_workers=0,
    )
    node.write_config()
    if routes:
        shutil.copy(ROOT / "ae_config" / "routes.yaml", node.config_dir / "routes.yaml")
    return node.start()


def test_demo_follows_the_study_and_says_the_results_wait(
    make_node: Callable[..., NodeProcess],
) -> None:
    node = _node(make_node, routes=True)
    run = node.cli("demo", "--seed", "4242", "--timeout", "240", check=False)
    assert run.returncode == 0, run.stderr + node.log_text()[-3000:]
    assert "wait in the node" in run.stderr
    assert "job 1 ct-torso-organs: done" in run.stderr
    url = re.search(r"http://(\S+?):(\d+)/studies/([0-9.]+)\s*$", run.stderr)
    assert url is not None, run.stderr  # the study in the node's viewer, said last
    assert (url.group(1), int(url.group(2))) == ("localhost", node.node["web_port"])
    for kind in ("seg", "sr", "gsps", "pdf"):
        assert kind in run.stdout
    deliveries = json.loads(node.cli("deliveries", "--json").stdout)
    assert {d["kind"] for d in deliveries} == {"seg", "sr", "gsps", "key-images", "pdf"}
    assert {(d["state"], d["held_for"], d["destination"]) for d in deliveries} == {
        ("held", "destination", "PACSNODE_SCU")  # SOURCE: the demo's AE, which has no port
    }
    stored = list((node.data_dir / "results").rglob("*.dcm"))
    assert len(stored) == len(deliveries)
    (study,) = node.studies()
    assert (study["status"], study["instances"]) == ("done", 30)


def test_demo_says_why_a_study_is_not_routed_or_nothing_answers(
    make_node: Callable[..., NodeProcess],
) -> None:
    node = _node(make_node, routes=False)
    run = node.cli("demo", "--seed", "4243", "--timeout", "120", check=False)
    assert run.returncode == 1
    assert "was not routed: no routing rule matched it" in run.stderr
    assert "routes.yaml has no rules" in run.stderr
    assert "pacs-node routes explain" in run.stderr
    (study,) = node.studies()
    assert study["status"] == "unrouted"

    nobody = f"PACSNODE@127.0.0.1:{free_port()}"
    run = run_cli("demo", "--to", nobody, "--config", str(node.config_dir), check=False)
    assert run.returncode == 1
    assert "nothing answers" in run.stderr
