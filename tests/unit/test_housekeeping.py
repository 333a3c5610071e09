"""Retention: which studies may go (every delivery confirmed, commitment where offered), the
order of removal (rows first, files after), a crash between the two, and the disk watermark."""

from __future__ import annotations

import hashlib
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from pydicom import dcmread
from sqlalchemy import func, select, text, update
from sqlalchemy.orm import Session

from pacs_node import housekeeping
from pacs_node.audit.message import validate
from pacs_node.catalog import nodes
from pacs_node.catalog.audit import list_events
from pacs_node.catalog.db import Catalog, open_catalog
from pacs_node.catalog.deliveries import create_deliveries
from pacs_node.catalog.jobs import queue_job
from pacs_node.catalog.models import (
    Commitment,
    Delivery,
    DeliveryState,
    Instance,
    Job,
    JobState,
    NodeLease,
    NodeRegistration,
    Purge,
    Study,
    StudyState,
    utcnow,
)
from pacs_node.catalog.results import StoredEncoding, add_result_rows, write_files
from pacs_node.catalog.studies import LOCK_NAMESPACE, RECORD_LOCK, lock_for_write
from pacs_node.config import NodeOptions, Settings
from pacs_node.dispatch.commitment import CommitmentAnswer, Reference
from pacs_node.housekeeping import Housekeeping, eligible_studies, finish_purges, purge_study
from pacs_node.ingest.reconcile import reconcile
from pacs_node.ingest.recorder import CatalogRecorder
from pacs_node.ingest.spool import Spool, file_digest
from pacs_node.timer_lease import TimerLease
from tests.catalog_factory import ingest
from tests.conftest import wait_for
from tests.dicom_factory import write_series

SEG = "1.2.840.10008.5.1.4.1.1.66.4"
COMMITTED, FAILED = Commitment.COMMITTED, Commitment.FAILED
EXPLICIT_LE = "1.2.840.10008.1.2.1"


def result_uid(study_uid: str) -> str:
    """The SOP Instance UID of the study's one result: short enough for the column."""
    return "2.25." + str(int(hashlib.sha256(study_uid.encode()).hexdigest()[:24], 16))


@dataclass
class Node:
    catalog: Catalog
    data: Path

    @property
    def spool(self) -> Path:
        return self.data / "spool"

    @property
    def results(self) -> Path:
        return self.data / "results"

    def settings(self, **options: float) -> Settings:
        return Settings(node=NodeOptions(data_dir=self.data, fsync=False, **options))

    def study(
        self, tmp: Path, name: str, commitment: str | None, state: DeliveryState, age_days: float
    ) -> str:
        """A processed study: stable, one job done, one result file, one delivery."""
        paths = write_series(tmp / name, slices=3, rows=16, columns=16)
        study_id, study_uid, series = ingest(self.catalog, self.spool, paths)
        last = utcnow() - timedelta(days=age_days)
        item = StoredEncoding("seg", SEG, result_uid(study_uid), None, EXPLICIT_LE, b"seg")
        with self.catalog.sessions.begin() as session:
            session.execute(
                update(Study)
                .where(Study.id == study_id)
                .values(state=StudyState.STABLE, last_received_at=last, stable_at=last)
            )
            job_id = queue_job(session, study_id, "m", series, {"seg": ["PACS"]})
            session.execute(update(Job).where(Job.id == job_id).values(state=JobState.DONE))
            relpaths = write_files(self.results, f"{job_id}/1", [item], fsync=False)
            results = add_result_rows(session, job_id, [item], relpaths)
            create_deliveries(session, job_id, results, {"seg": ["PACS"]})
            session.execute(
                update(Delivery)
                .where(Delivery.job_id == job_id)
                .values(state=state, commitment=commitment)
            )
        return study_uid

    def study_uids(self) -> set[str]:
        with self.catalog.sessions() as session:
            return set(session.scalars(select(Study.study_uid)))

    def spool_files(self, study_uid: str) -> list[Path]:
        return list((self.spool / study_uid).rglob("*.dcm"))


