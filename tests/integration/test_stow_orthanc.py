"""Orthanc's own DICOMweb client pushes a study to a whole node over STOW-RS with HTTP Basic; the
node stores it, catalogues it and routes it as it would a C-STORE."""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml
from pydicom import dcmread
from sqlalchemy import select

from pacs_node.catalog.db import open_catalog
from pacs_node.catalog.models import Role, RouteOutcome, Study
from pacs_node.config import NodeOptions
from pacs_node.services import accounts
from tests.conftest import NodeProcess, free_port, wait_for
from tests.dicom_factory import write_series
from tests.orthanc import OrthancProcess
from tests.web_node import PASSWORD, SETUP

pytestmark = pytest.mark.integration

ROOT = Path(__file__).resolve().parents[2]
ROUTES = yaml.safe_dump(
    {
        "rules": [
            {
                "name": "ct",
                "when": {"modality": "CT", "slices": {"min": 3}},
                "models": ["ct-classical"],
            }
        ]
    }
)


class OrthancPushing(OrthancProcess):
    """An Orthanc whose DICOMweb client knows the node as server ``node``."""

    node_server: dict[str, Any]

    def write_config(self) -> Path:
        path = super().write_config()
        config = json.loads(path.read_text())
        config["DicomWeb"]["Servers"] = {"node": self.node_server}
        path.write_text(json.dumps(config, indent=2))
        return path


@pytest.fixture
def orthanc_pushing(tmp_path: Path) -> Iterator[OrthancPushing]:
    orthanc = OrthancPushing(
        tmp_path / "orthanc", http_port=free_port(), dicom_port=free_port(), dicomweb=True
    )
    yield orthanc
    orthanc.stop()


def test_orthanc_stows_a_study_that_the_node_routes(
    make_node: Callable[..., NodeProcess], orthanc_pushing: OrthancPushing, tmp_path: Path
) -> None:
    # no job worker: the test ends once the study is routed and its job queued
    node = make_node(start=False, models_dir=str(ROOT / "models"), job_workers=0)
    node.config_dir.mkdir(parents=True, exist_ok=True)
    (node.config_dir / "routes.yaml").write_text(ROUTES)
    node.start()
    catalog = open_catalog(NodeOptions(data_dir=node.data_dir).catalog_url)
    try:
        accounts.create_user(catalog, "orthanc", Role.OPERATOR, PASSWORD, SETUP)
        orthanc_pushing.node_server = {
            "Url": f"http://127.0.0.1:{node.node['web_port']}/dicomweb/",
            "Username": "orthanc",
            "Password": PASSWORD,
        }
        orthanc = orthanc_pushing.start()
        paths = write_series(tmp_path / "ct", slices=4, rows=32, columns=32, spacing=(5, 5, 5))
        study_uid = str(dcmread(paths[0], stop_before_pixels=True).StudyInstanceUID)
        for path in paths:
            orthanc.post("/instances", content=path.read_bytes())
        study_id = next(f["ID"] for f in orthanc.post("/tools/lookup", content=study_uid))
        orthanc.post(
            "/dicom-web/servers/node/stow", json={"Resources": [study_id], "Synchronous": True}
        )

        def routed() -> bool:
            with catalog.sessions() as session:
                found = session.scalars(select(Study).where(Study.study_uid == study_uid)).first()
                return found is not None and found.route_outcome == RouteOutcome.ROUTED

        wait_for(routed, 30, what="the study to be routed")
    finally:
        catalog.dispose()
    study = next(s for s in node.studies() if s["study_uid"] == study_uid)
    assert (study["route_outcome"], study["instances"], study["calling_ae"]) == ("routed", 4, None)
