"""The identity policy as a table, the spool's digests and quarantine area, and the catalog
recorder: conflicts inside one batch, and a poison instance found by bisecting."""

from __future__ import annotations

import json
import sqlite3
import threading
from dataclasses import replace
from datetime import datetime
from pathlib import Path

import pytest
from pydicom import dcmread
from sqlalchemy import event, select, text
from sqlalchemy.exc import IntegrityError, OperationalError

from pacs_node.catalog.db import Catalog, open_catalog
from pacs_node.catalog.models import (
    Instance,
    QuarantineItem,
    QuarantineState,
    StudyEvent,
    utcnow,
)
from pacs_node.catalog.quarantine import lookup_one, patient_key
from pacs_node.catalog.studies import counters, list_studies, record_instances
from pacs_node.ingest.header import read_header
from pacs_node.ingest.identity import (
    Action,
    Decision,
    Held,
    IdentityGate,
    Reason,
    Verdict,
    act,
    decide,
)
from pacs_node.ingest.part10 import file_meta
from pacs_node.ingest.quarantine import (
    QuarantineError,
    coerced_uid,
    discard,
    reassign,
    release,
)
from pacs_node.ingest.recorder import OUTAGE_FILE, CatalogRecorder, is_transient
from pacs_node.ingest.spool import DataSetDigest, Spool, StoredFile
from pacs_node.ingest.statuses import SUCCESS
from pacs_node.refs import CommitmentReport, InstanceRef
from tests.conftest import wait_for
from tests.dicom_factory import write_series

S1, S2, X, Y, SOP = "1.2.1", "1.2.2", "1.2.1.1", "1.2.2.1", "1.2.1.1.1"
P1, P2 = patient_key("P1", "HOSP"), patient_key("P2", "HOSP")


@pytest.mark.parametrize(
    ("study", "series", "key", "sha", "held", "expected"),
    [
        (S1, X, P1, "a", Held(), Decision(Verdict.NEW)),
        (S1, X, P1, "a", Held(study_patient_key=P1, series_study_uid=S1), Decision(Verdict.NEW)),
        # (a) the series is held under another study
        (
            S2,
            X,
            P2,
            "a",
            Held(series_study_uid=S1),
            Decision(Verdict.CONFLICT, Reason.SERIES_ELSEWHERE, S1),
        ),
        # (b) the study is held under another patient key (ID or issuer)
        (
            S1,
            X,
            P2,
            "a",
            Held(study_patient_key=P1),
            Decision(Verdict.CONFLICT, Reason.PATIENT_MISMATCH, S1),
        ),
        (
            S1,
            X,
            patient_key("P1", "OTHER"),
            "a",
            Held(study_patient_key=P1),
            Decision(Verdict.CONFLICT, Reason.PATIENT_MISMATCH, S1),
        ),
        # (c) the SOP Instance UID is held under another study or series
        (
            S2,
            Y,
            P2,
            "a",
            Held(sop_study_uid=S1, sop_series_uid=X),
            Decision(Verdict.CONFLICT, Reason.SOP_ELSEWHERE, S1),
        ),
        (
            S1,
            Y,
            P1,
            "a",
            Held(study_patient_key=P1, sop_study_uid=S1, sop_series_uid=X),
            Decision(Verdict.CONFLICT, Reason.SOP_ELSEWHERE, S1),
        ),
        # the same place: the digest tells a duplicate from a re-send
        (
            S1,
            X,
            P1,
            "a",
            Held(P1, S1, S1, X, "a"),
            Decision(Verdict.DUPLICATE),
        ),
        (S1, X, P1, "b", Held(P1, S1, S1, X, "a"), Decision(Verdict.RESEND, Reason.RESEND, S1)),
        (S1, X, P1, None, Held(P1, S1, S1, X, "a"), Decision(Verdict.DUPLICATE)),
        # identity goes first: another patient's re-send is a conflict, not a replacement
        (
            S1,
            X,
            P2,
            "b",
            Held(P1, S1, S1, X, "a"),
            Decision(Verdict.CONFLICT, Reason.PATIENT_MISMATCH, S1),
        ),
    ],
)
def test_decide(
    study: str, series: str, key: str, sha: str | None, held: Held, expected: Decision
) -> None:
    assert decide(study, series, key, sha, held) == expected