@pytest.fixture
def node(tmp_path: Path) -> Iterator[Node]:
    data = tmp_path / "var"
    catalog = open_catalog(f"sqlite:///{data / 'catalog.sqlite'}")
    Spool(data / "spool")
    try:
        yield Node(catalog, data)
    finally:
        catalog.dispose()


@pytest.mark.parametrize(
    ("commitment", "state", "eligible"),
    [
        (None, DeliveryState.DELIVERED, True),  # STOW-RS, FHIR, or commitment switched off
        ("unsupported", DeliveryState.DELIVERED, True),  # the C-STORE success confirms
        ("committed", DeliveryState.DELIVERED, True),
        ("requested", DeliveryState.DELIVERED, False),  # stored, not yet committed
        (None, DeliveryState.PENDING, False),
        (None, DeliveryState.HELD, False),  # results wait in the node
        (None, DeliveryState.DEAD, False),
    ],
)
def test_only_confirmed_deliveries_make_a_study_eligible(
    node: Node, tmp_path: Path, commitment: str | None, state: DeliveryState, eligible: bool
) -> None:
    study_uid = node.study(tmp_path, "s", commitment, state, age_days=30)
    with node.catalog.sessions() as session:
        found = [s.study_uid for s in eligible_studies(session)]
    assert found == ([study_uid] if eligible else [])


def test_unprocessed_and_failed_studies_are_kept(node: Node, tmp_path: Path) -> None:
    paths = write_series(tmp_path / "unrouted", slices=2, rows=16, columns=16)
    ingest(node.catalog, node.spool, paths)  # no job, no delivery
    failed = node.study(tmp_path, "f", None, DeliveryState.DELIVERED, age_days=30)
    with node.catalog.sessions.begin() as session:
        study_id = session.scalar(select(Study.id).where(Study.study_uid == failed))
        assert study_id is not None
        queue_job(session, study_id, "other", [], {})
        session.execute(update(Job).where(Job.state == JobState.QUEUED).values(state="failed"))
    report = Housekeeping(node.catalog, node.settings(retention_days=1)).run_once()
    assert report.purged == []
    assert len(node.study_uids()) == 2


def test_retention_days_removes_rows_then_files(node: Node, tmp_path: Path) -> None:
    old = node.study(tmp_path, "old", "committed", DeliveryState.DELIVERED, age_days=10)
    new = node.study(tmp_path, "new", "committed", DeliveryState.DELIVERED, age_days=1)
    report = Housekeeping(node.catalog, node.settings(retention_days=7)).run_once()
    assert report.purged == [old]
    assert node.study_uids() == {new}
    assert node.spool_files(old) == []
    assert not (node.spool / old).exists()
    assert len(node.spool_files(new)) == 3
    with node.catalog.sessions() as session:
        (purge,) = session.scalars(select(Purge))
        assert (purge.study_uid, purge.reason, purge.instances) == (old, "retention_days", 3)
        assert purge.files_removed_at is not None
        jobs = purge.paths["results"]
        assert session.scalar(select(func.count(Delivery.id))) == 1  # the new study's
        # the purge is audited (110105, D) and the audit trail itself is never purged
        (deleted,) = [e for e in list_events(session).rows if e.event_id == "110105"]
    assert not (node.results / jobs[0]).exists()
    assert (deleted.action, deleted.actor, deleted.description) == (
        "D",
        "node:housekeeping",
        "retention_days",
    )
    assert f"study:{old}" in deleted.participants
    validate(deleted.message.encode())
    Housekeeping(node.catalog, node.settings(retention_days=0.000001)).run_once()
    with node.catalog.sessions() as session:
        assert len([e for e in list_events(session).rows if e.event_id == "110105"]) == 2


