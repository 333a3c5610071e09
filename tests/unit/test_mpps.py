"""Modality Performed Procedure Step: parsing what a scanner sends, the catalog's step rows,
and assembly's use of them (a real catalog on both backends, no sockets)."""

from __future__ import annotations

import threading
import time
import warnings
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from datetime import UTC, datetime, timedelta
from pathlib import Path
from types import SimpleNamespace

import pytest
from pydicom.dataset import Dataset
from pydicom.multival import MultiValue
from pydicom.tag import Tag
from sqlalchemy import event, func, select
from sqlalchemy.exc import OperationalError

from pacs_node.assembly import STEP_CHECK_DELAY_S, Assembly
from pacs_node.catalog.db import Catalog, open_catalog
from pacs_node.catalog.models import PerformedInstance, PerformedStep, PerformedStepStatus
from pacs_node.catalog.mpps import ListedInstance, step_progress, steps_of
from pacs_node.catalog.studies import list_studies, receiving_studies, record_instances
from pacs_node.config import NodeOptions, PeerConfig, Settings
from pacs_node.housekeeping import Housekeeping
from pacs_node.ingest.mpps import (
    MAX_MESSAGE_BYTES,
    MAX_PERFORMED_SERIES,
    MODALITY_PERFORMED_PROCEDURE_STEP,
    PerformedSteps,
    StepRefused,
    performed_series,
    scheduled_study_uid,
    step_status,
)
from pacs_node.ingest.workers import STEP_STATEMENT_TIMEOUT_S, _steps_catalog
from pacs_node.refs import InstanceHeader, InstanceRef
from pacs_node.statuses import (
    DUPLICATE_SOP_INSTANCE,
    INVALID_ATTRIBUTE_VALUE,
    INVALID_OBJECT_INSTANCE,
    MISSING_ATTRIBUTE,
    MISSING_ATTRIBUTE_VALUE,
    NO_SUCH_SOP_INSTANCE,
    NOT_AUTHORISED,
    PERFORMED_STEP_ENDED,
    PROCESSING_FAILURE,
    RESOURCE_LIMITATION,
    SUCCESS,
)
from tests.conftest import wait_for

STUDY = "1.2.3"
T0 = datetime(2026, 1, 1, 12, 0, tzinfo=UTC)
MPPS = MODALITY_PERFORMED_PROCEDURE_STEP


def _item(**values: object) -> Dataset:
    ds = Dataset()
    for keyword, value in values.items():
        setattr(ds, keyword, value)
    return ds


def _series(series_uid: str, images: list[str], others: tuple[str, ...] = ()) -> Dataset:
    return _item(
        SeriesInstanceUID=series_uid,
        ReferencedImageSequence=[_item(ReferencedSOPInstanceUID=u) for u in images],
        ReferencedNonImageCompositeSOPInstanceSequence=[
            _item(ReferencedSOPInstanceUID=u) for u in others
        ],
    )


def _create(study_uid: str = STUDY, status: str = "IN PROGRESS") -> Dataset:
    return _item(
        PerformedProcedureStepStatus=status,
        ScheduledStepAttributesSequence=[_item(StudyInstanceUID=study_uid)],
        PerformedSeriesSequence=[],
    )


def _completed(listed: dict[str, list[str]], status: str = "COMPLETED") -> Dataset:
    return _item(
        PerformedProcedureStepStatus=status,
        PerformedSeriesSequence=[_series(s, images) for s, images in listed.items()],
    )


# -- the pure parts -------------------------------------------------------------------------


def test_performed_series_lists_images_and_non_image_instances() -> None:
    ds = _item(
        PerformedSeriesSequence=[
            _series("1.2.3.1", ["1.2.3.1.1", "1.2.3.1.2"]),
            _series("1.2.3.2", [], others=("1.2.3.2.9",)),
        ]
    )
    assert performed_series(ds) == [
        ListedInstance("1.2.3.1", "1.2.3.1.1"),
        ListedInstance("1.2.3.1", "1.2.3.1.2"),
        ListedInstance("1.2.3.2", "1.2.3.2.9"),
    ]
    assert performed_series(_item(PerformedSeriesSequence=[])) == []
    assert performed_series(_item(PerformedProcedureStepStatus="COMPLETED")) is None


