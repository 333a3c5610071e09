"""The review page: held results released or rejected by an operator, read-only for a viewer,
a login for a browser without a session; through real HTTP requests."""

from __future__ import annotations

from datetime import timedelta

import httpx
from sqlalchemy import select, update

from pacs_node.catalog.deliveries import create_deliveries
from pacs_node.catalog.jobs import queue_job
from pacs_node.catalog.models import Delivery, DeliveryState, Job, JobState, Role
from pacs_node.catalog.quality import hold_for_quality
from pacs_node.catalog.results import StoredEncoding, add_result_rows, write_files
from pacs_node.services import accounts
from pacs_node.web.auth import CSRF_HEADER, SESSION_COOKIE
from tests.catalog_factory import stable_study
from tests.web_node import PASSWORD, SETUP, WebNode, web_node

__all__ = ["web_node"]

CT = "1.2.840.10008.5.1.4.1.1.2"
EXPLICIT_LE = "1.2.840.10008.1.2.1"
FAILED = [{"check": "size_range", "label": "body", "message": "too large"}]


def _held_job(node: WebNode, study_uid: str) -> int:
    with node.catalog.sessions.begin() as session:
        study_id = stable_study(session, study_uid)
        job_id = queue_job(session, study_id, "ct", ["1.2.3.4"], {})
        item = StoredEncoding("seg", CT, f"1.2.3.9.{job_id}", "1.2.3.100", EXPLICIT_LE, b"x" * 8)
        results_dir = node.settings.node.data_dir / "results"
        relpaths = write_files(results_dir, f"{job_id}/1", [item], fsync=False)
        results = add_result_rows(session, job_id, [item], relpaths)
        create_deliveries(session, job_id, results, {"seg": ["PACS"]})
        session.execute(update(Job).where(Job.id == job_id).values(state=JobState.DONE))
        assert hold_for_quality(session, job_id, FAILED) == 1
    return job_id


def _browser(node: WebNode, role: Role) -> tuple[httpx.Client, str]:
    """A client signed in as a new user with ``role``, and its CSRF token."""
    principal = accounts.create_user(node.catalog, f"web-{role.value}", role, PASSWORD, SETUP)
    opened = accounts.open_session(node.catalog, principal, timedelta(hours=1))
    client = httpx.Client(base_url=node.url, cookies={SESSION_COOKIE: opened.cookie}, timeout=30)
    return client, opened.csrf_token


def _states(node: WebNode, job_id: int) -> set[DeliveryState]:
    with node.catalog.sessions() as session:
        return set(session.scalars(select(Delivery.state).where(Delivery.job_id == job_id)))


def test_a_browser_without_a_session_is_sent_to_the_login_page(web_node: WebNode) -> None:
    with httpx.Client(base_url=web_node.url) as client:
        answer = client.get("/review")
    assert answer.status_code == 303
    assert answer.headers["location"] == "/login?next=%2Freview"


def test_a_viewer_sees_held_results_but_cannot_decide(web_node: WebNode) -> None:
    job_id = _held_job(web_node, "1.2.3.7")
    client, csrf = _browser(web_node, Role.VIEWER)
    with client:
        page = client.get("/review")
        assert page.status_code == 200
        assert f'data-job="{job_id}"' in page.text
        assert f"/review/jobs/{job_id}/release" not in page.text  # no buttons for a viewer
        refused = client.post(f"/review/jobs/{job_id}/release", headers={CSRF_HEADER: csrf})
    assert refused.status_code == 403
    assert _states(web_node, job_id) == {DeliveryState.HELD}


def test_an_operator_releases_one_result_and_rejects_another(web_node: WebNode) -> None:
    released = _held_job(web_node, "1.2.3.8")
    rejected = _held_job(web_node, "1.2.3.9")
    client, csrf = _browser(web_node, Role.OPERATOR)
    with client:
        page = client.get("/review")
        assert f"/review/jobs/{released}/release" in page.text
        assert f'name="csrf_token" value="{csrf}"' in page.text
        # a change without the session's CSRF token is refused
        assert client.post(f"/review/jobs/{released}/release").status_code == 403
        done = client.post(f"/review/jobs/{released}/release", headers={CSRF_HEADER: csrf})
        assert done.status_code == 303
        done = client.post(
            f"/review/jobs/{rejected}/reject",
            data={"reason": "body outline wrong"},
            headers={CSRF_HEADER: csrf},
        )
        assert done.status_code == 303
        again = client.post(f"/review/jobs/{rejected}/reject", headers={CSRF_HEADER: csrf})
        assert again.status_code == 409
    assert _states(web_node, released) == {DeliveryState.PENDING}
    assert _states(web_node, rejected) == {DeliveryState.REJECTED}