def test_a_crash_between_rows_and_files_neither_dangles_nor_resurrects(
    node: Node, tmp_path: Path
) -> None:
    study_uid = node.study(tmp_path, "s", None, DeliveryState.DELIVERED, age_days=30)
    with node.catalog.sessions.begin() as session:
        study = session.scalars(select(Study)).one()
        assert purge_study(session, study, "retention_days", utcnow()) is not None
    # the process dies here: rows gone, files still on disk; no row names a missing file
    assert len(node.spool_files(study_uid)) == 3
    with node.catalog.sessions() as session:
        assert all((node.spool / p).exists() for p in session.scalars(select(Instance.path)))
    # restart, in the node's order: unfinished removals first, then reconciliation
    spool = Spool(node.spool)
    assert finish_purges(node.catalog, node.spool, node.results) == 1
    assert reconcile(spool, CatalogRecorder(node.catalog, spool)) == 0
    assert node.study_uids() == set()
    assert node.spool_files(study_uid) == []
    assert finish_purges(node.catalog, node.spool, node.results) == 0


def test_a_file_received_again_before_removal_is_kept(node: Node, tmp_path: Path) -> None:
    study_uid = node.study(tmp_path, "s", None, DeliveryState.DELIVERED, age_days=30)
    with node.catalog.sessions.begin() as session:
        study = session.scalars(select(Study)).one()
        purge_study(session, study, "retention_days", utcnow())
    spool = Spool(node.spool)
    reconcile(spool, CatalogRecorder(node.catalog, spool))  # the study arrives again first
    finish_purges(node.catalog, node.spool, node.results)
    assert len(node.spool_files(study_uid)) == 3  # rows name them again: kept
    with node.catalog.sessions() as session:
        assert all((node.spool / p).exists() for p in session.scalars(select(Instance.path)))


def test_disk_watermark_removes_oldest_first_until_below(node: Node, tmp_path: Path) -> None:
    ages = {"a": 3.0, "b": 2.0, "c": 1.0}
    uids = {
        k: node.study(tmp_path, k, None, DeliveryState.DELIVERED, age_days=v)
        for k, v in ages.items()
    }
    usage = iter([95.0, 91.0, 80.0])  # one reading per candidate
    housekeeping = Housekeeping(
        node.catalog,
        node.settings(retention_disk_percent=90),
        disk_usage=lambda _path: next(usage),
    )
    assert housekeeping.run_once().purged == [uids["a"], uids["b"]]
    assert node.study_uids() == {uids["c"]}


def test_requested_commitment_is_asked_again_then_the_study_may_go(
    node: Node, tmp_path: Path
) -> None:
    study_uid = node.study(tmp_path, "s", "requested", DeliveryState.DELIVERED, age_days=30)
    asked: list[tuple[str, list[Reference]]] = []

    def recommit(name: str, refs: list[Reference]) -> CommitmentAnswer:
        asked.append((name, refs))
        return CommitmentAnswer("2.25.1", {ref.sop_instance_uid: COMMITTED for ref in refs})

    report = Housekeeping(
        node.catalog, node.settings(retention_days=1), recommit=recommit
    ).run_once()
    assert [name for name, _ in asked] == ["PACS"]
    assert asked[0][1][0].sop_class_uid == SEG
    assert report.recommitted == 1
    assert report.purged == [study_uid]


def test_a_failed_commitment_sends_the_result_again(node: Node, tmp_path: Path) -> None:
    node.study(tmp_path, "s", "requested", DeliveryState.DELIVERED, age_days=30)
    report = Housekeeping(
        node.catalog,
        node.settings(retention_days=1),
        recommit=lambda _n, refs: CommitmentAnswer(
            "2.25.2", {r.sop_instance_uid: FAILED for r in refs}
        ),
    ).run_once()
    assert report.purged == []
    with node.catalog.sessions() as session:
        delivery = session.scalars(select(Delivery)).one()
        assert (delivery.state, delivery.commitment) == (DeliveryState.PENDING, "failed")
        assert isinstance(delivery.next_attempt_at, datetime)


