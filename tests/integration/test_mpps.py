"""A scanner (pynetdicom) reports its Modality Performed Procedure Steps: the node routes the
study as soon as the step is COMPLETED and the instances it lists are in, without waiting for a
quiet period of 300 s; refusals carry the standard statuses."""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from datetime import datetime
from pathlib import Path
from typing import Any

import pydicom
import pytest
import yaml
from pydicom.dataset import Dataset
from pynetdicom import AE
from pynetdicom.sop_class import (  # type: ignore[attr-defined]
    CTImageStorage,
    ModalityPerformedProcedureStep,
)
from sqlalchemy import func, select

from pacs_node.catalog.db import Catalog, open_catalog
from pacs_node.catalog.models import (
    Instance,
    Job,
    JobEvent,
    PerformedStep,
    Series,
    Study,
    StudyEvent,
)
from tests.conftest import NodeProcess, wait_for
from tests.dicom_factory import new_uid, write_series

pytestmark = pytest.mark.integration

QUIET_S = 300.0  # never reached by the tests that expect MPPS to decide
ROUTES = {"rules": [{"name": "ct", "when": {"modality": "CT"}, "models": ["ct-classical"]}]}
PEERS = [
    {"ae_title": "SCANNER", "mpps": True},  # off by default: a trusted scanner only
    {"ae_title": "SCANNER2", "mpps": True},
    {"ae_title": "NOSTEPS", "mpps": False},
    {"ae_title": "PACSNODE_SCU"},
]
LATENCY_S = 1.0  # job queued at most this long after the last instance or N-SET


def _start(make_node: Callable[..., NodeProcess], **options: Any) -> NodeProcess:
    settings: dict[str, Any] = {"quiet_period_s": QUIET_S, "max_wait_s": 600, "job_workers": 0}
    settings.update(options)
    node = make_node(peers=PEERS, start=False, **settings)
    node.config_dir.mkdir(parents=True, exist_ok=True)
    (node.config_dir / "routes.yaml").write_text(yaml.safe_dump(ROUTES))
    return node.start()


@contextmanager
def _catalog(node: NodeProcess) -> Iterator[Catalog]:
    url = f"sqlite:///{(node.data_dir / 'catalog.sqlite').resolve()}"
    catalog = open_catalog(url, run_migrations=False, read_only=True)
    try:
        yield catalog
    finally:
        catalog.dispose()


class Scanner:
    """One association of a modality: MPPS and CT storage."""

    def __init__(self, node: NodeProcess, ae_title: str = "SCANNER") -> None:
        ae = AE(ae_title=ae_title)
        ae.add_requested_context(ModalityPerformedProcedureStep)
        ae.add_requested_context(CTImageStorage)
        self.assoc = ae.associate("127.0.0.1", node.port, ae_title=node.ae_title)
        assert self.assoc.is_established

    def close(self) -> None:
        self.assoc.release()

    def create(self, uid: str, study_uid: str, status: str = "IN PROGRESS") -> int:
        ds = Dataset()
        ds.PerformedProcedureStepStatus = status
        ds.Modality = "CT"
        ds.PerformedProcedureStepID = "1"
        scheduled = Dataset()
        scheduled.StudyInstanceUID = study_uid
        scheduled.AccessionNumber = "ACC0001"
        ds.ScheduledStepAttributesSequence = [scheduled]
        ds.PerformedSeriesSequence = []
        reply, _ = self.assoc.send_n_create(ds, ModalityPerformedProcedureStep, uid)
        return int(reply.Status)

    def set(self, uid: str, status: str, files: Sequence[Path] = (), **extra: object) -> Dataset:
        ds = Dataset()
        for keyword, value in extra.items():
            setattr(ds, keyword, value)
        ds.PerformedProcedureStepStatus = status
        ds.PerformedProcedureStepEndDate = "20260101"
        ds.PerformedProcedureStepEndTime = "121000"
        by_series: dict[str, list[str]] = {}
        for path in files:
            header = pydicom.dcmread(path, stop_before_pixels=True)
            by_series.setdefault(header.SeriesInstanceUID, []).append(header.SOPInstanceUID)
        performed = []
        for series_uid, sop_uids in by_series.items():
            item = Dataset()
            item.SeriesInstanceUID = series_uid
            item.ReferencedImageSequence = []
            for sop_uid in sop_uids:
                ref = Dataset()
                ref.ReferencedSOPClassUID = CTImageStorage
                ref.ReferencedSOPInstanceUID = sop_uid
                item.ReferencedImageSequence.append(ref)
            item.ReferencedNonImageCompositeSOPInstanceSequence = []
            performed.append(item)
        ds.PerformedSeriesSequence = performed
        reply, _ = self.assoc.send_n_set(ds, ModalityPerformedProcedureStep, uid)
        return reply

    def store(self, files: Sequence[Path]) -> float:
        """Send ``files``; the time the last one was acknowledged."""
        for path in files:
            assert int(self.assoc.send_c_store(path).Status) == 0
        return time.monotonic()