@pytest.mark.parametrize(
    ("verdict", "identity", "resend", "expected"),
    [
        (Verdict.NEW, "reject", "reject", Action.ACCEPT),
        (Verdict.DUPLICATE, "reject", "reject", Action.DUPLICATE),
        (Verdict.CONFLICT, "reject", "keep_first", Action.REJECT),
        (Verdict.CONFLICT, "quarantine", "keep_first", Action.QUARANTINE),
        (Verdict.RESEND, "reject", "keep_first", Action.QUARANTINE),
        (Verdict.RESEND, "reject", "replace", Action.REPLACE),
        (Verdict.RESEND, "quarantine", "reject", Action.REJECT),
    ],
)
def test_act(verdict: Verdict, identity: str, resend: str, expected: Action) -> None:
    assert act(Decision(verdict), identity, resend) == expected


def test_patient_key_normalises_padding_not_case() -> None:
    assert patient_key(" P1 ", "HOSP\0") == patient_key("P1", "HOSP")
    assert patient_key("p1", "HOSP") != patient_key("P1", "HOSP")
    assert patient_key(None, None) == patient_key("", "")
    assert patient_key("P1", None) != patient_key("P1", "HOSP")


def test_digest_skips_our_part10_header() -> None:
    body = b"\x08\x00\x18\x00UI\x04\x001.2\x00" * 50
    digests = set()
    for ae in ("CT1", "ANOTHER_AE"):
        raw = file_meta("1.2.3", "1.2.3.4", "1.2.840.10008.1.2.1", ae) + body
        for size in (1, 7, 150, len(raw)):
            digest = DataSetDigest()
            for start in range(0, len(raw), size):
                digest.update(raw[start : start + size])
            digests.add(digest.hexdigest())
    assert len(digests) == 1
    short = DataSetDigest()
    short.update(b"abc")
    assert short.hexdigest() == "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"


def test_spool_keeps_other_bytes_apart_and_identical_ones_once(tmp_path: Path) -> None:
    spool = Spool(tmp_path)
    meta = file_meta("1.2.3", "1.2.3.4.5", "1.2.840.10008.1.2.1", "CT1")
    first = spool.store("1.2.3", "1.2.3.4", "1.2.3.4.5", [meta, b"first"])
    again = spool.store(
        "1.2.3",
        "1.2.3.4",
        "1.2.3.4.5",
        [file_meta("1.2.3", "1.2.3.4.5", "1.2.840.10008.1.2.1", "X"), b"first"],
    )
    assert not first.duplicate
    assert again.identical
    assert again.sha256 == first.sha256
    other = spool.store("1.2.3", "1.2.3.4", "1.2.3.4.5", [meta, b"other"])
    assert other.duplicate
    assert not other.identical
    assert other.held_new
    assert other.held == f".quarantine/1.2.3.4.5/{other.sha256}.dcm"
    assert (tmp_path / first.relpath).read_bytes() == meta + b"first"
    assert (tmp_path / other.held).read_bytes() == meta + b"other"
    assert list(spool.walk()) == [first.relpath]
    spool.swap_in(other.held, first.relpath)
    assert (tmp_path / first.relpath).read_bytes() == meta + b"other"


def _refs(spool: Spool, files: list[Path], **changes: object) -> list[InstanceRef]:
    refs = []
    for path in files:
        ds = dcmread(path)
        for keyword, value in changes.items():
            setattr(ds, keyword, value)
        header = read_header(ds)
        if changes:
            ds.save_as(path, enforce_file_format=True)
        stored = spool.store(
            header.study_uid, header.series_uid, header.sop_instance_uid, [path.read_bytes()]
        )
        refs.append(
            InstanceRef(
                header=header,
                transfer_syntax_uid="1.2.840.10008.1.2.1",
                path=stored.relpath,
                size_bytes=stored.size_bytes,
                received_at=utcnow(),
                calling_ae="CT1",
                sha256=stored.sha256,
            )
        )
    return refs


@pytest.fixture
def catalog(tmp_path: Path) -> Catalog:
    return open_catalog(f"sqlite:///{tmp_path / 'catalog.sqlite'}")


