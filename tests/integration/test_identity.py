"""Patient identity through the doors: DCMTK's storescu and pynetdicom against a running node.

A Series, SOP Instance or patient that collides with another study's is refused (or, by
configuration, quarantined and listed by ``pacs-node quarantine``); a re-sent instance is a
duplicate when identical and follows ``resend_policy`` when not; a study being removed by
retention refuses instances instead of acknowledging and deleting them.
"""

from __future__ import annotations

import json
import sqlite3
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pydicom
import pytest
from pynetdicom import AE
from pynetdicom.sop_class import CTImageStorage  # type: ignore[attr-defined]
from sqlalchemy import update

from pacs_node.catalog.db import open_catalog
from pacs_node.catalog.models import Purge, utcnow
from pacs_node.config import NodeOptions, Settings
from pacs_node.ingest.identity import REASON_TEXT, Reason
from pacs_node.ingest.recorder import CatalogRecorder
from pacs_node.ingest.scp import StorageSCP
from pacs_node.ingest.spool import Spool, file_digest
from pacs_node.ingest.statuses import (
    IDENTITY_CONFLICT,
    OUT_OF_RESOURCES_STUDY_BEING_REMOVED,
    RESEND_REFUSED,
)
from pacs_node.scu import Peer, SendReport, scan, send
from tests.conftest import NodeProcess, free_port, storescu, wait_for
from tests.dicom_factory import new_uid, write_series

pytestmark = pytest.mark.integration


def _send(node: NodeProcess, *paths: Path) -> SendReport:
    """pynetdicom, one association: the failures carry status and ErrorComment."""
    report = SendReport()
    send(scan(list(paths), report), Peer("PACSNODE", "127.0.0.1", node.port), "STORESCU", report)
    return report


def _counter(node: NodeProcess, name: str) -> int:
    with sqlite3.connect(node.data_dir / "catalog.sqlite") as db:
        row = db.execute("select value from counters where name = ?", (name,)).fetchone()
    return int(row[0]) if row else 0


def _variant(source: Path, target: Path, **changes: Any) -> Path:
    ds = pydicom.dcmread(source)
    for keyword, value in changes.items():
        setattr(ds, keyword, value)
    target.parent.mkdir(parents=True, exist_ok=True)
    ds.save_as(target, enforce_file_format=True)
    return target


def _quarantine(node: NodeProcess) -> list[dict[str, Any]]:
    return json.loads(node.cli("quarantine", "--json").stdout)  # type: ignore[no-any-return]


def _study(node: NodeProcess, uid: str) -> dict[str, Any]:
    return next(s for s in node.studies() if s["study_uid"] == uid)


def _s1(node: NodeProcess, tmp_path: Path) -> tuple[list[Path], pydicom.Dataset]:
    files = write_series(tmp_path / "s1", slices=3)
    assert storescu(node, *files).returncode == 0
    first = pydicom.dcmread(files[0])
    wait_for(
        lambda: [s for s in node.studies() if s["instances"] == 3], 20, what="study S1 recorded"
    )
    return files, first


def test_colliding_identity_is_refused_with_a_named_status(
    make_node: Callable[..., NodeProcess], tmp_path: Path
) -> None:
    node = make_node()
    _files, s1 = _s1(node, tmp_path)
    other_study = write_series(tmp_path / "s2", slices=1, patient_name="Other^Patient")[0]
    intruders = {
        # (a) S1's Series Instance UID under another study and patient
        "series": _variant(
            other_study,
            tmp_path / "x" / "series.dcm",
            SeriesInstanceUID=s1.SeriesInstanceUID,
            PatientID="OTHER-1",
        ),
        # (b) S1's Study Instance UID under another Patient ID, and another Issuer
        "patient": _variant(
            other_study,
            tmp_path / "x" / "patient.dcm",
            StudyInstanceUID=s1.StudyInstanceUID,
            PatientID="OTHER-1",
        ),
        "issuer": _variant(
            other_study,
            tmp_path / "x" / "issuer.dcm",
            StudyInstanceUID=s1.StudyInstanceUID,
            IssuerOfPatientID="ANOTHER-HOSPITAL",
            SOPInstanceUID=new_uid(),
        ),
        # (c) S1's SOP Instance UID in another study
        "sop": _variant(other_study, tmp_path / "x" / "sop.dcm", SOPInstanceUID=s1.SOPInstanceUID),
    }
    report = _send(node, *intruders.values())
    failed = {path.stem: reason for path, reason in report.failed}
    assert report.sent == 0
    conflict = f"status 0x{IDENTITY_CONFLICT:04X}"
    assert failed["series"] == f"{conflict} {REASON_TEXT[Reason.SERIES_ELSEWHERE]}"
    assert failed["patient"] == f"{conflict} {REASON_TEXT[Reason.PATIENT_MISMATCH]}"
    assert failed["issuer"] == f"{conflict} {REASON_TEXT[Reason.PATIENT_MISMATCH]}"
    assert failed["sop"] == f"{conflict} {REASON_TEXT[Reason.SOP_ELSEWHERE]}"
    # DCMTK's storescu sees the failure too
    dcmtk = storescu(node, intruders["series"], extra=("-v",))
    assert dcmtk.returncode != 0
    assert "Received Store Response (Error" in dcmtk.stderr
    wait_for(lambda: _counter(node, "identity_rejected") == 5, 10, what="the counter")
    studies = node.studies()
    assert [(s["study_uid"], s["instances"]) for s in studies] == [(s1.StudyInstanceUID, 3)]
    assert _quarantine(node) == []
    assert not list((node.data_dir / "spool" / ".quarantine").rglob("*.dcm"))


