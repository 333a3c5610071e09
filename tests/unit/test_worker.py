"""A job run in burst mode: spooled series -> ct-classical -> results stored once as files and
rows -> one delivery per (result, destination), SOURCE resolved to the sender; failures say
the stage and the reason."""

from __future__ import annotations

import gc
import weakref
from collections.abc import Iterator
from pathlib import Path

import pytest
from pydicom import dcmread
from sqlalchemy import select

from pacs_node import pipeline, worker
from pacs_node.catalog.db import Catalog, open_catalog
from pacs_node.catalog.deliveries import list_deliveries
from pacs_node.catalog.jobs import cancel_job, list_jobs, queue_job, retry_job
from pacs_node.catalog.models import Delivery, JobEvent, Result
from pacs_node.config import NodeOptions, PeerConfig, Settings
from pacs_node.destinations import FhirDestination
from pacs_node.pipeline import SeriesRun, Stopwatch
from pacs_node.results import ResultSet
from pacs_node.worker import FIRST_SENT_TEXT, RESULTS_FIRST_EVENT, results_dir, run_burst
from tests.catalog_factory import ingest
from tests.dicom_factory import write_series

ROOT = Path(__file__).parents[2]
EVERY_KIND = {"seg", "sr", "gsps", "key-images", "pdf", "fhir"}


@pytest.fixture
def settings(tmp_path: Path) -> Settings:
    return Settings(
        node=NodeOptions(
            data_dir=tmp_path / "var",
            models_dir=ROOT / "models",
            fsync=False,
            seg_jpeg2000_copy=True,
        ),
        peers=(PeerConfig(ae_title="CT1", host="127.0.0.1", port=11104),),
        destinations={
            "EHR": FhirDestination(
                type="fhir", base_url="https://ehr.example/fhir", patient_system="urn:oid:9.9"
            )
        },
    )


@pytest.fixture
def catalog(settings: Settings) -> Iterator[Catalog]:
    opened = open_catalog(settings.node.catalog_url)
    yield opened
    opened.dispose()


def _queue(catalog: Catalog, study_id: int, series: list[str], model: str) -> int:
    destinations = {kind: ["SOURCE"] for kind in ("seg", "sr", "gsps", "key_images", "pdf")} | {
        "sr": ["SOURCE", "ARCHIVE"],
        "fhir": ["EHR"],
    }
    with catalog.sessions.begin() as session:
        return queue_job(session, study_id, model, series, destinations, rule="ct")


def test_burst_runs_a_job_to_stored_results_and_deliveries(
    tmp_path: Path, settings: Settings, catalog: Catalog
) -> None:
    paths = write_series(tmp_path / "in", slices=12, rows=64, columns=64, spacing=(5, 5, 5))
    study_id, study_uid, series = ingest(catalog, settings.node.spool_dir, paths, "CT1")
    job_id = _queue(catalog, study_id, series, "ct-classical")

    assert run_burst(catalog, settings) == [job_id]
    assert run_burst(catalog, settings) == []  # the queue is empty: burst returns

    with catalog.sessions() as session:
        job = list_jobs(session, [job_id])[0]
        rows = list(session.scalars(select(Result).where(Result.job_id == job_id)))
        deliveries = list_deliveries(session, job_id=job_id)
    assert (job.state, job.progress, job.error) == ("done", 1.0, None)
    for stage in ("queued_s", "decode_s", "infer_s", "build_s", "store_s", "total_s"):
        assert stage in job.timings, stage
    assert {r.kind for r in rows} == EVERY_KIND
    for row in rows:
        encodings = dict(row.encodings)
        if row.kind == "seg":  # the JPEG 2000 copy is a second encoding of the SEG
            assert list(encodings)[1] == "1.2.840.10008.1.2.4.90"
            assert (results_dir(settings) / encodings.pop("1.2.840.10008.1.2.4.90")).is_file()
        assert len(encodings) == 1
        (path,) = encodings.values()
        data = (results_dir(settings) / path).read_bytes()
        assert len(data) <= row.size_bytes
        if row.kind == "fhir":
            assert b"urn:oid:9.9" in data  # the FHIR destination's identifier system
            assert row.patient_search is not None
            assert "urn:oid:9.9|TEST-0001" in row.patient_search
            continue
        ds = dcmread(results_dir(settings) / path)
        assert ds.SOPInstanceUID == row.sop_instance_uid
        assert ds.StudyInstanceUID == study_uid  # results go into the source study
    dicom = [r for r in rows if r.kind != "fhir"]
    by_destination: dict[str, int] = {}
    for d in deliveries:
        by_destination[d.destination] = by_destination.get(d.destination, 0) + 1
    assert by_destination == {"CT1": len(dicom), "ARCHIVE": 1, "EHR": 1}  # SOURCE is CT1
    assert {d.state for d in deliveries} == {"pending"}


