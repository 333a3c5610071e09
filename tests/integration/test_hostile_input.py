"""Who may connect, and what a malformed instance gets: a failure status, never a crash."""

from __future__ import annotations

import sqlite3
from collections.abc import Callable
from io import BytesIO
from pathlib import Path

import pydicom
import pytest
from pydicom.filewriter import write_file_meta_info

from pacs_node.scu import Peer, SendReport, scan, send
from tests.conftest import NodeProcess, storescu, wait_for
from tests.dicom_factory import MR_IMAGE, write_series

pytestmark = pytest.mark.integration


def _catalog(node: NodeProcess) -> sqlite3.Connection:
    return sqlite3.connect(node.data_dir / "catalog.sqlite")


def _counter(node: NodeProcess, name: str) -> int:
    with _catalog(node) as db:
        row = db.execute("select value from counters where name = ?", (name,)).fetchone()
    return int(row[0]) if row else 0


def test_unknown_calling_ae_is_rejected_and_counted(
    make_node: Callable[..., NodeProcess], tmp_path: Path
) -> None:
    node = make_node(peers=[{"ae_title": "CT1"}, {"ae_title": "BOUND", "host": "127.0.0.2"}])
    files = write_series(tmp_path / "ct", slices=1)
    refused = storescu(node, *files, calling="INTRUDER")
    assert refused.returncode != 0
    assert "reject" in (refused.stderr + refused.stdout).lower()
    bound_elsewhere = storescu(node, *files, calling="BOUND")
    assert bound_elsewhere.returncode != 0
    assert storescu(node, *files, calling="CT1").returncode == 0
    wait_for(lambda: _counter(node, "rejected_associations") == 2, 10, what="the counter")
    assert "association rejected" in node.log_text()
    assert "INTRUDER" in node.log_text()
    assert [s["instances"] for s in node.studies()] == [1]


def test_promiscuous_mode_accepts_any_calling_ae(
    make_node: Callable[..., NodeProcess], tmp_path: Path
) -> None:
    node = make_node(peers=[], promiscuous=True)
    files = write_series(tmp_path / "ct", slices=2)
    assert storescu(node, *files, calling="ANYONE").returncode == 0
    wait_for(lambda: node.studies() and node.studies()[0]["instances"] == 2, 10, what="rows")


def _with_meta(ds: pydicom.Dataset, body: bytes, path: Path) -> Path:
    out = BytesIO()
    out.write(b"\0" * 128 + b"DICM")
    write_file_meta_info(out, ds.file_meta, enforce_standard=True)
    path.write_bytes(out.getvalue() + body)
    return path


def _malformed(tmp_path: Path, template: Path) -> dict[str, Path]:
    tmp_path.mkdir()
    bad: dict[str, Path] = {}
    ds = pydicom.dcmread(template)
    ds.SOPClassUID = MR_IMAGE  # the file meta (and so the context) still says CT
    bad["mismatch"] = tmp_path / "mismatch.dcm"
    ds.save_as(bad["mismatch"])

    ds = pydicom.dcmread(template)
    ds.StudyInstanceUID = "1.2.3/../../x"
    bad["traversal"] = tmp_path / "traversal.dcm"
    ds.save_as(bad["traversal"])

    ds = pydicom.dcmread(template)
    del ds.SeriesInstanceUID
    bad["missing"] = tmp_path / "missing.dcm"
    ds.save_as(bad["missing"])

    ds = pydicom.dcmread(template)
    bad["garbage"] = _with_meta(
        ds, b"\x08\x00\x16\x00UI\xff\xff" + b"\x01" * 40, tmp_path / "g.dcm"
    )
    return bad


def test_malformed_instances_fail_while_the_association_goes_on(
    make_node: Callable[..., NodeProcess], tmp_path: Path
) -> None:
    node = make_node()
    good = write_series(tmp_path / "ct", slices=4)
    bad = _malformed(tmp_path / "bad", good[0])
    # Interleave: good, bad, good, bad, ... over one association.
    order = [good[0], bad["mismatch"], good[1], bad["traversal"], bad["missing"], good[2]]
    order += [bad["garbage"], good[3]]
    report = SendReport()
    files = scan(order, report)
    assert len(files) == len(order)
    send(files, Peer("PACSNODE", "127.0.0.1", node.port), "PACSNODE_SCU", report)

    assert report.sent == 4
    statuses = {path.name: reason for path, reason in report.failed}
    assert statuses["mismatch.dcm"].startswith("status 0xA900")
    assert statuses["traversal.dcm"].startswith("status 0xC003")
    assert statuses["missing.dcm"].startswith("status 0xC002")
    assert statuses["g.dcm"].startswith("status 0xC00")  # cannot understand

    studies = wait_for(node.studies, 10, what="the good instances")
    assert [s["instances"] for s in studies] == [4]
    spool = node.data_dir / "spool"
    assert not (node.data_dir / "x").exists()
    assert not list(tmp_path.rglob("x"))
    stored = sorted(p.name for p in spool.rglob("*.dcm"))
    assert len(stored) == 4
    assert all(set(p.parent.name) <= set("0123456789.") for p in spool.rglob("*.dcm"))
    assert list((spool / ".incoming").rglob("*.part")) == []
    wait_for(lambda: _counter(node, "failed_instances") == 4, 10, what="failure counter")


def test_duplicate_sop_instance_keeps_the_first(
    make_node: Callable[..., NodeProcess], tmp_path: Path
) -> None:
    node = make_node()
    files = write_series(tmp_path / "ct", slices=3)
    assert storescu(node, *files).returncode == 0
    first = files[0].read_bytes()
    ds = pydicom.dcmread(files[0])
    ds.PatientName = "Changed^Name"
    ds.save_as(files[0])
    assert storescu(node, files[0]).returncode == 0
    # other bytes under a held SOP Instance UID: the first copy stays, the second is kept
    # apart in quarantine (resend_policy keep_first), never counted in the study
    study = wait_for(
        lambda: [s for s in node.studies() if s["quarantined"] == 1], 10, what="quarantined copy"
    )[0]
    assert study["instances"] == 3
    assert study["duplicate_count"] == 0
    stored = next(
        p for p in (node.data_dir / "spool").rglob(f"{ds.SOPInstanceUID}.dcm")
    ).read_bytes()
    assert stored.endswith(first[-1000:])
    assert b"Changed^Name" not in stored