@pytest.mark.parametrize(
    ("series", "status"),
    [
        (lambda: _series("1.2.3.1", ["../../etc/passwd"]), INVALID_ATTRIBUTE_VALUE),
        (lambda: _series("1.2.3.1", ["1." * 40 + "1"]), INVALID_ATTRIBUTE_VALUE),  # > 64 chars
        (
            lambda: _item(ReferencedImageSequence=[_item(ReferencedSOPInstanceUID="1.2")]),
            MISSING_ATTRIBUTE,
        ),
        (
            lambda: _item(SeriesInstanceUID="1.2", ReferencedImageSequence=[_item()]),
            MISSING_ATTRIBUTE,
        ),
    ],
)
def test_performed_series_refuses_hostile_uids(series: Callable[[], Dataset], status: int) -> None:
    with warnings.catch_warnings():  # pydicom warns of the bad values as the test sets them
        warnings.simplefilter("ignore", UserWarning)
        series = series()  # type: ignore[assignment]
    with pytest.raises(StepRefused) as refused:
        performed_series(_item(PerformedSeriesSequence=[series]))
    assert refused.value.status == status


def test_status_and_study_uid() -> None:
    assert step_status(_item(PerformedProcedureStepStatus="COMPLETED")) is (
        PerformedStepStatus.COMPLETED
    )
    assert step_status(_item()) is None
    with pytest.raises(StepRefused) as refused:
        step_status(_item(PerformedProcedureStepStatus="DONE"))
    assert refused.value.status == INVALID_ATTRIBUTE_VALUE
    assert scheduled_study_uid(_create("1.2.840.99")) == "1.2.840.99"
    for bad in (_item(), _item(ScheduledStepAttributesSequence=[_item()])):
        with pytest.raises(StepRefused):
            scheduled_study_uid(bad)
    two = _item(
        ScheduledStepAttributesSequence=[
            _item(StudyInstanceUID="1.2"),
            _item(StudyInstanceUID="1.3"),
        ]
    )
    with pytest.raises(StepRefused):
        scheduled_study_uid(two)


# -- the catalog and assembly ---------------------------------------------------------------


@pytest.fixture(params=["sqlite", "postgresql"])
def catalog(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Catalog]:
    if request.param == "sqlite":
        url = f"sqlite:///{tmp_path / 'catalog.sqlite'}"
    else:
        url = request.getfixturevalue("postgres_url")
    cat = open_catalog(url)
    yield cat
    cat.dispose()


def _settings(**node: object) -> Settings:
    return Settings(
        node=NodeOptions(quiet_period_s=300, max_wait_s=600, **node),  # type: ignore[arg-type]
        peers=(
            PeerConfig(ae_title="CT1", mpps=True),
            PeerConfig(ae_title="CT2", mpps=True),
            PeerConfig(ae_title="NOSTEPS", mpps=False),
        ),
    )


def _ref(n: int, at: datetime, series: str = "1") -> InstanceRef:
    header = InstanceHeader(
        study_uid=STUDY,
        series_uid=f"{STUDY}.{series}",
        sop_instance_uid=f"{STUDY}.{series}.{n}",
        sop_class_uid="1.2.840.10008.5.1.4.1.1.2",
        modality="CT",
    )
    return InstanceRef(
        header=header,
        transfer_syntax_uid="1.2.840.10008.1.2.1",
        path=f"{STUDY}/{STUDY}.{series}/{STUDY}.{series}.{n}.dcm",
        size_bytes=100,
        received_at=at,
        calling_ae="CT1",
    )


