"""Celery job claims on SQLite and PostgreSQL: a job is claimed once whatever the broker
delivers, its lease is kept alive by heartbeats, and the node's sweeper re-queues jobs of dead
workers and publishes again jobs the broker lost."""

from __future__ import annotations

import json
import shutil
import time
from collections.abc import Iterator
from datetime import timedelta
from pathlib import Path

import pytest
from sqlalchemy import select, update

from pacs_node.catalog.db import Catalog, open_catalog
from pacs_node.catalog.jobs import (
    cancel_job,
    claim_job_id,
    finish_job,
    list_jobs,
    queue_job,
    renew_lease,
    requeue_expired,
    requeue_orphans,
    take_unpublished,
    unpublish,
)
from pacs_node.catalog.models import Job, JobEvent, Study, utcnow
from pacs_node.config import load_settings
from pacs_node.errors import ConfigError
from pacs_node.jobs.celery_app import broker_queue, make_app, redelivery_s
from pacs_node.jobs.celery_queue import CeleryJobQueue
from pacs_node.jobs.celery_worker import Heartbeat

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(params=["sqlite", "postgresql"])
def catalog(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Catalog]:
    if request.param == "sqlite":
        url = f"sqlite:///{tmp_path / 'c.sqlite'}"
    else:
        url = request.getfixturevalue("postgres_url")
    opened = open_catalog(url)
    yield opened
    opened.dispose()


def _queue(catalog: Catalog, n: int = 1) -> list[int]:
    now = utcnow()
    with catalog.sessions.begin() as session:
        study = Study(
            study_uid=f"1.2.{time.monotonic_ns()}",
            state="stable",
            first_received_at=now,
            receiving_since=now,
            last_received_at=now,
            reopened_count=0,
            duplicate_count=0,
        )
        session.add(study)
        session.flush()
        return [
            queue_job(session, study.id, "ct-classical", ["1.2.3.4"], {"seg": ["PACS"]})
            for _ in range(n)
        ]


def _job(catalog: Catalog, job_id: int) -> Job:
    with catalog.sessions() as session:
        job = session.get(Job, job_id)
        assert job is not None
        session.expunge(job)
        return job


def _expire(catalog: Catalog, job_id: int) -> None:
    with catalog.sessions.begin() as session:
        session.execute(
            update(Job)
            .where(Job.id == job_id)
            .values(lease_expires_at=utcnow() - timedelta(seconds=1))
        )


def test_a_job_is_claimed_once_whatever_the_broker_delivers(catalog: Catalog) -> None:
    (job_id,) = _queue(catalog)
    with catalog.sessions.begin() as session:
        assert claim_job_id(session, job_id, "h:1:celery1", 60) is True
        assert claim_job_id(session, job_id, "h:2:celery1", 60) is False  # a second delivery
        assert claim_job_id(session, job_id + 100, "h:2:celery2", 60) is False  # no such job
    job = _job(catalog, job_id)
    assert job.state == "running"
    assert job.claimed_by == "h:1:celery1"
    assert job.lease_expires_at is not None
    assert job.lease_expires_at - utcnow() > timedelta(seconds=55)
    with catalog.sessions.begin() as session:
        assert finish_job(session, job_id, "h:1:celery1", {}) is True
        assert claim_job_id(session, job_id, "h:2:celery3", 60) is False  # redelivered late


