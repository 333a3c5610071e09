"""Modality Performed Procedure Step: parsing what a scanner sends, the catalog's step rows,
and assembly's use of them (a real catalog on both backends, no sockets)."""

from __future__ import annotations

import warnings
from collections.abc import Callable, Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from pydicom.dataset import Dataset

from pacs_node.assembly import Assembly
from pacs_node.catalog.db import Catalog, open_catalog
from pacs_node.catalog.models import PerformedStepStatus
from pacs_node.catalog.mpps import ListedInstance, step_progress, steps_of
from pacs_node.catalog.studies import list_studies, record_instances
from pacs_node.config import NodeOptions, PeerConfig, Settings
from pacs_node.ingest.mpps import (
    MODALITY_PERFORMED_PROCEDURE_STEP,
    PerformedSteps,
    StepRefused,
    performed_series,
    scheduled_study_uid,
    step_status,
)
from pacs_node.refs import InstanceHeader, InstanceRef
from pacs_node.statuses import (
    DUPLICATE_SOP_INSTANCE,
    INVALID_ATTRIBUTE_VALUE,
    INVALID_OBJECT_INSTANCE,
    MISSING_ATTRIBUTE,
    NO_SUCH_SOP_INSTANCE,
    NOT_AUTHORISED,
    PROCESSING_FAILURE,
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
        peers=(PeerConfig(ae_title="CT1"), PeerConfig(ae_title="NOSTEPS", mpps=False)),
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


class _Scanner:
    """Calls the handler logic as the SCP's event handlers do."""

    def __init__(self, catalog: Catalog, settings: Settings, ae: str = "CT1") -> None:
        self.told: list[str] = []
        self.steps = PerformedSteps(settings, lambda: catalog, self.told.append)
        self.ae = ae

    def create(self, uid: object, ds: Dataset, sop_class: str = MPPS) -> int:
        return _status(self.steps.create(sop_class, uid, self.ae, lambda: ds))

    def set(self, uid: object, ds: Dataset) -> int:
        return _status(self.steps.update(MPPS, uid, self.ae, lambda: ds))


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
    ended = scanner.steps.update(MPPS, "1.9.1", "CT1", lambda: _completed({}))
    assert _status(ended) == PROCESSING_FAILURE
    assert isinstance(ended[0], Dataset)
    assert "COMPLETED" in ended[0].ErrorComment
    assert scanner.told == [STUDY, STUDY]

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
