"""Scale-out with Celery through the doors users use: a node (``job_queue: celery``, a
PostgreSQL catalog, a Redis broker of the test's own) receives studies from DCMTK's storescu
and ``pacs-node worker`` processes run their jobs; each job runs once although a worker is
SIGKILLed mid-job, a task is delivered twice and the broker restarts empty. A RabbitMQ smoke
test publishes and runs one job."""

from __future__ import annotations

import os
import signal
import subprocess
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pydicom
import pytest
import redis
import yaml
from sqlalchemy import select

from pacs_node.catalog.db import Catalog, open_catalog
from pacs_node.catalog.models import Job, JobEvent
from pacs_node.config import load_settings
from tests.conftest import PACS_NODE, NodeProcess, clean_env, free_port, storescu, wait_for
from tests.dicom_factory import write_series

pytestmark = pytest.mark.integration

ROOT = Path(__file__).resolve().parents[2]
RULE = {
    "name": "ct-body",
    "when": {"modality": "CT", "slices": {"min": 10}},
    "models": ["ct-classical"],
}
STATES = {"queued", "running", "done", "failed", "cancelled"}  # the job's own transitions
# A RabbitMQ server already running (as the PostgreSQL of the tests); the test's queue has a
# name of its own and is deleted at the end.
RABBITMQ_URL = os.environ.get("PACS_NODE_TEST_RABBITMQ", "amqp://guest:guest@127.0.0.1:5672//")


class RedisServer:
    """A redis-server of the test's own, without persistence: a restart loses every task."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.port = free_port()
        self.process: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self) -> None:
        self.root.mkdir(parents=True, exist_ok=True)
        self.process = subprocess.Popen(
            [
                "redis-server",
                "--port",
                str(self.port),
                "--bind",
                "127.0.0.1",
                "--save",
                "",
                "--appendonly",
                "no",
                "--dir",
                str(self.root),
            ],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        client = redis.Redis(port=self.port, socket_connect_timeout=0.5)
        wait_for(lambda: self._pong(client), 10, what="redis-server")

    @staticmethod
    def _pong(client: redis.Redis) -> bool:
        try:
            return bool(client.ping())
        except redis.ConnectionError:
            return False

    def kill(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.kill()
            self.process.wait()


@pytest.fixture
def redis_server(tmp_path: Path) -> Iterator[RedisServer]:
    server = RedisServer(tmp_path / "redis")
    server.start()
    yield server
    server.kill()


class Workers:
    """``pacs-node worker`` processes on a node's configuration."""

    def __init__(self, root: Path, config_dir: Path, env: dict[str, str] | None = None) -> None:
        self.root, self.config_dir = root, config_dir
        self.env = {**clean_env(), **(env or {})}
        self.processes: list[subprocess.Popen[bytes]] = []

    def start(self, concurrency: int = 1) -> subprocess.Popen[bytes]:
        log = (self.root / f"worker{len(self.processes)}.log").open("ab")
        args = [PACS_NODE, "worker", "--concurrency", str(concurrency)]
        if self.config_dir.is_dir():
            args += ["--config", str(self.config_dir)]
        process = subprocess.Popen(args, stdout=log, stderr=log, env=self.env)
        self.processes.append(process)
        return process

    def logs(self) -> str:
        return "".join(p.read_text(errors="replace") for p in self.root.glob("worker*.log"))

    def stop_all(self) -> None:
        for process in self.processes:
            if process.poll() is None:
                process.send_signal(signal.SIGTERM)
        for process in self.processes:
            try:
                process.wait(20)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()


@pytest.fixture
def workers(tmp_path: Path) -> Iterator[Callable[..., Workers]]:
    made: list[Workers] = []

    def factory(config_dir: Path, env: dict[str, str] | None = None) -> Workers:
        made.append(Workers(tmp_path, config_dir, env))
        return made[-1]

    yield factory
    for group in made:
        group.stop_all()


