"""The job state machine: transitions are compare-and-set, two workers never take one job, and
jobs a dead worker left running go back to the queue (or fail after too many deaths)."""

from __future__ import annotations

import threading
from collections.abc import Iterator
from pathlib import Path

import pytest
from sqlalchemy import select

from pacs_node.catalog.db import Catalog, open_catalog
from pacs_node.catalog.jobs import (
    cancel_job,
    claim_job,
    fail_job,
    finish_job,
    list_jobs,
    queue_job,
    requeue_orphans,
    retry_job,
)
from pacs_node.catalog.models import JobEvent, Study, utcnow


@pytest.fixture(params=["sqlite", "postgresql"])
def catalog(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Catalog]:
    if request.param == "sqlite":
        url = f"sqlite:///{tmp_path / 'c.sqlite'}"
    else:
        url = request.getfixturevalue("postgres_url")
    opened = open_catalog(url)
    yield opened
    opened.dispose()


def _study(catalog: Catalog) -> int:
    now = utcnow()
    with catalog.sessions.begin() as session:
        study = Study(
            study_uid="1.2.3",
            state="stable",
            first_received_at=now,
            receiving_since=now,
            last_received_at=now,
            reopened_count=0,
            duplicate_count=0,
        )
        session.add(study)
        session.flush()
        return study.id


def _queue(catalog: Catalog, study_id: int, n: int = 1) -> list[int]:
    with catalog.sessions.begin() as session:
        return [
            queue_job(session, study_id, "ct-classical", ["1.2.3.4"], {"seg": ["PACS"]})
            for _ in range(n)
        ]


def _state(catalog: Catalog, job_id: int) -> str:
    with catalog.sessions() as session:
        return list_jobs(session, [job_id])[0].state


def test_transitions_are_compare_and_set(catalog: Catalog) -> None:
    study_id = _study(catalog)
    (job_id,) = _queue(catalog, study_id)
    with catalog.sessions.begin() as session:
        assert retry_job(session, job_id) is False  # only failed or cancelled jobs
        assert claim_job(session, "h:1:w0") == job_id
        assert claim_job(session, "h:1:w1") is None  # nothing else queued
    with catalog.sessions.begin() as session:
        assert cancel_job(session, job_id) is True
        # the worker finds out when it records its result: the cancel wins
        assert finish_job(session, job_id, "h:1:w0", {"infer_s": 1.0}) is False
        assert fail_job(session, job_id, "h:1:w0", "boom", {}) is False
    assert _state(catalog, job_id) == "cancelled"
    with catalog.sessions.begin() as session:
        assert retry_job(session, job_id) is True
        assert claim_job(session, "h:1:w0") == job_id
        assert finish_job(session, job_id, "h:1:w1", {}) is False  # not this worker's job
        assert finish_job(session, job_id, "h:1:w0", {"infer_s": 1.0}) is True
        assert cancel_job(session, job_id) is False  # done is final
    with catalog.sessions() as session:
        summary = list_jobs(session, [job_id])[0]
    assert (summary.state, summary.progress, summary.timings) == ("done", 1.0, {"infer_s": 1.0})
    with catalog.sessions() as session:
        kinds = list(
            session.scalars(
                select(JobEvent.kind).where(JobEvent.job_id == job_id).order_by(JobEvent.id)
            )
        )
    assert kinds == ["queued", "running", "cancelled", "queued", "running", "done"]


def test_two_workers_never_take_the_same_job(catalog: Catalog) -> None:
    study_id = _study(catalog)
    jobs = _queue(catalog, study_id, 40)
    taken: dict[str, list[int]] = {"h:1:a": [], "h:1:b": []}
    start = threading.Barrier(2)

    def work(worker: str) -> None:
        start.wait()
        while True:
            with catalog.sessions.begin() as session:
                job_id = claim_job(session, worker)
            if job_id is None:
                return
            taken[worker].append(job_id)

    threads = [threading.Thread(target=work, args=(w,)) for w in taken]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(60)
    claimed = taken["h:1:a"] + taken["h:1:b"]
    assert sorted(claimed) == jobs  # every job once, none twice
    with catalog.sessions() as session:
        summaries = list_jobs(session)
    assert {s.state for s in summaries} == {"running"}
    assert {s.attempts for s in summaries} == {1}


def test_orphans_are_requeued_then_failed(catalog: Catalog) -> None:
    study_id = _study(catalog)
    mine, other = _queue(catalog, study_id, 2)
    with catalog.sessions.begin() as session:
        assert claim_job(session, "here:10:w0") == mine
        assert claim_job(session, "there:10:w0") == other
    with catalog.sessions.begin() as session:
        assert requeue_orphans(session, "here:", max_attempts=2) == (1, 0)
    assert _state(catalog, mine) == "queued"
    assert _state(catalog, other) == "running"  # another host's job is not ours to touch
    with catalog.sessions.begin() as session:
        assert claim_job(session, "here:11:w0") == mine  # second attempt
    with catalog.sessions.begin() as session:
        assert requeue_orphans(session, "here:", max_attempts=2) == (0, 1)
    with catalog.sessions() as session:
        summary = list_jobs(session, [mine])[0]
    assert summary.state == "failed"
    assert summary.error is not None
    assert "died 2 times" in summary.error


def test_a_job_stopped_by_the_node_gets_its_attempt_back(catalog: Catalog) -> None:
    """Graceful stops at their deadline are no fault of the job: any number of them never
    fails it, and a later real crash still counts from where the job was."""
    study_id = _study(catalog)
    (job,) = _queue(catalog, study_id, 1)
    for pid in range(20, 25):
        with catalog.sessions.begin() as session:
            assert claim_job(session, f"here:{pid}:w0") == job
        with catalog.sessions.begin() as session:
            assert requeue_orphans(
                session, f"here:{pid}:", max_attempts=2, by="node stopping", stopped=True
            ) == (1, 0)
        with catalog.sessions() as session:
            assert list_jobs(session, [job])[0].attempts == 0
    with catalog.sessions.begin() as session:
        assert claim_job(session, "here:30:w0") == job
    with catalog.sessions.begin() as session:
        assert requeue_orphans(session, "here:", max_attempts=2) == (1, 0)  # one real death
    assert _state(catalog, job) == "queued"