def _series(
    tmp_path: Path, name: str, study_uid: str, slices: int = 4, number: int = 1
) -> list[Path]:
    return write_series(
        tmp_path / name,
        slices=slices,
        rows=16,
        columns=16,
        study_uid=study_uid,
        series_number=number,
    )


def _job_queued_at(catalog: Catalog, study_uid: str) -> datetime | None:
    with catalog.sessions() as session:
        return session.scalar(
            select(func.min(JobEvent.at))
            .join(Job, Job.id == JobEvent.job_id)
            .join(Study, Study.id == Job.study_id)
            .where(Study.study_uid == study_uid)
        )


def _last_received_at(catalog: Catalog, study_uid: str) -> datetime:
    with catalog.sessions() as session:
        found = session.scalar(
            select(func.max(Instance.received_at))
            .join(Series, Series.id == Instance.series_id)
            .join(Study, Study.id == Series.study_id)
            .where(Study.study_uid == study_uid)
        )
    assert found is not None
    return found


def _instances(catalog: Catalog, study_uid: str) -> int:
    with catalog.sessions() as session:
        return int(
            session.scalar(
                select(func.count(Instance.id))
                .join(Series, Series.id == Instance.series_id)
                .join(Study, Study.id == Series.study_id)
                .where(Study.study_uid == study_uid)
            )
            or 0
        )


def _stable_reasons(catalog: Catalog, study_uid: str) -> list[str]:
    with catalog.sessions() as session:
        rows = session.scalars(
            select(StudyEvent.detail)
            .join(Study, Study.id == StudyEvent.study_id)
            .where(Study.study_uid == study_uid, StudyEvent.kind == "stable")
        ).all()
    return [str((row or {}).get("reason")) for row in rows]


def _jobs(catalog: Catalog, study_uid: str) -> int:
    with catalog.sessions() as session:
        return int(
            session.scalar(
                select(func.count(Job.id))
                .join(Study, Study.id == Job.study_id)
                .where(Study.study_uid == study_uid)
            )
            or 0
        )


def _routed_within(catalog: Catalog, study_uid: str, acked: float) -> float:
    """Wait for the job; return how long after the last instance or the last step's N-SET
    COMPLETED, whichever came last (catalog times), it was queued."""
    queued = wait_for(lambda: _job_queued_at(catalog, study_uid), 20, what="the job to be queued")
    waited = time.monotonic() - acked
    with catalog.sessions() as session:
        ended = session.scalar(
            select(func.max(PerformedStep.ended_at)).where(PerformedStep.study_uid == study_uid)
        )
    assert ended is not None
    done = max(_last_received_at(catalog, study_uid), ended)
    latency = (queued - done).total_seconds()
    assert latency < LATENCY_S, f"queued {latency:.2f} s after the scanner was done"
    assert waited < QUIET_S / 10
    assert _stable_reasons(catalog, study_uid) == ["performed procedure step completed"]
    assert _jobs(catalog, study_uid) == 1
    return latency


@pytest.mark.parametrize("dicom_workers", [2, 0], ids=["scp-workers", "one-process"])
def test_completed_after_the_images_routes_at_once(
    make_node: Callable[..., NodeProcess], tmp_path: Path, dicom_workers: int
) -> None:
    node = _start(make_node, dicom_workers=dicom_workers)
    study_uid = new_uid()
    files = _series(tmp_path, "ct", study_uid)
    mpps_uid = new_uid()
    scanner = Scanner(node)
    try:
        assert scanner.create(mpps_uid, study_uid) == 0x0000
        scanner.store(files)
        reply = scanner.set(mpps_uid, "COMPLETED", files)
        acked = time.monotonic()
    finally:
        scanner.close()
    assert int(reply.Status) == 0x0000
    with _catalog(node) as catalog:
        latency = _routed_within(catalog, study_uid, acked)
        with catalog.sessions() as session:
            step = session.scalars(select(PerformedStep)).one()
            assert (step.study_uid, step.status, step.calling_ae) == (
                study_uid,
                "COMPLETED",
                "SCANNER",
            )
            assert len(step.instances) == len(files)
    print(f"job queued {latency:.3f} s after the last instance ({dicom_workers} SCP workers)")