def _record(catalog: Catalog, *refs: InstanceRef) -> None:
    with catalog.sessions.begin() as session:
        record_instances(session, refs)


def _state(catalog: Catalog) -> str:
    with catalog.sessions() as session:
        (study,) = list_studies(session)
    return study.state


def _status(reply: tuple[int | Dataset, None]) -> int:
    status = reply[0]
    return status if isinstance(status, int) else int(status.Status)


def _tags(reply: Dataset) -> list[int]:
    """The Attribute Identifier List (one tag or several)."""
    value = reply.AttributeIdentifierList
    return [int(t) for t in value] if isinstance(value, MultiValue) else [int(value)]


class _Scanner:
    """Calls the handler logic as the SCP's event handlers do."""

    def __init__(self, catalog: Catalog, settings: Settings, ae: str = "CT1") -> None:
        self.told: list[str] = []
        self.alerts: list[tuple[str, str, str]] = []
        self.steps = PerformedSteps(
            settings,
            lambda: catalog,
            self.told.append,
            alert=lambda *alert: self.alerts.append(alert),
        )
        self.ae = ae

    def create(self, uid: object, ds: Dataset, sop_class: str = MPPS) -> int:
        return _status(self.steps.create(sop_class, uid, self.ae, lambda: ds))

    def set(self, uid: object, ds: Dataset) -> int:
        return _status(self.steps.update(MPPS, uid, self.ae, lambda: ds))

    def set_reply(self, uid: object, ds: Dataset) -> Dataset:
        status = self.steps.update(MPPS, uid, self.ae, lambda: ds)[0]
        assert isinstance(status, Dataset)
        return status


def test_statuses_of_create_and_set(catalog: Catalog) -> None:
    scanner = _Scanner(catalog, _settings())
    assert scanner.create("1.9.1", _create(status="COMPLETED")) == INVALID_ATTRIBUTE_VALUE
    assert scanner.create("1.9.1", _item(ScheduledStepAttributesSequence=[])) == MISSING_ATTRIBUTE
    assert scanner.create("1.9.1/..", _create()) == INVALID_OBJECT_INSTANCE
    assert scanner.create(None, _create()) == INVALID_OBJECT_INSTANCE
    assert scanner.told == []
    assert scanner.create("1.9.1", _create()) == SUCCESS
    assert scanner.create("1.9.1", _create()) == DUPLICATE_SOP_INSTANCE
    assert scanner.set("1.9.404", _completed({})) == NO_SUCH_SOP_INSTANCE
    assert scanner.set("1.9.1", _completed({f"{STUDY}.1": [f"{STUDY}.1.1"]})) == SUCCESS
    ended = scanner.set_reply("1.9.1", _completed({}))
    assert ended.Status == PROCESSING_FAILURE
    assert "COMPLETED" in ended.ErrorComment
    assert ended.ErrorID == PERFORMED_STEP_ENDED  # PS3.4 F.7.2.2: 0xA710
    assert scanner.told == [STUDY]  # the N-SET that ended the step

    def unreadable() -> Dataset:
        raise ValueError("truncated element")

    assert _status(scanner.steps.update(MPPS, "1.9.1", "CT1", unreadable)) == PROCESSING_FAILURE
    refused = _Scanner(catalog, _settings(), ae="NOSTEPS")
    assert refused.create("1.9.2", _create()) == NOT_AUTHORISED
    off = _Scanner(catalog, _settings(mpps=False), ae="STRANGER")
    assert off.create("1.9.3", _create()) == NOT_AUTHORISED
    with catalog.sessions() as session:
        (step,) = steps_of(session, STUDY)
    assert (step.sop_instance_uid, step.status, step.calling_ae) == ("1.9.1", "COMPLETED", "CT1")
    assert step.ended_at is not None


