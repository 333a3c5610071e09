"""Releasing a held result: refused once a newer result of the same study, model and series
has gone out (the PACS would get the stale one after it); rejecting it stays allowed."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
from sqlalchemy import select, update
from sqlalchemy.orm import Session

from pacs_node.catalog.db import Catalog, open_catalog
from pacs_node.catalog.deliveries import create_deliveries
from pacs_node.catalog.jobs import queue_job
from pacs_node.catalog.models import Delivery, DeliveryState, Job, JobState
from pacs_node.catalog.quality import (
    RELEASED,
    JobNotDone,
    StaleRelease,
    hold_for_quality,
    newer_sent_job,
    record_verdict,
    reject_result,
    release_result,
)
from pacs_node.catalog.results import StoredEncoding, add_result_rows, write_files
from tests.catalog_factory import stable_study

EXPLICIT_LE = "1.2.840.10008.1.2.1"
CT = "1.2.840.10008.5.1.4.1.1.2"
FAILED = [{"check": "size_range", "label": "body", "message": "too large"}]


@pytest.fixture
def catalog(tmp_path: Path) -> Iterator[Catalog]:
    opened = open_catalog(f"sqlite:///{tmp_path / 'c.sqlite'}")
    yield opened
    opened.dispose()


def _job(
    session: Session,
    results_dir: Path,
    study_id: int,
    model: str = "ct",
    series: tuple[str, ...] = ("1.2.3.4",),
) -> int:
    """A done job of ``model`` on the study's ``series`` with one stored result, pending to
    PACS."""
    job_id = queue_job(session, study_id, model, list(series), {})
    item = StoredEncoding("seg", CT, f"1.2.3.9.{job_id}", "1.2.3.100", EXPLICIT_LE, b"DICM" * 8)
    relpaths = write_files(results_dir, f"{job_id}/1", [item], fsync=False)
    results = add_result_rows(session, job_id, [item], relpaths)
    create_deliveries(session, job_id, results, {"seg": ["PACS"]})
    session.execute(update(Job).where(Job.id == job_id).values(state=JobState.DONE))
    return job_id


def _set_state(session: Session, job_id: int, state: DeliveryState) -> None:
    session.execute(update(Delivery).where(Delivery.job_id == job_id).values(state=state))


def _states(catalog: Catalog, job_id: int) -> set[DeliveryState]:
    with catalog.sessions() as session:
        return set(session.scalars(select(Delivery.state).where(Delivery.job_id == job_id)))


def test_an_old_held_result_is_not_released_after_a_newer_one_went_out(
    tmp_path: Path, catalog: Catalog
) -> None:
    results_dir = tmp_path / "results"
    with catalog.sessions.begin() as session:
        study_id = stable_study(session)
        old = _job(session, results_dir, study_id)
        newer = _job(session, results_dir, study_id)
        other_model = _job(session, results_dir, study_id, model="mr")
        assert hold_for_quality(session, old, FAILED) == 1
        _set_state(session, newer, DeliveryState.DELIVERED)
        _set_state(session, other_model, DeliveryState.DELIVERED)
        assert newer_sent_job(session, old) == newer
        assert newer_sent_job(session, newer) is None  # nothing newer than it went out

    with catalog.sessions.begin() as session, pytest.raises(StaleRelease) as refused:
        release_result(session, old, "dr.house")
    message = str(refused.value)
    assert f"job {newer}," in message
    assert f"releasing job {old}" in message
    assert _states(catalog, old) == {DeliveryState.HELD}  # nothing changed

    with catalog.sessions.begin() as session:
        assert reject_result(session, old, "dr.house", "stale") == 1
    assert _states(catalog, old) == {DeliveryState.REJECTED}


@pytest.mark.parametrize(
    ("newer_state", "refused"),
    [
        (DeliveryState.PENDING, True),  # on its way
        (DeliveryState.SENDING, True),
        (DeliveryState.HELD, False),  # held too: nothing of it reached the PACS
        (DeliveryState.DEAD, False),
        (DeliveryState.REJECTED, False),
    ],
)
def test_which_newer_results_count_as_gone_out(
    tmp_path: Path, catalog: Catalog, newer_state: DeliveryState, refused: bool
) -> None:
    results_dir = tmp_path / "results"
    with catalog.sessions.begin() as session:
        study_id = stable_study(session)
        old = _job(session, results_dir, study_id)
        newer = _job(session, results_dir, study_id)
        hold_for_quality(session, old, FAILED)
        _set_state(session, newer, newer_state)
        assert newer_sent_job(session, old) == (newer if refused else None)
        if refused:
            with pytest.raises(StaleRelease):
                release_result(session, old, "dr.house")
        else:
            assert release_result(session, old, "dr.house") == 1


def test_a_newer_result_released_at_the_gate_blocks_the_older_one(
    tmp_path: Path, catalog: Catalog
) -> None:
    results_dir = tmp_path / "results"
    with catalog.sessions.begin() as session:
        study_id = stable_study(session)
        other_study = stable_study(session, "1.2.4")
        old = _job(session, results_dir, study_id)
        newer = _job(session, results_dir, study_id)
        elsewhere = _job(session, results_dir, other_study)
        for job_id in (old, newer, elsewhere):
            hold_for_quality(session, job_id, FAILED)
        _set_state(session, elsewhere, DeliveryState.DELIVERED)  # another study: no bearing
        assert release_result(session, newer, "dr.house") == 1
    with catalog.sessions.begin() as session:
        # released, then sent: the decision alone is enough even once its rows are settled
        _set_state(session, newer, DeliveryState.DEAD)
        assert session.scalar(select(Job.qa_decision).where(Job.id == newer)) == "released"
        with pytest.raises(StaleRelease):
            release_result(session, old, "dr.house")


def test_a_job_with_nothing_held_is_not_a_refusal(tmp_path: Path, catalog: Catalog) -> None:
    results_dir = tmp_path / "results"
    with catalog.sessions.begin() as session:
        study_id = stable_study(session)
        old = _job(session, results_dir, study_id)
        _job(session, results_dir, study_id)  # newer, pending
        assert release_result(session, old, "dr.house") == 0  # "no result held", as before


def test_a_newer_result_of_another_series_does_not_block_the_release(
    tmp_path: Path, catalog: Catalog
) -> None:
    results_dir = tmp_path / "results"
    with catalog.sessions.begin() as session:
        study_id = stable_study(session)
        arterial = _job(session, results_dir, study_id, series=("1.2.3.4",))
        venous = _job(session, results_dir, study_id, series=("1.2.3.5",))
        both = _job(session, results_dir, study_id, series=("1.2.3.5", "1.2.3.4"))
        hold_for_quality(session, arterial, FAILED)
        hold_for_quality(session, both, FAILED)
        _set_state(session, venous, DeliveryState.DELIVERED)
        assert newer_sent_job(session, arterial) is None  # the venous series is another result
        assert release_result(session, arterial, "dr.house") == 1
    with catalog.sessions.begin() as session:
        again = _job(session, results_dir, study_id, series=("1.2.3.4", "1.2.3.5"))
        assert again > both
        # the same series in another order is the same result: the earlier job is now stale
        _set_state(session, again, DeliveryState.DELIVERED)
        assert newer_sent_job(session, both) == again


def test_a_running_job_is_neither_released_nor_rejected(tmp_path: Path, catalog: Catalog) -> None:
    """Under qa: hold the SEG and SR are held while the rest is built: a decision then would be
    undone by the rest's hold, so it is refused until the job is done."""
    with catalog.sessions.begin() as session:
        job_id = _job(session, tmp_path / "results", stable_study(session))
        assert hold_for_quality(session, job_id, FAILED) == 1
        session.execute(update(Job).where(Job.id == job_id).values(state=JobState.RUNNING))
    for decide in (release_result, reject_result):
        with catalog.sessions.begin() as session, pytest.raises(JobNotDone, match="running"):
            decide(session, job_id, "alice")  # type: ignore[operator]
    assert _states(catalog, job_id) == {DeliveryState.HELD}


def test_only_the_new_deliveries_are_held_and_never_after_a_release(
    tmp_path: Path, catalog: Catalog
) -> None:
    results_dir = tmp_path / "results"
    with catalog.sessions.begin() as session:
        job_id = _job(session, results_dir, study_id := stable_study(session))
        other = _job(session, results_dir, study_id, series=("1.2.3.5",))
        first = session.scalar(select(Delivery.result_id).where(Delivery.job_id == job_id))
        assert first is not None
        assert hold_for_quality(session, job_id, FAILED, [first + 1000]) == 0  # not this one
        assert hold_for_quality(session, job_id, FAILED, [first]) == 1
        assert release_result(session, job_id, "alice") == 1
        assert hold_for_quality(session, job_id, FAILED) == 0  # released: the decision stands
        record_verdict(session, job_id, "hold", "fail", FAILED)  # a re-run's verdict
        assert session.scalar(select(Job.qa_decision).where(Job.id == job_id)) == RELEASED
    assert _states(catalog, job_id) == {DeliveryState.PENDING}
    assert _states(catalog, other) == {DeliveryState.PENDING}