def _send_study(node: NodeProcess, directory: Path, slices: int = 16, size: int = 64) -> str:
    files = write_series(directory, slices=slices, rows=size, columns=size, spacing=(3.0, 2.0, 2.0))
    assert storescu(node, *files).returncode == 0
    return str(pydicom.dcmread(files[0], stop_before_pixels=True).StudyInstanceUID)


def _jobs(catalog: Catalog) -> dict[str, Job]:
    with catalog.sessions() as session:
        jobs = session.scalars(select(Job).order_by(Job.id)).all()
        for job in jobs:
            session.expunge(job)
    return {str(job.id): job for job in jobs}


def _job_of(catalog: Catalog, count: int) -> Job | None:
    jobs = list(_jobs(catalog).values())
    return jobs[count - 1] if len(jobs) >= count else None


def _finished(catalog: Catalog, job_id: int) -> Job | None:
    job = _jobs(catalog).get(str(job_id))
    if job is not None and job.state == "failed":
        raise AssertionError(f"job {job_id} failed: {job.error}")
    return job if job is not None and job.state == "done" else None


def _events(catalog: Catalog, job_id: int) -> list[tuple[str, dict[str, Any]]]:
    with catalog.sessions() as session:
        rows = session.scalars(
            select(JobEvent).where(JobEvent.job_id == job_id).order_by(JobEvent.id)
        ).all()
        return [(e.kind, e.detail or {}) for e in rows if e.kind in STATES]


def test_celery_workers_run_each_job_once_through_kills_duplicates_and_a_broker_restart(
    tmp_path: Path,
    make_node: Callable[..., NodeProcess],
    postgres_url: str,
    redis_server: RedisServer,
    workers: Callable[..., Workers],
) -> None:
    prefix = f"t{uuid.uuid4().hex[:8]}."
    node = make_node(
        start=False,
        models_dir=str(ROOT / "models"),
        database_url=postgres_url,
        job_queue="celery",
        broker_url=redis_server.url,
        job_queue_prefix=prefix,
        job_lease_s=3.0,
        dicom_workers=0,
        quiet_period_s=1.0,
    )
    node.config_dir.mkdir(parents=True, exist_ok=True)
    (node.config_dir / "routes.yaml").write_text(yaml.safe_dump({"rules": [RULE]}))
    node.start()
    pool = workers(node.config_dir)
    first, second = pool.start(), pool.start()
    catalog = open_catalog(postgres_url, run_migrations=False)
    broker = redis.Redis(port=redis_server.port)
    try:
        # 1. A routed study: its job is published when queued and run once, by one worker.
        _send_study(node, tmp_path / "s1")
        job = wait_for(lambda: _job_of(catalog, 1), 30, what="the routed job")
        done = wait_for(lambda: _finished(catalog, job.id), 60, interval=0.2, what="job 1 done")
        assert done.attempts == 1
        assert [kind for kind, _ in _events(catalog, job.id)] == ["queued", "running", "done"]

        # 2. The broker delivers its task again: acknowledged, nothing runs a second time.
        from pacs_node.jobs.celery_app import TASK_NAME, broker_queue, make_app

        options = load_settings(node.config_dir).node
        make_app(options).send_task(TASK_NAME, args=[job.id], queue=broker_queue(options))
        wait_for(lambda: "job not queued any more" in pool.logs(), 20, what="the duplicate acked")
        assert _finished(catalog, job.id).attempts == 1  # type: ignore[union-attr]
        assert [kind for kind, _ in _events(catalog, job.id)] == ["queued", "running", "done"]

        # 3. A worker SIGKILLed mid-job: its lease runs out, the other worker finishes the job.
        _send_study(node, tmp_path / "s2", slices=40, size=128)
        job2 = wait_for(lambda: _job_of(catalog, 2), 30, what="the second job")

        def running_pid() -> int | None:
            current = _jobs(catalog)[str(job2.id)]
            if current.state != "running" or current.stage not in ("infer", "build"):
                return None
            return int((current.claimed_by or "").split(":")[1])

        victim = wait_for(running_pid, 60, interval=0.02, what="job 2 running")
        assert victim in (first.pid, second.pid)
        os.kill(victim, signal.SIGKILL)
        done2 = wait_for(lambda: _finished(catalog, job2.id), 60, interval=0.2, what="job 2")
        assert done2.attempts == 2
        events = _events(catalog, job2.id)
        assert [kind for kind, _ in events] == ["queued", "running", "queued", "running", "done"]
        assert events[2][1]["by"] == "lease expired"
        survivor = second if victim == first.pid else first
        assert str(survivor.pid) in str(events[3][1]["worker"])

        # 4. The broker restarts empty while a published job waits: published again, run once.
        survivor.send_signal(signal.SIGTERM)  # no consumer: the task stays in the broker
        survivor.wait(20)
        _send_study(node, tmp_path / "s3")
        job3 = wait_for(lambda: _job_of(catalog, 3), 30, what="the third job")
        wait_for(lambda: broker.llen(f"{prefix}cpu") == 1, 20, what="its task in the broker")
        redis_server.kill()
        redis_server.start()  # same port, nothing kept
        assert broker.llen(f"{prefix}cpu") == 0
        pool.start()
        done3 = wait_for(lambda: _finished(catalog, job3.id), 60, interval=0.2, what="job 3")
        assert done3.attempts == 1
        assert "job published" in node.log_text()
        assert [j.state for j in _jobs(catalog).values()] == ["done", "done", "done"]
    finally:
        catalog.dispose()
        pool.stop_all()
        node.stop()