@pytest.mark.parametrize("catalog", ["sqlite"], indirect=True)
def test_completed_step_makes_the_study_stable_once_its_instances_are_in(
    catalog: Catalog,
) -> None:
    settings = _settings()
    assembly = Assembly(catalog, settings)
    scanner = _Scanner(catalog, settings)
    start = datetime.now(UTC) - timedelta(seconds=120)  # steps end by the real clock
    _record(catalog, _ref(1, start))
    assert scanner.create("1.9.1", _create()) == SUCCESS
    listed = {f"{STUDY}.1": [f"{STUDY}.1.1", f"{STUDY}.1.2"]}
    assert scanner.set("1.9.1", _completed(listed)) == SUCCESS
    now = datetime.now(UTC) + timedelta(seconds=1)
    assert not assembly.check(STUDY, 300, now=now)  # 1.2.3.1.2 not here yet
    with catalog.sessions() as session:
        progress = step_progress(session, STUDY)
    assert progress is not None
    assert (progress.completed, progress.missing, progress.ready) == (1, 1, False)
    _record(catalog, _ref(2, start + timedelta(seconds=1)))
    assert assembly.check(STUDY, 300, now=now)
    assert _state(catalog) == "stable"
    # A late instance reopens it: the step is spent, the quiet period decides this time.
    late = now + timedelta(seconds=60)
    _record(catalog, _ref(3, late))
    assert not assembly.check(STUDY, 300, now=late + timedelta(seconds=1))
    assert _state(catalog) == "receiving"
    assert assembly.check(STUDY, 300, now=late + timedelta(seconds=300))


@pytest.mark.parametrize("catalog", ["sqlite"], indirect=True)
def test_two_steps_discontinued_and_unlisted(catalog: Catalog) -> None:
    settings = _settings()
    assembly = Assembly(catalog, settings)
    scanner = _Scanner(catalog, settings)
    now = T0 + timedelta(seconds=5)
    _record(catalog, _ref(1, T0), _ref(1, T0, series="2"))
    assert scanner.create("1.9.1", _create()) == SUCCESS
    assert scanner.create("1.9.2", _create()) == SUCCESS
    assert scanner.set("1.9.1", _completed({f"{STUDY}.1": [f"{STUDY}.1.1"]})) == SUCCESS
    assert not assembly.check(STUDY, 300, now=now)  # 1.9.2 is in progress
    assert scanner.set("1.9.2", _completed({}, status="DISCONTINUED")) == SUCCESS
    assert assembly.check(STUDY, 300, now=now)  # nothing in progress, one completed, all here


@pytest.mark.parametrize("catalog", ["sqlite"], indirect=True)
def test_discontinued_or_unlisted_steps_leave_it_to_the_quiet_period(catalog: Catalog) -> None:
    settings = _settings()
    assembly = Assembly(catalog, settings)
    scanner = _Scanner(catalog, settings)
    _record(catalog, _ref(1, T0))
    assert scanner.create("1.9.1", _create()) == SUCCESS
    assert scanner.set("1.9.1", _completed({}, status="DISCONTINUED")) == SUCCESS
    assert not assembly.check(STUDY, 300, now=T0 + timedelta(seconds=5))
    assert scanner.create("1.9.2", _create()) == SUCCESS
    assert scanner.set("1.9.2", _item(PerformedProcedureStepStatus="COMPLETED")) == SUCCESS
    assert not assembly.check(STUDY, 300, now=T0 + timedelta(seconds=5))  # lists nothing
    assert assembly.check(STUDY, 300, now=T0 + timedelta(seconds=300))


def test_a_step_another_node_recorded_is_taken_up_by_the_sweep(catalog: Catalog) -> None:
    """The timer owner learns of a step another node recorded at its sweep (and at start)."""
    settings = _settings()
    assembly = Assembly(catalog, settings)
    seen: list[str] = []
    assembly.add_listener(seen.append)
    _record(catalog, _ref(1, datetime.now(UTC)))
    assembly.start()
    try:
        assert assembly._scheduler.get_job(STUDY) is not None  # the quiet period's timer
        other_node = _Scanner(catalog, settings)  # tells nobody in this process
        other_node.steps.notify = None
        assert other_node.create("1.9.1", _create()) == SUCCESS
        assert other_node.set("1.9.1", _completed({f"{STUDY}.1": [f"{STUDY}.1.1"]})) == SUCCESS
        assembly.sweep()
        wait_for(lambda: seen, 10, what="the swept study to become stable")
    finally:
        assembly.stop()
    assert seen == [STUDY]
    assert _state(catalog) == "stable"


