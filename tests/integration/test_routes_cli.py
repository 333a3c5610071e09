"""``pacs-node routes test`` on a folder says what a running node does with the same files: a
real node (the shipped routes) receives them from dcmtk's storescu; every study's outcome and
jobs are those ``routes test --json`` foresaw, and ``routes explain --json`` prints the same
verdicts, outcome and jobs as ``routes test --json`` did."""

from __future__ import annotations

import json
import shutil
import subprocess
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import PACS_NODE, NodeProcess, clean_env, run_cli, storescu, wait_for
from tests.dicom_factory import ROUTING_EXPECTED, write_routing_cases

pytestmark = pytest.mark.integration

ROOT = Path(__file__).resolve().parents[2]


def test_routes_test_on_a_folder_says_what_the_node_does_after_a_real_send(
    make_node: Callable[..., NodeProcess], tmp_path: Path
) -> None:
    node = make_node(
        start=False,
        models_dir=str(ROOT / "models"),
        quiet_period_s=1.0,
        job_workers=0,  # jobs stay queued: this test is about routing
        dicom_workers=0,
        fsync=False,
    )
    node.write_config()
    shutil.copy(ROOT / "ae_config" / "routes.yaml", node.config_dir / "routes.yaml")
    node.start()
    studies = write_routing_cases(tmp_path / "cases")
    sent = storescu(node, tmp_path / "cases", extra=("+sd", "+r"))
    assert sent.returncode == 0, sent.stderr

    # Before the node has said anything, the files alone; a stray file is skipped with a note.
    (tmp_path / "cases" / "README.txt").write_text("not DICOM")
    (tmp_path / "cases" / "truncated.dcm").write_bytes(b"\0" * 128 + b"DICM" + b"\2\0")
    tried = node.cli(
        "routes", "test", str(tmp_path / "cases"), "--json", "--calling-ae", "STORESCU"
    )
    planned: dict[str, Any] = {report["study_uid"]: report for report in json.loads(tried.stdout)}
    assert set(planned) == set(studies.values())
    assert "README.txt: not a Part 10 file" in tried.stderr
    assert "truncated.dcm" in tried.stderr

    def routed() -> list[dict[str, Any]] | None:
        found = node.studies()
        done = [s for s in found if s["route_outcome"] is not None]
        return found if len(done) == len(studies) else None

    # Every study: the outcome and the jobs the node recorded are those routes test foresaw.
    outcomes = {s["study_uid"]: s["route_outcome"] for s in wait_for(routed, 60, interval=0.5)}
    queued: dict[str, list[tuple[str, str, list[str]]]] = {}
    for job in json.loads(node.cli("jobs", "--json").stdout):
        queued.setdefault(job["study_uid"], []).append(
            (job["rule"], job["model"], job["series_uids"])
        )
    for name, study_uid in studies.items():
        expected = ROUTING_EXPECTED[name]
        assert outcomes[study_uid] == planned[study_uid]["outcome"], name
        assert outcomes[study_uid] == ("routed" if expected else "unrouted"), name
        jobs = [(j["rule"], j["model"], j["series_uids"]) for j in planned[study_uid]["jobs"]]
        assert queued.get(study_uid, []) == jobs, name
        assert [(rule, model) for rule, model, _ in jobs] == ([expected] if expected else []), name
    # A head CT told by its size, an MR routed by its description: routes explain --json says
    # exactly what routes test --json said; the text says it as a tree, for a person.
    for name in ("ct-head-geometry", "mr-liver-description"):
        explained = json.loads(node.cli("routes", "explain", studies[name], "--json").stdout)
        assert explained == planned[studies[name]], name
    text = _wide("routes", "explain", studies["ct-without-series-description"], node=node)
    assert "series_description: value is missing: nothing to exclude" in text
    assert "outcome: routed" in text
    assert "job: ct-body -> ct-torso-organs" in text


def _wide(*args: str, node: NodeProcess | None = None) -> str:
    """The command's text output on a terminal wide enough that no reason wraps."""
    config = ("--config", str(node.config_dir)) if node else ()
    result = subprocess.run(
        [PACS_NODE, *args, *config],
        capture_output=True,
        text=True,
        env={**clean_env(), "COLUMNS": "300"},
        timeout=120,
        check=True,
    )
    return result.stdout


def test_routes_test_text_and_exit_status(tmp_path: Path) -> None:
    """The shipped routes (./ae_config) on a head CT known by its size alone; no DICOM found is
    status 1, a bad routes.yaml status 2."""
    write_routing_cases(tmp_path / "cases", only=("ct-head-geometry",))
    text = _wide("routes", "test", str(tmp_path / "cases"))
    assert "rule ct-body: no match (no series matched)" in text
    assert (
        "✗ body_region: HEAD (no body part or description; z extent 100 mm, field 230 mm) has no "
        "value matching CHEST|ABDOMEN|PELVIS|WHOLEBODY|TORSO"
    ) in text
    assert "outcome: would be unrouted" in text
    (tmp_path / "empty" / "sub").mkdir(parents=True)
    (tmp_path / "empty" / "sub" / "notes.txt").write_text("nothing here")
    none = run_cli("routes", "test", str(tmp_path / "empty"), check=False)
    assert none.returncode == 1
    assert "no DICOM instances found" in none.stderr
    config = tmp_path / "config"
    config.mkdir()
    (config / "routes.yaml").write_text(
        "rules:\n  - {name: a, models: [m], when: {modality: '(CT'}}\n"
    )
    bad = run_cli("routes", "test", str(tmp_path / "empty"), "--config", str(config), check=False)
    assert bad.returncode == 2
    assert "rules[0].when.modality" in bad.stderr