def test_rabbitmq_smoke_a_job_is_published_and_run(
    tmp_path: Path, workers: Callable[..., Workers]
) -> None:
    """The same path on RabbitMQ, one job, run by a forked pool process of a worker; a broker
    that lost the job's queue (its data wiped) gets the job handed over again at once."""
    from kombu import Connection

    from pacs_node.catalog.jobs import queue_job
    from pacs_node.jobs.celery_queue import CeleryJobQueue
    from tests.catalog_factory import ingest

    data = tmp_path / "var"
    env = {
        "PACS_NODE_JOB_QUEUE": "celery",
        "PACS_NODE_BROKER_URL": RABBITMQ_URL,
        "PACS_NODE_JOB_QUEUE_PREFIX": f"t{uuid.uuid4().hex[:8]}.",
        "PACS_NODE_DATA_DIR": str(data),
        "PACS_NODE_MODELS_DIR": str(ROOT / "models"),
    }
    settings = load_settings(
        None, {k.removeprefix("PACS_NODE_").lower(): v for k, v in env.items()}
    )
    catalog = open_catalog(settings.node.catalog_url)
    files = write_series(tmp_path / "ct", slices=16, rows=64, columns=64, spacing=(3, 2, 2))
    study_id, _, series = ingest(catalog, settings.node.spool_dir, files)
    with catalog.sessions.begin() as session:
        job_id = queue_job(session, study_id, "ct-classical", series, {})
    queue = CeleryJobQueue(catalog, settings)
    from pacs_node.jobs.celery_app import broker_queue

    declared = broker_queue(settings.node)
    try:
        assert queue.probe()
        assert queue.sweep() == (0, 1)  # published on the cpu queue
        assert queue.sweep() == (0, 0)  # and not again before its interval
        with Connection(RABBITMQ_URL) as connection:  # the broker loses the queue and the task
            declared.bind(connection.default_channel).delete()
        assert queue.probe()
        assert queue.sweep() == (0, 1)  # handed over again at once, its queue declared again
        pool = workers(tmp_path / "no-config", env)
        worker = pool.start(concurrency=2)  # prefork: the job runs in a forked process
        done = wait_for(lambda: _finished(catalog, job_id), 60, interval=0.2, what="the job")
        assert done.attempts == 1
        assert f":{worker.pid}:" not in str(done.claimed_by)
        assert queue.health().broker_reachable is True
        pool.stop_all()  # before its queue goes
    finally:
        catalog.dispose()
        with Connection(RABBITMQ_URL) as connection:
            declared.bind(connection.default_channel).delete()
            declared.exchange.bind(connection.default_channel).delete()