# -- refusals a hostile or broken scanner gets ------------------------------------------------


def test_only_the_ae_that_created_a_step_may_set_it(catalog: Catalog) -> None:
    settings = _settings()
    owner, other = _Scanner(catalog, settings), _Scanner(catalog, settings, ae="CT2")
    assert owner.create("1.9.1", _create()) == SUCCESS
    reply = other.set_reply("1.9.1", _completed({f"{STUDY}.1": [f"{STUDY}.1.1"]}))
    assert reply.Status == NOT_AUTHORISED
    assert other.told == []
    assert other.alerts
    kind, ae, detail = other.alerts[0]
    assert (kind, ae) == ("mpps-foreign-step", "CT2")
    assert "1.9.1" in detail
    with catalog.sessions() as session:
        (step,) = steps_of(session, STUDY)
    assert (step.status, step.listed) == ("IN PROGRESS", 0)
    assert owner.set("1.9.1", _completed({})) == SUCCESS
    # An ended step is not told to a stranger either (0x0124, not 0x0110).
    assert other.set("1.9.1", _completed({})) == NOT_AUTHORISED


@pytest.mark.parametrize(
    ("keyword", "value"),
    [
        ("ScheduledStepAttributesSequence", [_item(StudyInstanceUID="1.2.9")]),
        ("PatientID", "OTHER"),
        ("PatientName", "Doe^Jane"),
        ("StudyInstanceUID", "1.2.9"),
        ("Modality", "MR"),
        ("PerformedProcedureStepID", "PPS9"),
        ("PerformedProcedureStepStartDate", "20260101"),
        ("PerformedProcedureStepStartTime", "120000"),
        ("PerformedStationAETitle", "CT9"),
    ],
)
@pytest.mark.parametrize("catalog", ["sqlite"], indirect=True)
def test_an_n_set_of_an_attribute_it_may_not_change_is_refused(
    catalog: Catalog, keyword: str, value: object
) -> None:
    scanner = _Scanner(catalog, _settings())
    assert scanner.create("1.9.1", _create()) == SUCCESS
    modifications = _completed({f"{STUDY}.1": [f"{STUDY}.1.1"]})
    setattr(modifications, keyword, value)
    reply = scanner.set_reply("1.9.1", modifications)
    assert reply.Status == INVALID_ATTRIBUTE_VALUE
    assert _tags(reply) == [Tag(keyword)]
    with catalog.sessions() as session:
        (step,) = steps_of(session, STUDY)
    assert step.status == "IN PROGRESS"  # nothing of it applied
    assert scanner.set("1.9.1", _completed({})) == SUCCESS  # allowed attributes only: taken


@pytest.mark.parametrize("catalog", ["sqlite"], indirect=True)
def test_present_but_empty_values_and_unknown_statuses(catalog: Catalog) -> None:
    scanner = _Scanner(catalog, _settings())
    assert scanner.create("1.9.1", _create(status="")) == MISSING_ATTRIBUTE_VALUE
    assert scanner.create("1.9.1", _create(study_uid="")) == MISSING_ATTRIBUTE_VALUE
    no_items = _create()
    no_items.ScheduledStepAttributesSequence = []
    assert scanner.create("1.9.1", no_items) == MISSING_ATTRIBUTE_VALUE
    no_status = _create()
    del no_status.PerformedProcedureStepStatus
    assert scanner.create("1.9.1", no_status) == MISSING_ATTRIBUTE
    assert scanner.create("1.9.1", _create()) == SUCCESS
    assert scanner.set("1.9.1", _item(PerformedProcedureStepStatus="")) == MISSING_ATTRIBUTE_VALUE