def test_a_series_of_another_study_in_the_same_batch_is_quarantined(
    tmp_path: Path, catalog: Catalog
) -> None:
    spool = Spool(tmp_path / "spool")
    files = write_series(tmp_path / "s1", slices=3)
    refs = _refs(spool, files)
    # the same Series UID, under another study and another patient, in the same batch
    intruder = _refs(
        spool,
        write_series(tmp_path / "s2", slices=1),
        SeriesInstanceUID=refs[0].series_uid,
        PatientID="OTHER",
    )
    recorder = CatalogRecorder(catalog, spool)
    recorder.start()
    for ref in [*refs[:2], *intruder, refs[2]]:
        recorder.submit(ref)
    assert recorder.wait_idle(30)
    recorder.stop()
    with catalog.sessions() as session:
        (study,) = list_studies(session)
        items = list(session.scalars(select(QuarantineItem)))
        events = [e.kind for e in session.scalars(select(StudyEvent))]
        assert counters(session)["quarantined_series_in_other_study"] == 1
    assert study.study_uid == refs[0].study_uid
    assert study.instances == 3
    assert study.quarantined == 1
    (item,) = items
    assert item.reason == Reason.SERIES_ELSEWHERE
    assert item.collided_study_uid == study.study_uid
    assert item.path.startswith(".quarantine/")
    assert (spool.root / item.path).exists()
    assert not (spool.root / intruder[0].path).exists()  # never in a study's folder
    assert "quarantined" in events


def test_a_poison_instance_is_found_by_bisecting_and_quarantined(
    tmp_path: Path, catalog: Catalog
) -> None:
    spool = Spool(tmp_path / "spool")
    refs = _refs(spool, write_series(tmp_path / "s", slices=8))
    # SQLite cannot hold this Instance Number: a failure of the data, not of the database
    poison = replace(refs[5], header=replace(refs[5].header, instance_number=2**70))
    # a naive timestamp cannot even be quarantined: counted, the file stays for reconcile
    hopeless = replace(refs[2], received_at=datetime(2026, 1, 1))
    recorder = CatalogRecorder(catalog, spool, linger_s=0.5)
    recorder.start()
    for ref in [*refs[:2], hopeless, *refs[3:5], poison, *refs[6:]]:
        recorder.submit(ref)
    assert recorder.wait_idle(30)
    recorder.stop()
    with catalog.sessions() as session:
        recorded = set(session.scalars(select(Instance.sop_instance_uid)))
        (item,) = session.scalars(select(QuarantineItem))
    assert recorded == {r.sop_instance_uid for r in refs} - {
        poison.sop_instance_uid,
        hopeless.sop_instance_uid,
    }
    assert item.reason == Reason.UNRECORDABLE
    assert item.sop_instance_uid == poison.sop_instance_uid
    assert (spool.root / item.path).exists()
    assert not (spool.root / poison.path).exists()
    assert (spool.root / hopeless.path).exists()
    assert recorder.unrecorded == 1
    assert json.loads((spool.root / OUTAGE_FILE).read_text())["unrecorded"] == 1


def test_only_database_failures_are_transient() -> None:
    assert is_transient(OperationalError("INSERT", {}, Exception("database is locked")))
    assert not is_transient(IntegrityError("INSERT", {}, Exception("UNIQUE constraint failed")))
    assert not is_transient(ValueError("naive datetimes are not stored"))


def test_a_catalog_outage_is_retried_shown_and_counted(tmp_path: Path, catalog: Catalog) -> None:
    spool = Spool(tmp_path / "spool")
    refs = _refs(spool, write_series(tmp_path / "s", slices=2))
    down = threading.Event()
    down.set()

    def locked(*_args: object) -> None:
        if down.is_set():
            raise sqlite3.OperationalError("database is locked")

    event.listen(catalog.engine, "before_cursor_execute", locked)
    recorder = CatalogRecorder(catalog, spool)
    recorder.start()
    for ref in refs:
        recorder.submit(ref)
    flag = spool.root / OUTAGE_FILE
    wait_for(flag.exists, 10, what="the outage flag")
    shown = json.loads(flag.read_text())
    assert shown["catalog_available"] is False
    assert shown["last_error"] == "OperationalError"
    assert not recorder.wait_idle(0.3)  # nothing is dropped while the catalog is down
    down.clear()
    assert recorder.wait_idle(30)
    recorder.stop()
    assert not flag.exists()
    with catalog.sessions() as session:
        assert len(list(session.scalars(select(Instance)))) == 2
        assert counters(session)["catalog_outages"] == 1


