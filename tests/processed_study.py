"""A web node holding one phantom CT study processed end to end: received (spool + catalog),
made stable, a ct-classical job run in this process (stored SEG, SR, PDF ...), its results
sent once and held (the sender has no address); and browser sessions for users of each role."""

from __future__ import annotations

import itertools
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path

import pytest

from pacs_node.catalog.jobs import queue_job
from pacs_node.catalog.models import Role, utcnow
from pacs_node.catalog.studies import mark_stable
from pacs_node.services import accounts
from pacs_node.services.accounts import Principal
from pacs_node.services.jobs import process_now
from pacs_node.web.auth import SESSION_COOKIE
from tests.catalog_factory import ingest
from tests.ct_phantom import Phantom, make_ct_phantom, write_phantom_series
from tests.web_node import PASSWORD, SETUP, WebNode, start_web_node

ROOT = Path(__file__).parents[1]
PACS_VIEWER = "http://pacs.example:8042/ohif/viewer?StudyInstanceUIDs={study_uid}"
SLICES, SIZE = 24, 128
_USERS = itertools.count(1)
SENT = {"seg": ["SOURCE"], "sr": ["SOURCE"], "pdf": ["SOURCE"]}


@dataclass
class ProcessedStudy:
    node: WebNode
    phantom: Phantom
    study_uid: str
    job_id: int

    @property
    def viewer_path(self) -> str:
        return f"/studies/{self.study_uid}/jobs/{self.job_id}/viewer"

    def session(self, role: Role, name: str | None = None) -> tuple[str, str]:
        """A signed-in browser session of a new user holding ``role``: (cookie, CSRF token)."""
        name = name or f"{role.value}-{next(_USERS)}"
        accounts.create_user(self.node.catalog, name, role, PASSWORD, SETUP)
        principal = accounts.authenticate_password(self.node.catalog, name, PASSWORD)
        assert isinstance(principal, Principal)
        opened = accounts.open_session(self.node.catalog, principal, timedelta(hours=1))
        return opened.cookie, opened.csrf_token


def _mark_stable(node: WebNode, study_uid: str) -> None:
    with node.catalog.sessions.begin() as session:
        mark_stable(session, study_uid, utcnow(), "quiet_period")


def process_phantom(data_dir: Path) -> ProcessedStudy:
    """Start a web node and put one processed phantom CT study into it."""
    node = start_web_node(data_dir / "var", models_dir=ROOT / "models", pacs_viewer_url=PACS_VIEWER)
    phantom = make_ct_phantom(3, shape=(SLICES, SIZE, SIZE), spacing=(8.0, 2.6, 2.6))
    paths = write_phantom_series(phantom, data_dir / "series")
    study_id, study_uid, series = ingest(node.catalog, node.settings.node.spool_dir, paths)
    _mark_stable(node, study_uid)
    with node.catalog.sessions.begin() as session:
        job_id = queue_job(session, study_id, "ct-classical", series, SENT, rule="ct")
    process_now(node.catalog, node.settings, label="web-test", deliver=True)
    return ProcessedStudy(node, phantom, study_uid, job_id)


@pytest.fixture(scope="module")
def processed(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ProcessedStudy]:
    """One processed study in a running web node, shared by a module's tests."""
    study = process_phantom(tmp_path_factory.mktemp("processed"))
    try:
        yield study
    finally:
        study.node.server.stop()
        study.node.recorder.stop()
        study.node.catalog.dispose()


def cookies(cookie: str) -> dict[str, str]:
    return {SESSION_COOKIE: cookie}