@pytest.mark.parametrize("catalog", ["sqlite"], indirect=True)
def test_open_steps_per_ae_are_capped(catalog: Catalog) -> None:
    settings = _settings(mpps_max_open_steps=2)
    scanner, other = _Scanner(catalog, settings), _Scanner(catalog, settings, ae="CT2")
    assert scanner.create("1.9.1", _create()) == SUCCESS
    assert scanner.create("1.9.2", _create()) == SUCCESS
    assert scanner.create("1.9.3", _create()) == RESOURCE_LIMITATION
    assert other.create("1.9.4", _create()) == SUCCESS  # another AE's steps count apart
    assert scanner.set("1.9.1", _completed({}, status="DISCONTINUED")) == SUCCESS
    assert scanner.create("1.9.3", _create()) == SUCCESS


@pytest.mark.parametrize("catalog", ["sqlite"], indirect=True)
def test_oversized_messages_are_refused_before_they_are_decoded(catalog: Catalog) -> None:
    scanner = _Scanner(catalog, _settings())

    def never() -> Dataset:
        raise AssertionError("decoded")

    big = MAX_MESSAGE_BYTES + 1
    assert _status(scanner.steps.create(MPPS, "1.9.1", "CT1", never, size=big)) == (
        RESOURCE_LIMITATION
    )
    assert scanner.create("1.9.1", _create()) == SUCCESS
    assert _status(scanner.steps.update(MPPS, "1.9.1", "CT1", never, size=big)) == (
        RESOURCE_LIMITATION
    )
    many = _item(
        PerformedSeriesSequence=[
            _item(SeriesInstanceUID="1.2") for _ in range(MAX_PERFORMED_SERIES + 1)
        ]
    )
    reply = scanner.set_reply("1.9.1", many)
    assert reply.Status == INVALID_ATTRIBUTE_VALUE
    assert _tags(reply) == [Tag("PerformedSeriesSequence")]


def test_a_catalog_error_asks_the_scanner_to_retry() -> None:
    """0x0213 (a modality sends again), not 0x0110 (final to most)."""

    def broken() -> object:
        raise OperationalError("select 1", {}, Exception("database is locked"))

    unavailable = SimpleNamespace(sessions=SimpleNamespace(begin=broken))
    steps = PerformedSteps(_settings(), lambda: unavailable)  # type: ignore[arg-type,return-value]
    assert _status(steps.create(MPPS, "1.9.1", "CT1", _create)) == RESOURCE_LIMITATION
    assert _status(steps.update(MPPS, "1.9.1", "CT1", lambda: _completed({}))) == (
        RESOURCE_LIMITATION
    )


def test_the_catalog_is_opened_once_by_concurrent_associations(catalog: Catalog) -> None:
    opened: list[int] = []
    barrier = threading.Barrier(8)

    def slow_open() -> Catalog:
        opened.append(1)
        time.sleep(0.05)
        return catalog

    steps = PerformedSteps(_settings(), slow_open)

    def use() -> Catalog:
        barrier.wait()
        return steps.catalog()

    with ThreadPoolExecutor(8) as pool:
        handles = list(pool.map(lambda _: use(), range(8)))
    assert len(opened) == 1
    assert all(h is catalog for h in handles)