def test_quarantine_lists_releases_and_discards(
    make_node: Callable[..., NodeProcess], tmp_path: Path
) -> None:
    node = make_node(identity_conflict="quarantine")
    _files, s1 = _s1(node, tmp_path)
    s2_files = write_series(tmp_path / "s2", slices=2, patient_name="Other^Patient")
    series_intruders = [
        _variant(
            path,
            tmp_path / "x" / f"series{i}.dcm",
            SeriesInstanceUID=s1.SeriesInstanceUID,
            PatientID="OTHER-1",
        )
        for i, path in enumerate(s2_files)
    ]
    patient_intruder = _variant(
        s2_files[0],
        tmp_path / "x" / "patient.dcm",
        StudyInstanceUID=s1.StudyInstanceUID,
        SOPInstanceUID=new_uid(),
        PatientID="OTHER-1",
    )
    assert storescu(node, *series_intruders, patient_intruder).returncode == 0
    items = wait_for(lambda: len(q := _quarantine(node)) == 3 and q, 20, what="quarantine rows")
    reasons = sorted(i["reason"] for i in items)
    assert reasons == ["patient_mismatch", "series_in_other_study", "series_in_other_study"]
    assert {i["collided_study_uid"] for i in items} == {s1.StudyInstanceUID}
    assert all(i["state"] == "held" and i["path"].startswith(".quarantine/") for i in items)
    assert all("OTHER" not in json.dumps(i) for i in items)  # no patient data in the listing
    study = _study(node, s1.StudyInstanceUID)
    assert study["instances"] == 3
    assert study["quarantined"] == 3
    assert len(node.studies()) == 1  # S2 exists nowhere yet
    listing = node.cli("quarantine").stdout
    assert "3 quarantined instances (3 held)" in listing

    # release both instances of the series: one new study, with a series of its own
    by_reason: dict[str, list[dict[str, Any]]] = {}
    for item in items:
        by_reason.setdefault(item["reason"], []).append(item)
    for item in by_reason["series_in_other_study"]:
        node.cli("quarantine", "release", str(item["id"]), "--actor", "dr.who")
    s2_uid = s2_files[0].parent.name and pydicom.dcmread(s2_files[0]).StudyInstanceUID
    released = wait_for(
        lambda: [s for s in node.studies() if s["study_uid"] == s2_uid], 10, what="S2"
    )[0]
    assert released["instances"] == 2
    (series,) = released["series"]
    assert series["series_uid"] != s1.SeriesInstanceUID  # coerced: S1 holds that Series UID
    assert _study(node, s1.StudyInstanceUID)["instances"] == 3
    after = {i["id"]: i for i in _quarantine(node)}
    for item in by_reason["series_in_other_study"]:
        row = after[item["id"]]
        assert row["state"] == "released"
        assert row["resolved_by"] == "dr.who"
        assert row["resolved_study_uid"] == s2_uid
        assert row["series_uid"] == s1.SeriesInstanceUID  # the original UIDs are kept
        assert (node.data_dir / "spool" / row["path"]).exists()  # and the original bytes

    # discard the other patient's instance: bytes gone, row kept
    (patient_item,) = by_reason["patient_mismatch"]
    node.cli("quarantine", "discard", str(patient_item["id"]))
    row = next(i for i in _quarantine(node) if i["id"] == patient_item["id"])
    assert row["state"] == "discarded"
    assert not (node.data_dir / "spool" / row["path"]).exists()
    assert _study(node, s1.StudyInstanceUID)["quarantined"] == 0
    again = node.cli("quarantine", "discard", str(patient_item["id"]), check=False)
    assert again.returncode == 1
    assert "discarded already" in again.stderr
    status = json.loads(node.cli("status", "--json").stdout)
    assert status["healthy"] is True
    assert status["counters"]["quarantine_released"] == 2
    assert status["counters"]["quarantine_discarded"] == 1