@pytest.mark.parametrize("report_first", [True, False])
def test_a_report_on_its_own_association_settles_in_either_order(
    node: Node, tmp_path: Path, report_first: bool
) -> None:
    """The PACS's own-association report may come before the node has marked its deliveries
    with the Transaction UID (it still waits on the results association) or after."""
    from pacs_node.catalog.deliveries import Outgoing, mark_delivered, record_commitment_report
    from pacs_node.refs import CommitmentReport

    study_uid = node.study(tmp_path, "s", None, DeliveryState.SENDING, age_days=30)
    report = CommitmentReport("PACS", "2.25.77", (result_uid(study_uid),), ())
    with node.catalog.sessions.begin() as session:
        delivery = session.scalars(select(Delivery)).one()
        item = Outgoing(
            delivery_id=delivery.id,
            job_id=delivery.job_id,
            destination="PACS",
            kind="seg",
            sop_class_uid=SEG,
            sop_instance_uid=result_uid(study_uid),
            encodings={},
            patient_search=None,
            attempts=1,
        )
    steps = [
        lambda s: record_commitment_report(s, report, utcnow()),
        lambda s: mark_delivered(s, item, EXPLICIT_LE, "requested", "2.25.77"),
    ]
    for step in steps if report_first else reversed(steps):
        with node.catalog.sessions.begin() as session:
            step(session)
    with node.catalog.sessions() as session:
        delivery = session.scalars(select(Delivery)).one()
        assert (delivery.state, delivery.commitment) == (DeliveryState.DELIVERED, "committed")
        assert delivery.committed_at is not None
    swept = Housekeeping(node.catalog, node.settings(retention_days=1)).run_once()
    assert swept.purged == [study_uid]  # confirmed: retention may remove it


def test_only_the_timer_lease_owner_purges_and_a_lost_lease_stops_a_purge(
    node: Node, tmp_path: Path
) -> None:
    old = node.study(tmp_path, "old", "committed", DeliveryState.DELIVERED, age_days=10)
    owner = TimerLease(node.catalog, "node-a", ttl_s=30)
    other = TimerLease(node.catalog, "node-b", ttl_s=30)
    assert owner.renew()
    assert not other.renew()
    settings = node.settings(retention_days=7)
    assert Housekeeping(node.catalog, settings, lease=other).run_once().purged == []
    mine = Housekeeping(node.catalog, settings, lease=owner)
    with node.catalog.sessions.begin() as session:  # another node took it over meanwhile
        session.execute(update(NodeLease).values(owner=other.owner))
    assert mine.run_once().purged == []  # its pass began as owner; the purge checks again
    assert node.study_uids() == {old}
    with node.catalog.sessions.begin() as session:
        session.execute(update(NodeLease).values(owner=owner.owner))
    assert mine.run_once().purged == [old]


@pytest.fixture
def pg_node(postgres_url: str, tmp_path: Path) -> Iterator[Node]:
    data = tmp_path / "pg"
    catalog = open_catalog(postgres_url)
    Spool(data / "spool")
    try:
        yield Node(catalog, data)
    finally:
        catalog.dispose()


def _waiting_on_record_lock(catalog: Catalog) -> bool:
    """Whether a session of this database waits for the recorder's advisory lock."""
    with catalog.engine.connect() as connection:
        waiting = connection.execute(
            text(
                "SELECT count(*) FROM pg_stat_activity WHERE datname = current_database()"
                " AND wait_event_type = 'Lock' AND wait_event = 'advisory'"
            )
        ).scalar()
    return bool(waiting)