def _quarantined_intruder(
    tmp_path: Path, catalog: Catalog, spool: Spool
) -> tuple[list[InstanceRef], InstanceRef, int]:
    """S1 with three instances, and another patient's instance under S1's Study UID."""
    refs = _refs(spool, write_series(tmp_path / "s1", slices=3))
    (intruder,) = _refs(
        spool,
        write_series(tmp_path / "s2", slices=1),
        StudyInstanceUID=refs[0].study_uid,
        PatientID="OTHER-1",
    )
    recorder = CatalogRecorder(catalog, spool)
    recorder.record(refs)
    assert recorder.record([intruder]).quarantined == 1
    with catalog.sessions() as session:
        (item,) = session.scalars(select(QuarantineItem))
    assert item.reason == Reason.PATIENT_MISMATCH
    return refs, intruder, item.id


def test_release_files_another_patient_into_a_study_of_its_own(
    tmp_path: Path, catalog: Catalog
) -> None:
    spool = Spool(tmp_path / "spool")
    refs, intruder, item_id = _quarantined_intruder(tmp_path, catalog, spool)
    with catalog.sessions.begin() as session:
        filed = release(session, spool, item_id, "dr.who")
    assert filed.coerced
    assert filed.study_uid == coerced_uid(refs[0].study_uid, patient_key("OTHER-1", None))
    with catalog.sessions() as session:
        studies = {s.study_uid: s for s in list_studies(session)}
        item = session.get(QuarantineItem, item_id)
        assert item is not None
        assert item.state == QuarantineState.RELEASED
        assert item.resolved_by == "dr.who"
        assert item.study_uid == refs[0].study_uid  # the original UIDs stay on the row
        assert (spool.root / item.path).exists()  # and the original bytes in quarantine
        kinds = {e.kind for e in session.scalars(select(StudyEvent))}
    assert studies[refs[0].study_uid].instances == 3
    assert studies[refs[0].study_uid].quarantined == 0
    released = studies[filed.study_uid]
    assert released.instances == 1
    assert released.patient_id == "OTHER-1"
    assert released.series[0].series_uid != refs[0].series_uid
    copy = dcmread(spool.path(f"{filed.study_uid}/{filed.series_uid}/{filed.sop_instance_uid}.dcm"))
    assert copy.StudyInstanceUID == filed.study_uid
    assert copy.PixelData == dcmread(spool.path(item.path)).PixelData
    assert {"quarantined", "quarantine_released"} <= kinds
    with catalog.sessions.begin() as session, pytest.raises(QuarantineError, match="released"):
        release(session, spool, item_id, "dr.who")
    assert intruder.study_uid == refs[0].study_uid


def test_reassign_files_the_instance_into_the_named_study(tmp_path: Path, catalog: Catalog) -> None:
    spool = Spool(tmp_path / "spool")
    refs, _intruder, item_id = _quarantined_intruder(tmp_path, catalog, spool)
    with catalog.sessions.begin() as session:
        filed = reassign(session, spool, item_id, refs[0].study_uid, "dr.who")
    with catalog.sessions() as session:
        (study,) = list_studies(session)
        item = session.get(QuarantineItem, item_id)
        assert item is not None
        assert item.state == QuarantineState.REASSIGNED
        events = session.scalars(select(StudyEvent))
        details = [json.dumps(e.detail) if e.detail else "" for e in events]
    assert study.instances == 4
    copy = dcmread(spool.path(f"{filed.study_uid}/{filed.series_uid}/{filed.sop_instance_uid}.dcm"))
    assert copy.PatientID == refs[0].header.patient_id  # the study's patient, by decision
    assert any('"actor": "dr.who"' in d for d in details)
    with (
        catalog.sessions.begin() as session,
        pytest.raises(QuarantineError, match="no quarantined instance"),
    ):
        reassign(session, spool, item_id + 1, "1.2.3", "dr.who")


class _Sink:
    """What the gate hands on, kept for the test to look at."""

    def __init__(self) -> None:
        self.submitted: list[InstanceRef] = []

    def submit(self, ref: InstanceRef) -> None:
        self.submitted.append(ref)

    def count(self, name: str, by: int = 1) -> None:
        pass

    def duplicate(self, study_uid: str) -> None:
        pass

    def commitment_report(self, report: CommitmentReport) -> None:
        pass


def _resend(spool: Spool, ref: InstanceRef, tmp_path: Path, **changes: object) -> StoredFile:
    """Other bytes under ``ref``'s UIDs, as a C-STORE would spool them."""
    ds = dcmread(spool.path(ref.path))
    for keyword, value in changes.items():
        setattr(ds, keyword, value)
    path = tmp_path / "resend.dcm"
    ds.save_as(path, enforce_file_format=True)
    return spool.store(ref.study_uid, ref.series_uid, ref.sop_instance_uid, [path.read_bytes()])