def test_an_expired_lease_requeues_then_fails_the_job(catalog: Catalog) -> None:
    (job_id,) = _queue(catalog)
    with catalog.sessions.begin() as session:
        assert claim_job_id(session, job_id, "h:1:celery1", 60)
        assert take_unpublished(session, 60) == []  # running: not published
    with catalog.sessions.begin() as session:
        assert requeue_expired(session, max_attempts=2) == (0, 0)  # the lease holds
    _expire(catalog, job_id)
    with catalog.sessions.begin() as session:
        assert requeue_expired(session, max_attempts=2) == (1, 0)
        # the killed worker's late writes do not count: its claim is gone
        assert renew_lease(session, job_id, "h:1:celery1", 60) is False
        assert finish_job(session, job_id, "h:1:celery1", {}) is False
    job = _job(catalog, job_id)
    assert (job.state, job.claimed_by, job.lease_expires_at, job.published_at) == (
        "queued",
        None,
        None,
        None,
    )
    assert job.publish_count == 0
    with catalog.sessions.begin() as session:
        assert take_unpublished(session, 60) == [(job_id, "ct-classical")]  # published again
        assert claim_job_id(session, job_id, "h:2:celery1", 60)
    _expire(catalog, job_id)
    with catalog.sessions.begin() as session:
        assert requeue_expired(session, max_attempts=2) == (0, 1)  # the second death fails it
    job = _job(catalog, job_id)
    assert job.state == "failed"
    assert "died 2 times" in (job.error or "")
    with catalog.sessions() as session:
        kinds = session.scalars(
            select(JobEvent.kind).where(JobEvent.job_id == job_id).order_by(JobEvent.id)
        ).all()
    assert kinds == ["queued", "running", "queued", "running", "failed"]


def test_a_local_restart_leaves_celery_claims_of_its_host_alone(catalog: Catalog) -> None:
    (job_id,) = _queue(catalog)
    with catalog.sessions.begin() as session:
        assert claim_job_id(session, job_id, "h:1:celery1", 60)
        assert requeue_orphans(session, "h:", max_attempts=3) == (0, 0)  # its lease decides
    assert _job(catalog, job_id).state == "running"


def _published_ago(catalog: Catalog, job_id: int, seconds: float) -> None:
    with catalog.sessions.begin() as session:
        session.execute(
            update(Job)
            .where(Job.id == job_id)
            .values(published_at=utcnow() - timedelta(seconds=seconds))
        )


def test_queued_jobs_are_published_once_per_interval_backing_off(catalog: Catalog) -> None:
    first, second = _queue(catalog, 2)
    with catalog.sessions.begin() as session:
        assert take_unpublished(session, 60) == [(first, "ct-classical"), (second, "ct-classical")]
        assert take_unpublished(session, 60) == []  # another node's sweep hands none over again
        unpublish(session, [second])  # the broker refused it: that hand-over does not count
        assert take_unpublished(session, 60) == [(second, "ct-classical")]
    assert _job(catalog, second).publish_count == 1
    # handed over a minute ago and never claimed: lost, handed over again; then after 2 minutes
    _published_ago(catalog, first, 61)
    with catalog.sessions.begin() as session:
        assert take_unpublished(session, 60) == [(first, "ct-classical")]
    _published_ago(catalog, first, 61)
    with catalog.sessions.begin() as session:
        assert take_unpublished(session, 60) == []
    _published_ago(catalog, first, 121)
    with catalog.sessions.begin() as session:
        assert take_unpublished(session, 60) == [(first, "ct-classical")]
        assert cancel_job(session, second)
    assert _job(catalog, first).publish_count == 3
    with catalog.sessions.begin() as session:
        session.execute(update(Job).values(published_at=None))
        assert take_unpublished(session, 60) == [(first, "ct-classical")]  # not the cancelled


def test_the_heartbeat_renews_the_lease_until_the_job_is_taken_away(catalog: Catalog) -> None:
    (job_id,) = _queue(catalog)
    with catalog.sessions.begin() as session:
        assert claim_job_id(session, job_id, "h:1:celery1", 0.6)
    with Heartbeat(catalog, job_id, "h:1:celery1", 0.6) as beat:
        time.sleep(1.0)  # the lease alone would have expired by now
        with catalog.sessions.begin() as session:
            assert requeue_expired(session, max_attempts=3) == (0, 0)
            assert cancel_job(session, job_id)
        deadline = time.monotonic() + 3
        while not beat.lost and time.monotonic() < deadline:
            time.sleep(0.05)
    assert beat.lost
    with catalog.sessions() as session:
        assert list_jobs(session, [job_id])[0].state == "cancelled"