def test_completed_before_the_last_images_routes_when_they_arrive(
    make_node: Callable[..., NodeProcess], tmp_path: Path
) -> None:
    node = _start(make_node)
    study_uid = new_uid()
    files = _series(tmp_path, "ct", study_uid, slices=6)
    mpps_uid = new_uid()
    scanner = Scanner(node)
    try:
        assert scanner.create(mpps_uid, study_uid) == 0x0000
        scanner.store(files[:3])
        assert int(scanner.set(mpps_uid, "COMPLETED", files).Status) == 0x0000
        with _catalog(node) as catalog:
            wait_for(lambda: _instances(catalog, study_uid) == 3, 20, what="the first images")
            time.sleep(1.0)  # what the node does on its own in that time: nothing
            assert _jobs(catalog, study_uid) == 0
            acked = scanner.store(files[3:])
            latency = _routed_within(catalog, study_uid, acked)
    finally:
        scanner.close()
    print(f"job queued {latency:.3f} s after the last instance (N-SET came first)")


def test_two_steps_in_one_study_wait_for_both(
    make_node: Callable[..., NodeProcess], tmp_path: Path
) -> None:
    node = _start(make_node)
    study_uid = new_uid()
    first = _series(tmp_path, "a", study_uid, number=1)
    second = _series(tmp_path, "b", study_uid, number=2)
    one, two = new_uid(), new_uid()
    scanner = Scanner(node)
    try:
        assert scanner.create(one, study_uid) == 0x0000
        assert scanner.create(two, study_uid) == 0x0000
        scanner.store(first + second)
        assert int(scanner.set(one, "COMPLETED", first).Status) == 0x0000
        with _catalog(node) as catalog:
            wait_for(lambda: _instances(catalog, study_uid) == 8, 20, what="every image")
            time.sleep(1.0)  # the second step is still in progress
            assert _jobs(catalog, study_uid) == 0
            assert int(scanner.set(two, "COMPLETED", second).Status) == 0x0000
            acked = time.monotonic()
            _routed_within(catalog, study_uid, acked)
    finally:
        scanner.close()


def test_refusals_and_a_discontinued_step_falls_back_to_the_quiet_period(
    make_node: Callable[..., NodeProcess], tmp_path: Path
) -> None:
    node = _start(make_node, quiet_period_s=3.0)
    study_uid = new_uid()
    files = _series(tmp_path, "ct", study_uid, slices=2)
    done, stopped = new_uid(), new_uid()
    scanner = Scanner(node)
    try:
        assert scanner.create(done, study_uid, status="COMPLETED") == 0x0106
        assert scanner.create(done, study_uid) == 0x0000
        assert scanner.create(done, study_uid) == 0x0111  # Duplicate SOP Instance
        assert int(scanner.set(new_uid(), "COMPLETED").Status) == 0x0112  # No such instance
        assert scanner.create(stopped, study_uid) == 0x0000
        acked = scanner.store(files)
        moved = scanner.set(done, "COMPLETED", files, PatientID="OTHER", Modality="MR")
        assert int(moved.Status) == 0x0106  # Not allowed in an N-SET: refused, not dropped
        assert sorted(moved.AttributeIdentifierList) == [0x00080060, 0x00100020]
        other = Scanner(node, ae_title="SCANNER2")  # may send steps, but not set this one's
        try:
            assert int(other.set(done, "COMPLETED", files).Status) == 0x0124
        finally:
            other.close()
        assert int(scanner.set(done, "DISCONTINUED").Status) == 0x0000
        again = scanner.set(done, "COMPLETED", files)
        assert int(again.Status) == 0x0110
        assert int(again.ErrorID) == 0xA710
        assert "DISCONTINUED" in str(again.ErrorComment)
        assert int(scanner.set(stopped, "DISCONTINUED").Status) == 0x0000
    finally:
        scanner.close()
    refused = Scanner(node, ae_title="NOSTEPS")  # admitted for storage, not for MPPS
    try:
        assert refused.create(new_uid(), study_uid) == 0x0124
    finally:
        refused.close()
    with _catalog(node) as catalog:
        with catalog.sessions() as session:
            statuses = sorted(s.status for s in session.scalars(select(PerformedStep)))
        assert statuses == ["DISCONTINUED", "DISCONTINUED"]
        queued = wait_for(lambda: _job_queued_at(catalog, study_uid), 30, what="the quiet period")
        assert time.monotonic() - acked >= 2.5  # not before the quiet period
        assert (queued - _last_received_at(catalog, study_uid)).total_seconds() >= 2.9
        assert _stable_reasons(catalog, study_uid) == ["quiet period"]