def test_replace_never_overwrites_a_copy_the_screen_did_not_see_committed(
    tmp_path: Path,
) -> None:
    spool = Spool(tmp_path / "spool")
    (first,) = _refs(spool, write_series(tmp_path / "s", slices=1))
    original = spool.path(first.path).read_bytes()
    other = _resend(spool, first, tmp_path, PatientID="OTHER", ImageComments="b")
    assert other.held is not None
    sink = _Sink()
    gate = IdentityGate(spool, sink, None, resend_policy="replace")
    # the first copy is acknowledged but its row is still queued: the screen saw nothing
    assert gate.admit(Decision(Verdict.NEW), other, first) == SUCCESS
    assert spool.path(first.path).read_bytes() == original
    (kept,) = sink.submitted
    assert kept.path == other.held
    assert kept.quarantine_reason == Reason.RESEND
    assert not kept.replaces


def test_a_conflicting_replacement_never_removes_the_name_a_row_points_at(
    tmp_path: Path, catalog: Catalog
) -> None:
    spool = Spool(tmp_path / "spool")
    (first,) = _refs(spool, write_series(tmp_path / "s", slices=1))
    # batch [A, B-replaces]: B carries another patient under A's UIDs
    intruder = replace(
        first,
        header=replace(first.header, patient_id="OTHER"),
        replaces=True,
        sha256="b" * 64,
    )
    outcome = CatalogRecorder(catalog, spool).record([first, intruder])
    assert outcome.recorded == 1
    assert outcome.quarantined == 1
    assert outcome.release_paths == []
    assert spool.path(first.path).exists()
    with catalog.sessions() as session:
        (row,) = session.scalars(select(Instance))
        (item,) = session.scalars(select(QuarantineItem))
    assert row.path == first.path
    assert item.reason == Reason.PATIENT_MISMATCH
    assert spool.path(item.path).exists()


def test_an_unrecordable_replacement_leaves_the_rows_file_in_place(
    tmp_path: Path, catalog: Catalog
) -> None:
    spool = Spool(tmp_path / "spool")
    (first,) = _refs(spool, write_series(tmp_path / "s", slices=1))
    recorder = CatalogRecorder(catalog, spool)
    recorder.record([first])
    # SQLite cannot hold this size: the replacement's update fails for the data's sake
    poison = replace(first, replaces=True, sha256="b" * 64, size_bytes=2**70)
    assert recorder.record_each([poison]) == 0
    assert spool.path(first.path).exists()
    with catalog.sessions() as session:
        (item,) = session.scalars(select(QuarantineItem))
    assert item.reason == Reason.UNRECORDABLE
    assert spool.path(item.path).exists()


def test_a_fresh_colliding_file_stays_under_its_name_until_the_recorder_holds_it(
    tmp_path: Path, catalog: Catalog
) -> None:
    spool = Spool(tmp_path / "spool")
    refs, _intruder, _item = _quarantined_intruder(tmp_path, catalog, spool)
    (late,) = _refs(
        spool,
        write_series(tmp_path / "s3", slices=1),
        StudyInstanceUID=refs[0].study_uid,
        PatientID="OTHER-2",
    )
    sink = _Sink()
    gate = IdentityGate(spool, sink, catalog, identity_conflict="quarantine")
    stored = StoredFile(late.path, late.size_bytes, duplicate=False, sha256=late.sha256 or "")
    screening = gate.screen(late.header)
    assert screening.verdict == Verdict.CONFLICT
    assert gate.admit(screening, stored, late) == SUCCESS
    # acknowledged: the bytes are where reconciliation looks until the row commits
    assert sink.submitted == [late]
    assert spool.path(late.path).exists()
    assert CatalogRecorder(catalog, spool).record(sink.submitted).quarantined == 1
    assert not spool.path(late.path).exists()


