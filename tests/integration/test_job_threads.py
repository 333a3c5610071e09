"""Job workers of the local pool run torch with their share of the cores, never torch's
default of every core in every process (two workers on two cores would run four threads)."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from pacs_node.cpus import inference_threads, usable_cores
from tests.conftest import NodeProcess, wait_for

pytestmark = pytest.mark.integration

MODELS = Path(__file__).resolve().parents[2] / "models"


def _started(node: NodeProcess, count: int) -> list[dict[str, Any]] | None:
    """The workers' start lines once ``count`` of them are logged."""
    lines = (json.loads(line) for line in node.log_text().splitlines() if line.startswith("{"))
    entries = [entry for entry in lines if entry.get("msg") == "job worker started"]
    return entries if len(entries) >= count else None


def test_each_job_worker_runs_torch_with_its_share_of_the_cores(
    make_node: Callable[..., NodeProcess],
) -> None:
    node = make_node(models_dir=str(MODELS), job_workers=2, dicom_workers=0, log_format="json")
    started = wait_for(lambda: _started(node, 2), 120, what="both job workers started")
    share = inference_threads(0, 2)  # this test runs with the node's cores and cgroup
    assert share == max(1, usable_cores() // 2)
    assert [(e["torch_threads"], e["interop_threads"]) for e in started] == [(share, share)] * 2
