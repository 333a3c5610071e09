"""The group's state through both doors, ``pacs-node status`` and ``/metrics``: the job-queue
backend with its broker (password hidden), the jobs queued per broker queue as the catalog
counts them, the owner of the timer lease and the registered nodes."""

from __future__ import annotations

import json
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path

import pytest
import yaml
from sqlalchemy import update

from pacs_node.catalog import leases
from pacs_node.catalog.db import Catalog, open_catalog
from pacs_node.catalog.jobs import queue_job
from pacs_node.catalog.models import Job, JobState, NodeLease
from pacs_node.services.group import redact_url
from pacs_node.timer_lease import TimerLease
from tests.catalog_factory import stable_study
from tests.conftest import run_cli
from tests.web_node import WebNode, scrape, start_web_node

SECRET = "s3cret-pw"
BROKER = f"redis://pacs:{SECRET}@127.0.0.1:6379/0"
SHOWN = "redis://pacs:***@127.0.0.1:6379/0"


def _models(root: Path) -> Path:
    """A models folder with one bundle that names the gpu class (its metadata is all a
    report reads); jobs of models not there count in the default class, cpu."""
    metadata = root / "gpu-model" / "configs" / "metadata.json"
    metadata.parent.mkdir(parents=True)
    metadata.write_text(json.dumps({"name": "gpu-model", "pacs_node": {"queue": "gpu"}}))
    return root


def _queue_jobs(catalog: Catalog) -> None:
    """Three jobs queued (two for gpu, one for cpu) and one running, which is not counted."""
    with catalog.sessions.begin() as session:
        study = stable_study(session)
        ids = [
            queue_job(session, study, model, [], {})
            for model in ("gpu-model", "gpu-model", "ct-classical", "ct-classical")
        ]
        session.execute(update(Job).where(Job.id == ids[-1]).values(state=JobState.RUNNING))


def _expire(catalog: Catalog) -> None:
    with catalog.sessions.begin() as session:
        session.execute(update(NodeLease).values(expires_at=leases.NEVER))


@pytest.mark.parametrize(
    ("url", "shown"),
    [
        (BROKER, SHOWN),
        ("redis://127.0.0.1:6379/0", "redis://127.0.0.1:6379/0"),
        ("amqp://guest:guest@rabbit:5672//", "amqp://guest:***@rabbit:5672//"),
        ("redis://:only-pw@host:6379", "redis://:***@host:6379"),
        ("amqp://u:p@h1;amqp://u:p@h2", "amqp://u:***@h1;amqp://u:***@h2"),
        ("sentinel://:p@h1;sentinel://:p@h2", "sentinel://:***@h1;sentinel://:***@h2"),
        ("redis://h/0?password=secret", "redis://h/0?password=***"),
        (
            'redis://user@h/0?sentinel_kwargs={"password":"x"}',
            "redis://user@h/0?sentinel_kwargs=***",
        ),
        (
            "rediss://:p@h:6380/0?ssl_cert_reqs=required",
            "rediss://:***@h:6380/0?ssl_cert_reqs=required",
        ),
        ("redis://h:6379/0?Auth_Token=abc&db=1", "redis://h:6379/0?Auth_Token=***&db=1"),
        ("redis://:p@h:6379/0?a=1&opaque", "redis://h:6379"),  # in doubt: where, not how
        ("", ""),
    ],
)
def test_a_broker_url_is_shown_without_its_password(url: str, shown: str) -> None:
    assert redact_url(url) == shown


@pytest.fixture
def celery_web_node(tmp_path: Path) -> Iterator[WebNode]:
    node = start_web_node(
        tmp_path / "var",
        job_queue="celery",
        broker_url=BROKER,
        job_queue_prefix="site1.",
        models_dir=_models(tmp_path / "models"),
        node_id="node-a",
        timer_lease_s=30,
    )
    try:
        yield node
    finally:
        node.server.stop()
        node.recorder.stop()
        node.catalog.dispose()


def test_metrics_show_the_job_queue_the_lease_owner_and_the_nodes(
    celery_web_node: WebNode,
) -> None:
    catalog = celery_web_node.catalog
    _queue_jobs(catalog)
    text, samples = scrape(celery_web_node.url)
    assert samples[("pacs_node_job_queue_info", (("backend", "celery"), ("broker", SHOWN)))] == 1
    assert SECRET not in text
    queued = {
        dict(labels)["queue"]: value
        for (name, labels), value in samples.items()
        if name == "pacs_node_job_queue_queued"
    }
    assert queued == {"site1.gpu": 2, "site1.cpu": 1}  # from the catalog: the running one not
    assert not [key for key in samples if key[0] == "pacs_node_timer_lease_owner"]
    assert samples[("pacs_node_timer_lease_is_owner", ())] == 0
    assert samples[("pacs_node_timer_lease_expiry_timestamp_seconds", ())] == 0

    mine = TimerLease(catalog, "node-a", ttl_s=30)
    assert mine.register() is None
    assert mine.renew()
    _, samples = scrape(celery_web_node.url)
    assert samples[("pacs_node_timer_lease_owner", (("node_id", "node-a"),))] == 1
    assert samples[("pacs_node_timer_lease_is_owner", ())] == 1
    assert samples[("pacs_node_timer_lease_expiry_timestamp_seconds", ())] > 0
    assert samples[("pacs_node_registered_nodes", (("state", "live"),))] == 1

    _expire(catalog)  # node-a died; node-b takes the timers over
    other = TimerLease(catalog, "node-b", ttl_s=30)
    assert other.renew()
    _, samples = scrape(celery_web_node.url)
    owners = [dict(k[1])["node_id"] for k in samples if k[0] == "pacs_node_timer_lease_owner"]
    assert owners == ["node-b"]
    assert samples[("pacs_node_timer_lease_is_owner", ())] == 0


def test_status_shows_the_job_queue_and_who_owns_the_timers(
    postgres_url: str, tmp_path: Path
) -> None:
    config = tmp_path / "ae_config"
    config.mkdir()
    node = {
        "data_dir": str(tmp_path / "var"),
        "database_url": postgres_url,
        "node_id": "node-b",
        "job_queue": "celery",
        "broker_url": BROKER,
        "models_dir": str(_models(tmp_path / "models")),
    }
    (config / "node.yaml").write_text(yaml.safe_dump(node))
    catalog = open_catalog(postgres_url)
    try:
        _queue_jobs(catalog)
        owner = TimerLease(catalog, "node-a", ttl_s=30)
        assert owner.register() is None
        assert owner.renew()
        report = json.loads(run_cli("status", "--json", "--config", str(config)).stdout)
        table = run_cli("status", "--config", str(config)).stdout
    finally:
        catalog.dispose()
    assert report["job_queue"] == {
        "backend": "celery",
        "broker": SHOWN,
        "workers": 0,
        "queues": {"pacs-node.cpu": 1, "pacs-node.gpu": 2},
    }
    lease = report["timer_lease"]
    assert lease["owner_node_id"] == "node-a"
    assert lease["held"] is True
    assert lease["this_node"] == "node-b"
    assert lease["owned_by_this_node"] is False
    assert datetime.fromisoformat(lease["expires_at"]) > datetime.now(UTC)
    assert [(n["node_id"], n["live"]) for n in report["nodes"]] == [("node-a", True)]
    flat = " ".join(table.split())
    assert SECRET not in table
    assert "job queue │ celery" in flat
    assert f"broker │ {SHOWN}" in flat
    assert "queued in pacs-node.gpu │ 2" in flat
    assert "timer lease owner │ node-a, until" in flat