def test_a_failing_job_records_stage_and_reason(
    tmp_path: Path, settings: Settings, catalog: Catalog
) -> None:
    paths = write_series(tmp_path / "in", slices=4, rows=16, columns=16)
    study_id, _, series = ingest(catalog, settings.node.spool_dir, paths)
    unknown_model = _queue(catalog, study_id, series, "no-such-model")
    missing_series = _queue(catalog, study_id, ["1.2.3.999"], "ct-classical")

    assert run_burst(catalog, settings) == [unknown_model, missing_series]

    with catalog.sessions() as session:
        first, second = list_jobs(session, [unknown_model, missing_series])
        assert list_deliveries(session) == []
    assert first.state == "failed"
    assert first.error is not None
    assert first.error.startswith("infer: ")
    assert "no-such-model" in first.error
    assert second.state == "failed"
    assert second.error == "decode: series 1.2.3.999 has no stored instances"
    assert not (results_dir(settings) / str(unknown_model)).exists()


def _kinds(catalog: Catalog, job_id: int) -> tuple[list[str], list[tuple[int, int, str]]]:
    with catalog.sessions() as session:
        rows = sorted(session.scalars(select(Result.kind).where(Result.job_id == job_id)))
        deliveries = sorted(
            (d.id, d.result_id, d.destination)
            for d in session.scalars(select(Delivery).where(Delivery.job_id == job_id))
        )
    return list(rows), deliveries


def test_the_seg_and_sr_are_committed_before_the_rest_is_built(
    tmp_path: Path, settings: Settings, catalog: Catalog, monkeypatch: pytest.MonkeyPatch
) -> None:
    paths = write_series(tmp_path / "in", slices=12, rows=64, columns=64, spacing=(5, 5, 5))
    study_id, _, series = ingest(catalog, settings.node.spool_dir, paths, "CT1")
    job_id = _queue(catalog, study_id, series, "ct-classical")
    seen: list[tuple[list[str], list[tuple[int, int, str]], list[int]]] = []
    woken: list[int] = []

    def build_extras_of(run: SeriesRun, timings: Stopwatch | None = None) -> ResultSet:
        seen.append((*_kinds(catalog, job_id), list(woken)))  # as another session sees it
        return pipeline.build_extras_of(run, timings)

    monkeypatch.setattr(worker, "build_extras_of", build_extras_of)
    assert run_burst(catalog, settings, on_stored=woken.append) == [job_id]

    ((kinds, deliveries, woken_before),) = seen
    assert kinds == ["seg", "sr"]
    assert len(deliveries) == 3  # SEG to CT1, SR to CT1 and ARCHIVE
    assert woken_before == [3]  # the outbox was woken for them before the rest was built
    assert woken == [3, len(_kinds(catalog, job_id)[1]) - 3]
    with catalog.sessions() as session:
        job = list_jobs(session, [job_id])[0]
        events = [
            e.kind for e in session.scalars(select(JobEvent).where(JobEvent.job_id == job_id))
        ]
    assert (job.state, job.progress) == ("done", 1.0)
    assert events.index(RESULTS_FIRST_EVENT) < events.index("done")
    assert set(_kinds(catalog, job_id)[0]) == EVERY_KIND


def test_a_rerun_after_a_crash_between_the_parts_adds_only_the_rest(
    tmp_path: Path, settings: Settings, catalog: Catalog, monkeypatch: pytest.MonkeyPatch
) -> None:
    paths = write_series(tmp_path / "in", slices=12, rows=64, columns=64, spacing=(5, 5, 5))
    study_id, _, series = ingest(catalog, settings.node.spool_dir, paths, "CT1")
    job_id = _queue(catalog, study_id, series, "ct-classical")

    def crash(run: SeriesRun, timings: Stopwatch | None = None) -> ResultSet:
        raise RuntimeError("the worker went down while building the PDF")

    with monkeypatch.context() as patch:
        patch.setattr(worker, "build_extras_of", crash)
        assert run_burst(catalog, settings) == [job_id]
    kinds, first = _kinds(catalog, job_id)
    assert kinds == ["seg", "sr"]
    with catalog.sessions.begin() as session:
        failed = list_jobs(session, [job_id])[0]
        assert retry_job(session, job_id)
    assert failed.state == "failed"
    assert failed.error is not None
    assert failed.error.startswith(f"extras: {FIRST_SENT_TEXT}: RuntimeError")

    assert run_burst(catalog, settings) == [job_id]
    kinds, deliveries = _kinds(catalog, job_id)
    assert sorted(kinds) == sorted(EVERY_KIND)  # one of each: SEG and SR not stored twice
    assert [d for d in deliveries if d[1] in {r for _, r, _ in first}] == first
    with catalog.sessions() as session:
        job = list_jobs(session, [job_id])[0]
        rows = list(session.scalars(select(Result).where(Result.job_id == job_id)))
    assert job.state == "done"
    assert len(deliveries) == sum(r.kind != "fhir" for r in rows) + 2  # + ARCHIVE (SR), EHR
    with catalog.sessions() as session:
        events = list(session.scalars(select(JobEvent).where(JobEvent.job_id == job_id)))
    assert [e.kind for e in events].count(RESULTS_FIRST_EVENT) == 1  # the re-run stored none
    done = [e for e in events if e.kind == "done"][-1]
    assert (done.detail["results"], done.detail["deliveries"]) == (len(rows), len(deliveries))
    for row in rows:  # every file a row names is there, the first attempt's included
        for path in dict(row.encodings).values():
            assert (results_dir(settings) / path).is_file()