def test_the_sweeper_requeues_and_publishes(
    catalog: Catalog, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    settings = load_settings(
        None,
        {
            "job_queue": "celery",
            "broker_url": "redis://127.0.0.1:1/0",
            "database_url": catalog.url,
            "data_dir": tmp_path,
            "job_lease_s": 30,
        },
    )
    queue = CeleryJobQueue(catalog, settings)
    published: list[tuple[int, str]] = []
    refuse = {"on": True}

    tried: list[int] = []

    def publish(job_id: int, model: str) -> bool:
        tried.append(job_id)
        if refuse["on"]:
            return False
        published.append((job_id, queue.device_class(model)))
        return True

    monkeypatch.setattr(queue, "publish", publish)
    monkeypatch.setattr(queue, "probe", lambda: True)
    first, second = _queue(catalog, 2)
    assert queue.sweep() == (0, 0)  # the broker refused the first: both stay due
    assert tried == [first]  # a broker that is away is not asked once per job
    refuse["on"] = False
    assert queue.sweep() == (0, 2)
    assert published == [(first, "cpu"), (second, "cpu")]
    with catalog.sessions.begin() as session:
        assert claim_job_id(session, first, "h:9:celery1", 30)
    _expire(catalog, first)
    assert queue.sweep() == (1, 1)  # the dead worker's job, published again
    assert published[-1] == (first, "cpu")
    assert queue.device_class("no-such-model") == "cpu"


def test_a_gpu_bundle_is_published_on_the_gpu_queue(catalog: Catalog, tmp_path: Path) -> None:
    models = tmp_path / "models"
    shutil.copytree(ROOT / "models" / "ct-classical", models / "ct-classical")
    path = models / "ct-classical" / "configs" / "metadata.json"
    path.write_text(json.dumps({**json.loads(path.read_text()), "pacs_node": {
        **json.loads(path.read_text())["pacs_node"], "queue": "gpu"}}))  # fmt: skip
    settings = load_settings(
        None,
        {"job_queue": "celery", "broker_url": "redis://h/0", "models_dir": models},
    )
    queue = CeleryJobQueue(catalog, settings)
    sent: list[str] = []
    queue.app.send_task = lambda *args, queue, **kwargs: sent.append(queue.name)  # type: ignore[method-assign]
    _queue(catalog)
    assert queue.sweep() == (0, 1)
    assert sent == ["pacs-node.gpu"]


def test_broker_settings_and_urls() -> None:
    options = load_settings(
        None, {"job_queue": "celery", "broker_url": "amqp://guest:guest@h:5672//"}
    ).node
    queue = broker_queue(options, "gpu")
    assert queue.name == "pacs-node.gpu"
    assert queue.queue_arguments == {"x-consumer-timeout": int(redelivery_s(options) * 1000)}
    conf = make_app(options).conf
    assert conf.task_acks_late
    assert conf.task_reject_on_worker_lost
    assert conf.worker_prefetch_multiplier == 1
    assert not conf.result_backend
    redis = load_settings(None, {"job_queue": "celery", "broker_url": "redis://h:6379/2"}).node
    visibility = make_app(redis).conf.broker_transport_options["visibility_timeout"]
    assert visibility == 2 * redis.job_timeout_s > redis.job_lease_s
    for url, reason in [
        (None, "needs a broker_url"),
        ("http://h/", "scheme 'http'"),
        ("redis://h:port/0", "is not a URL"),
        ("redis:///0", "names no broker host"),
    ]:
        with pytest.raises(ConfigError) as caught:
            load_settings(None, {"job_queue": "celery", "broker_url": url})
        assert caught.value.key == "broker_url"
        assert reason in caught.value.reason


def test_the_worker_command_refuses_a_bad_queue_or_broker() -> None:
    from tests.conftest import run_cli

    bad_queue = run_cli(
        "worker", "--queues", "cpu,GPU!", "--broker-url", "redis://h/0", check=False
    )
    assert bad_queue.returncode != 0
    assert "'GPU!' is not a device class" in bad_queue.stderr
    bad_broker = run_cli("worker", "--broker-url", "http://h/", check=False)
    assert bad_broker.returncode == 2
    assert "broker_url" in bad_broker.stderr
