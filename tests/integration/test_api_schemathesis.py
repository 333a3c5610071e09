"""schemathesis against the OpenAPI document the node serves: every operation, with an
operator's bearer token, over a catalog holding studies, jobs and deliveries; no request may
get a server error. ``make schemathesis`` runs it with many more examples."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path
from xml.etree import ElementTree

import httpx
import pytest

from pacs_node.catalog.models import Role
from tests.api_node import Populated, api_node

__all__ = ["api_node"]

pytestmark = pytest.mark.integration

SCHEMATHESIS = Path(sys.executable).with_name("schemathesis")
# Bounded for `make test`; `make schemathesis` asks for many more, and the coverage phase
# (boundary values of every parameter) too.
EXAMPLES = int(os.environ.get("PACS_NODE_TEST_SCHEMATHESIS_EXAMPLES", "8"))
PHASES = os.environ.get("PACS_NODE_TEST_SCHEMATHESIS_PHASES", "examples,fuzzing")


def test_no_operation_answers_with_a_server_error(api_node: Populated, tmp_path: Path) -> None:
    web = api_node.web
    web.client(Role.OPERATOR).close()  # makes the operator and its token
    token = web.tokens[Role.OPERATOR]
    report = tmp_path / "report"
    run = subprocess.run(
        [
            str(SCHEMATHESIS),
            "run",
            f"{web.url}/api/openapi.json",
            "--checks",
            "not_a_server_error",
            "--header",
            f"Authorization: Bearer {token}",
            "--max-examples",
            str(EXAMPLES),
            "--phases",
            PHASES,
            "--seed",
            "17",
            "--workers",
            "1",
            "--request-timeout",
            "30",
            "--report",
            "junit",
            "--report-dir",
            str(report),
        ],
        capture_output=True,
        text=True,
        timeout=600,
        check=False,
        cwd=tmp_path,
    )
    assert run.returncode == 0, run.stdout[-8000:] + run.stderr[-2000:]
    (junit,) = report.glob("junit*.xml")
    cases = ElementTree.parse(junit).getroot().iter("testcase")
    tested = {case.get("name") for case in cases if not list(case)}  # passed: no failure child
    document = httpx.get(
        f"{web.url}/api/openapi.json", headers={"Authorization": f"Bearer {token}"}, timeout=30
    ).json()
    operations = {
        f"{method.upper()} {path}" for path, item in document["paths"].items() for method in item
    }
    assert len(operations) >= 13
    assert operations <= tested  # (the stateful phase adds a case of its own)