def test_identical_resend_is_a_counted_duplicate(
    make_node: Callable[..., NodeProcess], tmp_path: Path
) -> None:
    node = make_node()
    files, _s1_first = _s1(node, tmp_path)
    assert storescu(node, files[0], calling="PACSNODE_SCU").returncode == 0  # another AE
    study = wait_for(
        lambda: [s for s in node.studies() if s["duplicate_count"] == 1], 10, what="duplicate"
    )[0]
    assert study["instances"] == 3
    assert _quarantine(node) == []


@pytest.mark.parametrize("policy", ["keep_first", "replace", "reject"])
def test_resend_with_other_bytes_follows_the_policy(
    make_node: Callable[..., NodeProcess], tmp_path: Path, policy: str
) -> None:
    node = make_node(resend_policy=policy)
    files, s1 = _s1(node, tmp_path)
    stored = next((node.data_dir / "spool").rglob(f"{s1.SOPInstanceUID}.dcm"))
    original = stored.read_bytes()
    corrected = _variant(files[0], tmp_path / "x" / "corrected.dcm", ImageComments="corrected")
    report = _send(node, corrected)
    if policy == "reject":
        refused = f"status 0x{RESEND_REFUSED:04X} {REASON_TEXT[Reason.RESEND]}"
        assert report.failed == [(corrected, refused)]
        assert stored.read_bytes() == original
        assert _quarantine(node) == []
        wait_for(lambda: _counter(node, "resend_rejected") == 1, 10, what="the counter")
    elif policy == "keep_first":
        assert report.ok
        (item,) = wait_for(lambda: _quarantine(node), 10, what="the quarantined copy")
        assert item["reason"] == "resend_different_bytes"
        assert item["collided_study_uid"] == s1.StudyInstanceUID
        assert stored.read_bytes() == original  # the first copy, byte for byte
        held = pydicom.dcmread(node.data_dir / "spool" / item["path"])
        assert held.ImageComments == "corrected"
    else:
        assert report.ok
        wait_for(lambda: _counter(node, "replaced_instances") == 1, 10, what="the replacement")
        assert pydicom.dcmread(stored).ImageComments == "corrected"
        assert _quarantine(node) == []
        with sqlite3.connect(node.data_dir / "catalog.sqlite") as db:
            (sha,) = db.execute(
                "select sha256 from instances where sop_instance_uid = ?", (s1.SOPInstanceUID,)
            ).fetchone()
        assert sha == file_digest(stored)
    study = _study(node, s1.StudyInstanceUID)
    assert study["instances"] == 3
    assert study["duplicate_count"] == 0


def test_an_instance_for_a_study_being_removed_is_refused_then_starts_a_new_study(
    tmp_path: Path,
) -> None:
    """Retention has removed S1's rows (its purge row lists the files) and not yet its files:
    an identical re-send and a new instance are refused before the answer, never acknowledged
    and deleted; once the files are gone, the instance makes a new study."""
    options = NodeOptions(
        data_dir=tmp_path / "var",
        dicom_host="127.0.0.1",
        dicom_port=free_port(),
        min_free_mb=0,
        promiscuous=True,
    )
    settings = Settings(node=options, peers=())
    catalog = open_catalog(options.catalog_url)
    spool = Spool(options.spool_dir)
    recorder = CatalogRecorder(catalog, spool)
    recorder.start()
    scp = StorageSCP(settings, spool, recorder, catalog)
    scp.start()
    try:
        files = write_series(tmp_path / "s1", slices=2)
        s1 = pydicom.dcmread(files[0])
        ae = AE(ae_title="STORESCU")
        ae.add_requested_context(CTImageStorage, "1.2.840.10008.1.2.1")

        def store(path: Path) -> int:
            assoc = ae.associate("127.0.0.1", scp.port, ae_title="PACSNODE")
            assert assoc.is_established
            try:
                status = assoc.send_c_store(pydicom.dcmread(path))
                return int(status.Status)
            finally:
                assoc.release()

        assert store(files[0]) == 0
        assert recorder.wait_idle(10)
        with catalog.sessions.begin() as session:
            session.add(
                Purge(
                    study_uid=s1.StudyInstanceUID,
                    reason="retention_days",
                    instances=1,
                    size_bytes=1,
                    paths={"spool": [], "results": []},
                    purged_at=utcnow(),
                )
            )
        before = sorted(p.relative_to(spool.root) for p in spool.root.rglob("*.dcm"))
        assert store(files[0]) == OUT_OF_RESOURCES_STUDY_BEING_REMOVED  # identical re-send
        assert store(files[1]) == OUT_OF_RESOURCES_STUDY_BEING_REMOVED  # a new instance
        assert sorted(p.relative_to(spool.root) for p in spool.root.rglob("*.dcm")) == before
        with catalog.sessions.begin() as session:
            session.execute(update(Purge).values(files_removed_at=utcnow()))
        assert store(files[1]) == 0
        assert recorder.wait_idle(10)
    finally:
        scp.stop()
        recorder.stop()
        catalog.dispose()