def test_an_instance_recorded_while_its_study_is_purged_is_never_removed_with_it(
    pg_node: Node, postgres_url: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The purge's re-check and its delete exclude the recorder: an instance whose row is
    written at the moment the purge has checked the study must not be cascaded away. The
    hook records it right after the re-check, from another connection, and lets the purge go
    on only once that recording waits for the lock or is done (no timing)."""
    study_uid = pg_node.study(tmp_path, "s", None, DeliveryState.DELIVERED, age_days=30)
    late = write_series(tmp_path / "late", slices=1, rows=16, columns=16, study_uid=study_uid)
    late_sop = str(dcmread(late[0], stop_before_pixels=True).SOPInstanceUID)
    other = open_catalog(postgres_url, run_migrations=False)
    recording = threading.Thread(target=ingest, args=(other, pg_node.spool, late))
    original = housekeeping.eligible_studies
    calls = 0

    def hooked(session: Session) -> list[Study]:
        nonlocal calls
        calls += 1
        found = original(session)
        if calls == 2:  # the re-check in the purge's own transaction
            recording.start()
            wait_for(
                lambda: not recording.is_alive() or _waiting_on_record_lock(pg_node.catalog),
                20,
                what="the late instance to be recorded or to wait for the purge",
            )
        return found

    monkeypatch.setattr(housekeeping, "eligible_studies", hooked)
    try:
        report = Housekeeping(pg_node.catalog, pg_node.settings(retention_days=7)).run_once()
        recording.join(20)
    finally:
        other.dispose()
    assert not recording.is_alive()
    assert report.purged == [study_uid]
    with pg_node.catalog.sessions() as session:
        path = session.scalar(select(Instance.path).where(Instance.sop_instance_uid == late_sop))
        assert path is not None  # recorded after the purge: the start of a new study
        assert session.scalar(select(func.count(Study.id))) == 1
    assert (pg_node.spool / path).exists()


def test_a_file_replaced_by_a_resend_before_the_purge_is_kept_with_its_bytes(
    node: Node, tmp_path: Path
) -> None:
    """``resend_policy: replace`` swaps new bytes in under a name the purge lists, and answers
    success before the row is recorded: those bytes must outlive the purge of the old study."""
    study_uid = node.study(tmp_path, "s", None, DeliveryState.DELIVERED, age_days=30)
    with node.catalog.sessions.begin() as session:  # as the receive path records them
        for row in session.scalars(select(Instance)):
            row.sha256 = file_digest(node.spool / row.path)
    replaced = sorted(node.spool_files(study_uid))[0]
    ds = dcmread(replaced)
    ds.SeriesDescription = "corrected"
    ds.save_as(replaced)
    report = Housekeeping(node.catalog, node.settings(retention_days=7)).run_once()
    assert report.purged == [study_uid]
    assert node.spool_files(study_uid) == [replaced]  # the others went with the study
    assert dcmread(replaced).SeriesDescription == "corrected"
    spool = Spool(node.spool)
    assert reconcile(spool, CatalogRecorder(node.catalog, spool)) == 1  # recorded, not lost
    with node.catalog.sessions() as session:
        assert list(session.scalars(select(Instance.path))) == [
            str(replaced.relative_to(node.spool))
        ]


def test_the_lease_owner_prunes_registrations_stale_for_a_week(node: Node) -> None:
    owner = TimerLease(node.catalog, "node-a", ttl_s=30)
    assert owner.register() is None
    assert owner.renew()
    for node_id, days in (("node-old", 8), ("node-recent", 6)):
        with node.catalog.sessions.begin() as session:
            identity = owner.identity
            assert nodes.register(session, node_id, f"{node_id}/1/x", "h", identity, 30) is None
            session.execute(
                update(NodeRegistration)
                .where(NodeRegistration.node_id == node_id)
                .values(heartbeat_at=datetime.now(UTC) - timedelta(days=days))
            )
    other = TimerLease(node.catalog, "node-b", ttl_s=30)
    assert Housekeeping(node.catalog, node.settings(), lease=other).run_once().nodes_pruned == 0
    report = Housekeeping(node.catalog, node.settings(), lease=owner).run_once()
    assert report.nodes_pruned == 1
    assert {n.node_id for n in owner.nodes()} == {"node-a", "node-recent"}
    owner.stop()


def test_the_record_lock_is_an_advisory_lock_of_the_applications_namespace(
    pg_node: Node,
) -> None:
    """Two-integer form (namespace, key): another application's single-key advisory lock on a
    shared database never contends with it."""
    with pg_node.catalog.sessions.begin() as session:
        lock_for_write(session)
        held = session.execute(
            text(
                "SELECT classid::bigint, objid::bigint, objsubid FROM pg_locks"
                " WHERE locktype = 'advisory' AND pid = pg_backend_pid()"
            )
        ).all()
    assert [tuple(row) for row in held] == [(LOCK_NAMESPACE, RECORD_LOCK, 2)]
