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
from typing import Any

import pytest
from celery.exceptions import Reject
from sqlalchemy import select, text, update
from sqlalchemy.exc import OperationalError

from pacs_node.catalog.db import Catalog, open_catalog
from pacs_node.catalog.jobs import (
    cancel_job,
    claim_job_id,
    finish_job,
    forget_published,
    list_jobs,
    queue_job,
    renew_lease,
    requeue_expired,
    requeue_orphans,
    set_progress,
    take_unpublished,
    unpublish,
)
from pacs_node.catalog.models import Job, JobEvent, Study, utcnow
from pacs_node.config import load_settings
from pacs_node.errors import ConfigError
from pacs_node.jobs import celery_worker
from pacs_node.jobs.celery_app import broker_queue, make_app
from pacs_node.jobs.celery_queue import CeleryJobQueue
from pacs_node.jobs.celery_worker import Heartbeat
from tests.conftest import wait_for

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
        assert claim_job_id(session, job_id, "h:1:celery1", 60) == 1  # the first attempt
        assert claim_job_id(session, job_id, "h:2:celery1", 60) is None  # a second delivery
        assert claim_job_id(session, job_id + 100, "h:2:celery2", 60) is None  # no such job
    job = _job(catalog, job_id)
    assert job.state == "running"
    assert job.claimed_by == "h:1:celery1"
    assert job.lease_expires_at is not None
    assert job.lease_expires_at - utcnow() > timedelta(seconds=55)
    with catalog.sessions.begin() as session:
        assert finish_job(session, job_id, "h:1:celery1", {}) is True
        assert claim_job_id(session, job_id, "h:2:celery3", 60) is None  # redelivered late


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
        assert claim_job_id(session, job_id, "h:2:celery1", 60) == 2  # its attempt, from the claim
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
    assert not queue.queue_arguments  # RabbitMQ's consumer timeout is the broker's setting
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


def test_lease_times_are_the_database_clock_and_a_renewed_lease_is_not_requeued(
    catalog: Catalog, monkeypatch: pytest.MonkeyPatch
) -> None:
    from pacs_node.catalog import jobs

    (job_id,) = _queue(catalog)
    skewed = utcnow() + timedelta(hours=1)  # a worker whose clock runs an hour ahead
    if catalog.engine.dialect.name == "postgresql":
        monkeypatch.setattr(jobs, "utcnow", lambda: skewed)
    with catalog.sessions.begin() as session:
        assert claim_job_id(session, job_id, "h:1:celery1", 60) == 1
    lease = _job(catalog, job_id).lease_expires_at
    assert lease is not None
    assert lease - utcnow() < timedelta(seconds=61)
    _expire(catalog, job_id)
    real = jobs._requeue

    def renewed_meanwhile(session: Any, rows: Any, *args: Any, **kwargs: Any) -> Any:
        assert renew_lease(session, job_id, "h:1:celery1", 60)  # after the sweep's SELECT
        return real(session, rows, *args, **kwargs)

    monkeypatch.setattr(jobs, "_requeue", renewed_meanwhile)
    with catalog.sessions.begin() as session:
        assert requeue_expired(session, max_attempts=3) == (0, 0)
    assert _job(catalog, job_id).state == "running"


def test_a_locked_row_does_not_block_the_sweep(catalog: Catalog) -> None:
    if catalog.engine.dialect.name != "postgresql":
        return  # SQLite has one writer at a time: there is no row lock to skip
    expired, waiting = _queue(catalog, 2)
    with catalog.sessions.begin() as session:
        assert claim_job_id(session, expired, "h:1:celery1", 60)
    _expire(catalog, expired)
    with catalog.sessions.begin() as holder:
        holder.execute(select(Job.id).where(Job.id.in_([expired, waiting])).with_for_update())
        with catalog.sessions.begin() as session:
            session.execute(text("SET LOCAL lock_timeout = '2s'"))
            assert requeue_expired(session, max_attempts=3) == (0, 0)
            assert take_unpublished(session, 60) == []


def test_a_broker_restart_hands_every_queued_job_over_again(
    catalog: Catalog, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    settings = load_settings(
        None,
        {
            "job_queue": "celery",
            "broker_url": "redis://127.0.0.1:1/0",
            "database_url": catalog.url,
            "data_dir": tmp_path,
        },
    )
    queue = CeleryJobQueue(catalog, settings)
    (job_id,) = _queue(catalog)
    with catalog.sessions.begin() as session:
        assert take_unpublished(session, 60, limit=1) == [(job_id, "ct-classical")]
        session.execute(update(Job).values(publish_count=9))  # at the longest backoff
        assert take_unpublished(session, 60) == []
    queue._restarted("run-a")
    queue._restarted("run-a")
    with catalog.sessions.begin() as session:
        assert take_unpublished(session, 60) == []  # the same broker: it still holds the task
    queue._restarted("run-b")
    with catalog.sessions.begin() as session:
        assert take_unpublished(session, 60) == [(job_id, "ct-classical")]
        assert forget_published(session) == 1


def test_a_run_past_its_timeout_loses_its_claim(catalog: Catalog) -> None:
    (job_id,) = _queue(catalog)
    with catalog.sessions.begin() as session:
        assert claim_job_id(session, job_id, "h:1:celery1", 30)
    with Heartbeat(catalog, job_id, "h:1:celery1", 30, timeout_s=0.2, max_attempts=3) as beat:
        wait_for(lambda: beat.lost, 5, 0.02, "the timeout")
    job = _job(catalog, job_id)
    assert (job.state, job.claimed_by) == ("queued", None)
    with catalog.sessions() as session:
        assert set_progress(session, job_id, "h:1:celery1", "infer", 0.5) is False  # it stops


def test_a_task_whose_claim_cannot_be_tried_goes_back_to_the_broker(
    catalog: Catalog, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    settings = load_settings(None, {"database_url": catalog.url, "data_dir": tmp_path})

    def away(*_: object) -> None:
        raise OperationalError("claim", {}, Exception("connection refused"))

    monkeypatch.setattr(celery_worker._state, "settings", settings)
    monkeypatch.setattr(celery_worker, "claim_job_id", away)
    monkeypatch.setattr(celery_worker, "REJECT_PAUSE_S", 0.0)
    with pytest.raises(Reject) as rejected:
        celery_worker.run_task(1)
    assert rejected.value.requeue is True


def test_the_worker_refuses_a_catalog_it_cannot_use(tmp_path: Path) -> None:
    from tests.conftest import run_cli

    secret = "s3cr3t-pw"
    empty = run_cli(
        "worker",
        "--database-url",
        f"sqlite:///{tmp_path / 'empty.sqlite'}",
        "--broker-url",
        f"redis://:{secret}@127.0.0.1:1/0",
        check=False,
    )
    assert empty.returncode != 0
    assert "schema is at revision None" in " ".join(empty.stderr.split())
    assert secret not in empty.stderr + empty.stdout
    for url in [f"postgresql+psycopg://p:{secret}@127.0.0.1:1:/x", f"nosuchdb://p:{secret}@h/x"]:
        bad = run_cli("worker", "--database-url", url, "--broker-url", "redis://h/0", check=False)
        assert bad.returncode != 0
        assert "the worker cannot use the catalog" in " ".join(bad.stderr.split())
        assert "Traceback" not in bad.stderr
        assert secret not in bad.stderr + bad.stdout