def test_a_discard_whose_commit_fails_keeps_the_bytes_and_a_copy_kept_again_is_held_again(
    tmp_path: Path, catalog: Catalog
) -> None:
    spool = Spool(tmp_path / "spool")
    _refs_s1, intruder, item_id = _quarantined_intruder(tmp_path, catalog, spool)
    with catalog.sessions() as session:
        item = session.get(QuarantineItem, item_id)
        assert item is not None
        held, data = item.path, spool.path(item.path).read_bytes()
        discard(session, spool, item_id, "dr.who")
        session.rollback()  # the commit never happens
    assert spool.path(held).exists()
    with catalog.sessions.begin() as session:
        discard(session, spool, item_id, "dr.who")
    assert not spool.path(held).exists()
    # the same bytes sent again: acknowledged, kept, and held again under the same row
    spool.store(intruder.study_uid, intruder.series_uid, intruder.sop_instance_uid, [data])
    assert CatalogRecorder(catalog, spool).record([intruder]).quarantined == 1
    with catalog.sessions() as session:
        item = session.get(QuarantineItem, item_id)
        assert item is not None
        assert item.state == QuarantineState.HELD
        assert item.resolved_by is None
    assert spool.path(held).exists()


def test_the_identity_check_holds_the_write_lock_before_it_reads(
    tmp_path: Path, catalog: Catalog
) -> None:
    spool = Spool(tmp_path / "spool")
    (ref,) = _refs(spool, write_series(tmp_path / "s", slices=1))
    database = tmp_path / "catalog.sqlite"
    locked: list[bool] = []

    def probe(_conn: object, _cursor: object, statement: str, *_args: object) -> None:
        if not locked and "FROM studies" in statement:
            other = sqlite3.connect(database, timeout=0)
            try:
                other.execute("BEGIN IMMEDIATE")
            except sqlite3.OperationalError:
                locked.append(True)
            else:
                locked.append(False)
                other.rollback()
            finally:
                other.close()

    event.listen(catalog.engine, "before_cursor_execute", probe)
    with catalog.sessions.begin() as session:
        assert record_instances(session, [ref]).recorded == 1
    assert locked == [True]


def test_an_instance_number_beyond_32_bits_is_no_number(tmp_path: Path) -> None:
    ds = dcmread(write_series(tmp_path, slices=1)[0])
    ds.InstanceNumber = "999999999999"
    ds.SeriesNumber = "-2147483648"
    header = read_header(ds)
    assert header.instance_number is None
    assert header.series_number == -(2**31)


def test_on_postgresql_the_identity_check_holds_an_advisory_lock(
    tmp_path: Path, postgres_url: str
) -> None:
    catalog = open_catalog(postgres_url)
    try:
        spool = Spool(tmp_path / "spool")
        (ref,) = _refs(spool, write_series(tmp_path / "s", slices=1))
        with catalog.sessions.begin() as session:
            assert record_instances(session, [ref]).recorded == 1
            held = session.scalar(
                text("SELECT count(*) FROM pg_locks WHERE locktype = 'advisory' AND granted")
            )
        assert held == 1
    finally:
        catalog.dispose()


@pytest.mark.parametrize("backend", ["sqlite", "postgresql"])
def test_the_screen_looks_up_study_series_and_instance_in_one_statement(
    tmp_path: Path, backend: str, request: pytest.FixtureRequest
) -> None:
    url = (
        request.getfixturevalue("postgres_url")
        if backend == "postgresql"
        else f"sqlite:///{tmp_path / 'catalog.sqlite'}"
    )
    catalog = open_catalog(url)
    spool = Spool(tmp_path / "spool")
    try:
        refs = _refs(spool, write_series(tmp_path / "in", slices=2))
        with catalog.sessions.begin() as session:
            record_instances(session, refs)
        ref = refs[0]
        statements: list[str] = []
        event.listen(catalog.engine, "before_cursor_execute", lambda *a: statements.append(a[2]))
        with catalog.engine.connect() as connection:
            held = lookup_one(connection, ref.study_uid, ref.series_uid, ref.sop_instance_uid)
            nothing = lookup_one(connection, "1.9", "1.9.1", "1.9.1.1")
            other = lookup_one(connection, ref.study_uid, "1.9.1", "1.9.1.1")
        assert len(statements) == 3
        key = patient_key(ref.header.patient_id, ref.header.issuer_of_patient_id)
        assert held.studies == {ref.study_uid: (None, key)}
        assert held.series == {ref.series_uid: ref.study_uid}
        assert held.sops == {
            ref.sop_instance_uid: (ref.path, ref.study_uid, ref.series_uid, ref.sha256)
        }
        assert (nothing.studies, nothing.series, nothing.sops) == ({}, {}, {})
        assert (other.studies, other.series, other.sops) == (held.studies, {}, {})
    finally:
        catalog.dispose()