def test_a_store_failing_after_the_first_part_leaves_no_file_behind(
    tmp_path: Path, settings: Settings, catalog: Catalog, monkeypatch: pytest.MonkeyPatch
) -> None:
    paths = write_series(tmp_path / "in", slices=12, rows=64, columns=64, spacing=(5, 5, 5))
    study_id, _, series = ingest(catalog, settings.node.spool_dir, paths, "CT1")
    job_id = _queue(catalog, study_id, series, "ct-classical")
    calls: list[int] = []

    def create_deliveries(*args: object) -> int:  # the second commit's rows fail
        calls.append(1)
        if len(calls) == 2:
            raise RuntimeError("the catalog refused the rest")
        return worker_create(*args)  # type: ignore[arg-type]

    worker_create = worker.create_deliveries
    monkeypatch.setattr(worker, "create_deliveries", create_deliveries)
    assert run_burst(catalog, settings) == [job_id]
    with catalog.sessions() as session:
        job = list_jobs(session, [job_id])[0]
        rows = list(session.scalars(select(Result).where(Result.job_id == job_id)))
    assert job.state == "failed"
    assert job.error is not None
    assert FIRST_SENT_TEXT in job.error
    named = {p for row in rows for p in dict(row.encodings).values()}
    on_disk = {
        str(p.relative_to(results_dir(settings)))
        for p in results_dir(settings).rglob("*")
        if p.is_file()
    }
    assert on_disk == named  # the rest's files, written but never committed, are gone


def test_cancelling_during_the_extras_stops_the_seg_and_sr_until_a_retry(
    tmp_path: Path, settings: Settings, catalog: Catalog, monkeypatch: pytest.MonkeyPatch
) -> None:
    paths = write_series(tmp_path / "in", slices=12, rows=64, columns=64, spacing=(5, 5, 5))
    study_id, _, series = ingest(catalog, settings.node.spool_dir, paths, "CT1")
    job_id = _queue(catalog, study_id, series, "ct-classical")

    def cancelled(run: SeriesRun, timings: Stopwatch | None = None) -> ResultSet:
        with catalog.sessions.begin() as session:
            assert cancel_job(session, job_id, "alice")
        return pipeline.build_extras_of(run, timings)

    with monkeypatch.context() as patch:
        patch.setattr(worker, "build_extras_of", cancelled)
        assert run_burst(catalog, settings) == [job_id]
    with catalog.sessions() as session:
        states = list(session.scalars(select(Delivery.state).where(Delivery.job_id == job_id)))
        assert list_jobs(session, [job_id])[0].state == "cancelled"
    assert states == ["cancelled"] * 3  # SEG to CT1, SR to CT1 and ARCHIVE: never sent

    with catalog.sessions.begin() as session:
        assert retry_job(session, job_id)
    assert run_burst(catalog, settings) == [job_id]
    with catalog.sessions() as session:
        deliveries = list_deliveries(session, job_id=job_id)
    assert {d.state for d in deliveries} == {"pending"}  # the SEG and SR go out again
    pairs = [(result, destination) for _, result, destination in _kinds(catalog, job_id)[1]]
    assert len(set(pairs)) == len(pairs) == len(deliveries)


def test_each_series_volume_is_freed_once_its_extras_are_built(
    tmp_path: Path, settings: Settings, catalog: Catalog, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A job of several series never holds every series' volume and labelmap while the last
    one's extras are built."""
    study_uid = "1.2.826.0.1.3680043.10.1234.77"
    paths = write_series(
        tmp_path / "a", slices=12, rows=64, columns=64, spacing=(5, 5, 5), study_uid=study_uid
    ) + write_series(
        tmp_path / "b",
        slices=12,
        rows=64,
        columns=64,
        spacing=(5, 5, 5),
        study_uid=study_uid,
        series_number=2,
    )
    study_id, _, series = ingest(catalog, settings.node.spool_dir, paths, "CT1")
    assert len(series) == 2
    job_id = _queue(catalog, study_id, series, "ct-classical")
    volumes: list[weakref.ref[object]] = []
    alive: list[list[bool]] = []

    def build_extras_of(run: SeriesRun, timings: Stopwatch | None = None) -> ResultSet:
        gc.collect()
        alive.append([ref() is not None for ref in volumes])  # the series built before
        volumes.append(weakref.ref(run.volume))
        return pipeline.build_extras_of(run, timings)

    monkeypatch.setattr(worker, "build_extras_of", build_extras_of)
    assert run_burst(catalog, settings) == [job_id]
    assert alive == [[], [False]]
    assert set(_kinds(catalog, job_id)[0]) == EVERY_KIND