@pytest.mark.parametrize("backend", ["sqlite", "postgresql"])
def test_the_worker_catalog_for_steps_is_small_and_bounded_in_time(
    backend: str, tmp_path: Path, request: pytest.FixtureRequest
) -> None:
    if backend == "sqlite":
        url = f"sqlite:///{tmp_path / 'catalog.sqlite'}"
        timeout_sql, expected = "PRAGMA busy_timeout", STEP_STATEMENT_TIMEOUT_S * 1000
    else:
        url = request.getfixturevalue("postgres_url")
        timeout_sql, expected = "SHOW statement_timeout", f"{STEP_STATEMENT_TIMEOUT_S:g}s"
    open_catalog(url).dispose()
    settings = Settings(node=NodeOptions(database_url=url, data_dir=tmp_path))
    steps = _steps_catalog(settings)
    try:
        assert steps.engine.pool.size() == 1  # type: ignore[attr-defined]
        with steps.engine.connect() as connection:
            assert connection.exec_driver_sql(timeout_sql).scalar() == expected
    finally:
        steps.dispose()


# -- steps listed at creation, the fast path and its cost ------------------------------------


@pytest.mark.parametrize("catalog", ["sqlite"], indirect=True)
def test_instances_listed_at_creation_count_until_an_n_set_replaces_them(catalog: Catalog) -> None:
    settings = _settings()
    assembly = Assembly(catalog, settings)
    scanner = _Scanner(catalog, settings)
    _record(catalog, _ref(1, T0))
    created = _create()
    created.PerformedSeriesSequence = [_series(f"{STUDY}.1", [f"{STUDY}.1.1", f"{STUDY}.1.2"])]
    assert scanner.create("1.9.1", created) == SUCCESS
    # A later list replaces it: it names only what is in.
    assert scanner.set("1.9.1", _completed({f"{STUDY}.1": [f"{STUDY}.1.1"]})) == SUCCESS
    assert assembly.check(STUDY, 300, now=T0 + timedelta(seconds=5))
    # One without a list of its own keeps the N-CREATE's: 1.2.3.1.2 is awaited.
    assert scanner.create("1.9.2", created) == SUCCESS
    assert scanner.set("1.9.2", _item(PerformedProcedureStepStatus="COMPLETED")) == SUCCESS
    with catalog.sessions() as session:
        progress = step_progress(session, STUDY)
        steps = steps_of(session, STUDY)
    assert [s.listed for s in steps] == [1, 2]
    assert progress is not None
    assert not progress.unlisted
    assert progress.missing == 1


@pytest.mark.parametrize("catalog", ["sqlite"], indirect=True)
def test_step_progress_counts_before_it_joins(catalog: Catalog) -> None:
    settings = _settings()
    scanner = _Scanner(catalog, settings)
    _record(catalog, _ref(1, T0))
    assert scanner.create("1.9.1", _create()) == SUCCESS
    listed = {f"{STUDY}.1": [f"{STUDY}.1.{n}" for n in range(1, 4)]}
    assert scanner.set("1.9.1", _completed(listed)) == SUCCESS
    statements: list[str] = []

    def seen(_conn: object, _cursor: object, statement: str, *_args: object) -> None:
        statements.append(statement)

    event.listen(catalog.engine, "before_cursor_execute", seen)
    try:
        with catalog.sessions() as session:
            progress = step_progress(session, STUDY)
        assert progress is not None
        assert progress.missing == 2
        assert not [s for s in statements if "performed_instances" in s]  # 1 of 3: no join
        _record(catalog, _ref(2, T0), _ref(9, T0))  # 3 received, one of them not listed
        statements.clear()
        with catalog.sessions() as session:
            progress = step_progress(session, STUDY)
        assert progress is not None
        assert progress.missing == 1
        assert [s for s in statements if "performed_instances" in s]  # counts tie: joined
    finally:
        event.remove(catalog.engine, "before_cursor_execute", seen)


@pytest.mark.parametrize("catalog", ["sqlite"], indirect=True)
def test_a_batch_of_a_stepped_study_costs_no_query_and_checks_are_coalesced(
    catalog: Catalog,
) -> None:
    settings = _settings()
    assembly = Assembly(catalog, settings)
    _record(catalog, _ref(1, datetime.now(UTC)))
    with catalog.sessions() as session:
        (touch,) = receiving_studies(session)
    statements: list[str] = []

    def seen(_conn: object, _cursor: object, statement: str, *_args: object) -> None:
        statements.append(statement)

    assembly._scheduler.start(paused=True)  # jobs kept as when running, none run
    event.listen(catalog.engine, "before_cursor_execute", seen)
    try:
        assembly.on_touched([touch])
        job = assembly._scheduler.get_job(STUDY)
        assert job is not None
        assert job.trigger.run_date > datetime.now(UTC) + timedelta(seconds=200)
        assembly._stepped[STUDY] = time.monotonic()  # as on_step or the sweep would
        assembly.on_touched([touch])
        soon = assembly._scheduler.get_job(STUDY).trigger.run_date
        assert soon <= datetime.now(UTC) + timedelta(seconds=STEP_CHECK_DELAY_S)
        assembly.on_touched([touch])  # a check already due soon is kept, not pushed back
        assert assembly._scheduler.get_job(STUDY).trigger.run_date == soon
        assert statements == []  # no query on the recorder's thread
    finally:
        assembly.stop()
        event.remove(catalog.engine, "before_cursor_execute", seen)


def test_an_ended_step_is_checked_even_while_the_timer_runs(catalog: Catalog) -> None:
    """No pending timer (it is running right then, or was never armed here): the N-SET still
    gets its check."""
    settings = _settings()
    assembly = Assembly(catalog, settings)
    seen: list[str] = []
    assembly.add_listener(seen.append)
    scanner = _Scanner(catalog, settings)
    scanner.steps.notify = assembly.on_step
    _record(catalog, _ref(1, datetime.now(UTC)))
    assembly.start()
    try:
        assembly._scheduler.remove_job(STUDY)  # as while it runs
        assert scanner.create("1.9.1", _create()) == SUCCESS
        assert scanner.set("1.9.1", _completed({f"{STUDY}.1": [f"{STUDY}.1.1"]})) == SUCCESS
        wait_for(lambda: seen, 10, what="the study to become stable")
    finally:
        assembly.stop()
    assert _state(catalog) == "stable"
    assert STUDY not in assembly._stepped  # spent: the hint goes with it


# -- housekeeping --------------------------------------------------------------------------


@pytest.mark.parametrize("catalog", ["sqlite"], indirect=True)
def test_housekeeping_removes_steps_nothing_will_use(catalog: Catalog, tmp_path: Path) -> None:
    settings = Settings(
        node=NodeOptions(data_dir=tmp_path, max_wait_s=600, mpps_retention_days=1),
        peers=(PeerConfig(ae_title="CT1", mpps=True),),
    )
    scanner = _Scanner(catalog, settings)
    _record(catalog, _ref(1, T0))
    assert scanner.create("1.9.1", _create()) == SUCCESS  # its study is here, never ended
    assert scanner.create("1.9.2", _create(study_uid="1.2.404")) == SUCCESS  # never came
    assert scanner.set("1.9.2", _completed({"1.2.404.1": ["1.2.404.1.1"]})) == SUCCESS
    assert scanner.create("1.9.3", _create()) == SUCCESS
    assert scanner.set("1.9.3", _completed({f"{STUDY}.1": [f"{STUDY}.1.1"]})) == SUCCESS
    now = datetime.now(UTC)

    def remaining(at: datetime) -> list[str]:
        keeper = Housekeeping(catalog, settings, clock=lambda: at)
        keeper.run_once()
        with catalog.sessions() as session:
            uids = session.scalars(select(PerformedStep.sop_instance_uid)).all()
            listed = session.scalar(select(func.count(PerformedInstance.id)))
        return [*sorted(uids), f"listed={listed}"]

    assert remaining(now) == ["1.9.1", "1.9.2", "1.9.3", "listed=2"]
    assert remaining(now + timedelta(days=1, seconds=1)) == ["1.9.1", "1.9.3", "listed=1"]
    assert remaining(now + timedelta(days=1, seconds=601)) == ["1.9.3", "listed=1"]
