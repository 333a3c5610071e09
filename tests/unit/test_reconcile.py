"""Startup reconciliation: an acknowledged file whose row never committed is recorded at start."""

from __future__ import annotations

import os
import time
from pathlib import Path

import pydicom
from pydicom.dataset import Dataset
from sqlalchemy import event, select

from pacs_node.catalog.db import open_catalog
from pacs_node.catalog.models import Instance, QuarantineItem, Series
from pacs_node.catalog.studies import list_studies, series_headers
from pacs_node.ingest.header import read_received_file
from pacs_node.ingest.identity import Reason
from pacs_node.ingest.reconcile import reconcile
from pacs_node.ingest.recorder import CatalogRecorder
from pacs_node.ingest.routing_header import read_routing_header
from pacs_node.ingest.spool import Spool
from tests.dicom_factory import write_series


def test_spool_files_without_rows_are_recorded(tmp_path: Path) -> None:
    files = write_series(
        tmp_path / "src", slices=3, charset="ISO_IR 100", patient_name="Müller^Jörg"
    )
    spool = Spool(tmp_path / "spool")
    for path in files:
        ds = pydicom.dcmread(path)
        ds.file_meta.SourceApplicationEntityTitle = "CT1"
        ds.save_as(path)
        spool.store(
            ds.StudyInstanceUID, ds.SeriesInstanceUID, ds.SOPInstanceUID, [path.read_bytes()]
        )
    (spool.incoming / "crashed.part").write_bytes(b"never acknowledged")
    catalog = open_catalog(f"sqlite:///{tmp_path / 'catalog.sqlite'}")
    try:
        recorder = CatalogRecorder(catalog, spool)
        assert reconcile(spool, recorder) == 3
        assert reconcile(spool, recorder) == 0
        with catalog.sessions() as session:
            (study,) = list_studies(session)
        assert study.instances == 3
        assert study.patient_name == "Müller^Jörg"
        assert study.calling_ae == "CT1"
        assert list(spool.incoming.iterdir()) == []
    finally:
        catalog.dispose()


def test_while_running_only_recent_files_are_recorded_and_incoming_is_left_alone(
    tmp_path: Path,
) -> None:
    """After an SCP worker dies: the files it spooled since it started get their rows; older
    files are left alone (a purge may be removing them) and so are other workers' partial files."""
    import os

    spool = Spool(tmp_path / "spool")
    old, new = write_series(tmp_path / "src", slices=2)
    for path in (old, new):
        ds = pydicom.dcmread(path)
        spool.store(
            ds.StudyInstanceUID, ds.SeriesInstanceUID, ds.SOPInstanceUID, [path.read_bytes()]
        )
    old_relpath = next(r for r in spool.walk() if pydicom.dcmread(old).SOPInstanceUID in r)
    os.utime(spool.path(old_relpath), (1_000_000, 1_000_000))
    (spool.incoming / "writing.part").write_bytes(b"a live worker's")
    catalog = open_catalog(f"sqlite:///{tmp_path / 'catalog.sqlite'}")
    try:
        recorder = CatalogRecorder(catalog, spool)
        assert reconcile(spool, recorder, since=2_000_000) == 1
        assert reconcile(spool, recorder, since=2_000_000) == 0
        assert (spool.incoming / "writing.part").exists()
        assert reconcile(spool, recorder) == 1  # at start: everything, and partial files go
        assert list(spool.incoming.iterdir()) == []
    finally:
        catalog.dispose()


def test_copies_kept_apart_without_rows_are_recorded_in_quarantine(tmp_path: Path) -> None:
    """Acknowledged, kept in the quarantine area, and the row never committed: found at start."""
    spool = Spool(tmp_path / "spool")
    (path,) = write_series(tmp_path / "src", slices=1)
    ds = pydicom.dcmread(path)
    uids = (ds.StudyInstanceUID, ds.SeriesInstanceUID, ds.SOPInstanceUID)
    first = spool.store(*uids, [path.read_bytes()])
    ds.ImageComments = "corrected"
    ds.save_as(path)
    other = spool.store(*uids, [path.read_bytes()])
    assert other.held is not None
    catalog = open_catalog(f"sqlite:///{tmp_path / 'catalog.sqlite'}")
    try:
        recorder = CatalogRecorder(catalog, spool)
        assert reconcile(spool, recorder) == 1
        with catalog.sessions() as session:
            (item,) = session.scalars(select(QuarantineItem))
            (row,) = session.scalars(select(Instance))
        assert item.path == other.held
        assert item.reason == Reason.RESEND
        assert item.collided_study_uid == ds.StudyInstanceUID
        assert row.path == first.relpath
        assert reconcile(spool, recorder) == 0
        with catalog.sessions() as session:
            assert len(list(session.scalars(select(QuarantineItem)))) == 1
    finally:
        catalog.dispose()


def test_an_instance_the_catalog_refuses_is_quarantined_and_the_start_goes_on(
    tmp_path: Path,
) -> None:
    spool = Spool(tmp_path / "spool")
    files = write_series(tmp_path / "src", slices=3)
    for path in files:
        ds = pydicom.dcmread(path)
        spool.store(
            ds.StudyInstanceUID, ds.SeriesInstanceUID, ds.SOPInstanceUID, [path.read_bytes()]
        )
    poison = str(pydicom.dcmread(files[1]).SOPInstanceUID)
    catalog = open_catalog(f"sqlite:///{tmp_path / 'catalog.sqlite'}")

    def refuse(
        _conn: object, _cursor: object, statement: str, parameters: object, *_a: object
    ) -> None:
        if statement.startswith("INSERT INTO instances") and poison in str(parameters):
            raise ValueError("the catalog cannot hold this instance")

    event.listen(catalog.engine, "before_cursor_execute", refuse)
    try:
        recorder = CatalogRecorder(catalog, spool)
        assert reconcile(spool, recorder) == 2
        with catalog.sessions() as session:
            (item,) = session.scalars(select(QuarantineItem))
        assert item.sop_instance_uid == poison
        assert item.reason == Reason.UNRECORDABLE
        assert spool.path(item.path).exists()
    finally:
        catalog.dispose()


def test_reconciled_instances_get_the_routing_header_the_receive_path_reads(
    tmp_path: Path,
) -> None:
    """A single-frame instance is read no further than group 0040 on receipt: reconciling it
    must not read more (here: a pixel spacing only in Shared Functional Groups)."""
    (path,) = write_series(tmp_path / "src", slices=1)
    ds = pydicom.dcmread(path)
    measures = Dataset()
    measures.PixelSpacing = [0.5, 0.5]
    shared = Dataset()
    shared.PixelMeasuresSequence = [measures]
    ds.SharedFunctionalGroupsSequence = [shared]
    del ds.PixelSpacing
    ds.save_as(path)
    assert read_routing_header(pydicom.dcmread(path)).pixel_spacing == (0.5, 0.5)
    spool = Spool(tmp_path / "spool")
    spool.store(ds.StudyInstanceUID, ds.SeriesInstanceUID, ds.SOPInstanceUID, [path.read_bytes()])
    catalog = open_catalog(f"sqlite:///{tmp_path / 'catalog.sqlite'}")
    try:
        assert reconcile(spool, CatalogRecorder(catalog, spool)) == 1
        with catalog.sessions() as session:
            (series,) = session.scalars(select(Series))
            headers = series_headers(series)
    finally:
        catalog.dispose()
    assert headers is not None
    assert headers.first == read_routing_header(read_received_file(path))
    assert headers.first.pixel_spacing is None


def test_a_node_removes_its_own_partial_files_and_those_of_nodes_not_running(
    tmp_path: Path,
) -> None:
    """On a shared data path each node writes partial files in ``.incoming/node.<node_id>``;
    at its start a node removes its own and those of nodes that are not running, and leaves
    those of the live nodes beside it, which are being written."""
    root = tmp_path / "spool"
    mine = Spool(root, node_id="node-a")
    beside = Spool(root, node_id="node-b")
    gone = Spool(root, node_id="node-c")
    tool = Spool(root)
    ds = pydicom.dcmread(write_series(tmp_path / "src", slices=1)[0])
    stored = beside.store(ds.StudyInstanceUID, ds.SeriesInstanceUID, ds.SOPInstanceUID, [b"\0" * 8])
    assert not list(beside.incoming.glob("*.part"))  # written there, then linked in place
    assert stored.relpath in set(beside.walk())
    left = {s: s.incoming / "left.part" for s in (mine, beside, gone, tool)}
    for path in left.values():
        path.write_bytes(b"partial")
    # Just written: only this node's own go; another node's may be of a node starting now.
    assert mine.clean_incoming(live={"node-b"}, older_than_s=60) == 1
    assert {s.node_id for s, path in left.items() if path.exists()} == {"node-b", "node-c", ""}
    old = time.time() - 120
    for path in left.values():
        if path.exists():
            os.utime(path, (old, old))
    assert mine.clean_incoming(live={"node-b"}, older_than_s=60) == 2
    assert {s.node_id for s, path in left.items() if path.exists()} == {"node-b"}
    assert gone.incoming.exists()  # a folder is never removed: its node may be starting
    assert mine.incoming.exists()
    assert mine.clean_incoming(older_than_s=60) == 1  # alone: the live one's old file too
    assert not any(path.exists() for path in left.values())


def test_a_starting_node_leaves_the_folder_of_a_node_not_registered_yet(tmp_path: Path) -> None:
    """Two nodes starting together: the second one cleans ``.incoming`` before the first one
    is registered. The first one's folder stays and its stores go on; were it removed
    anyway (by hand, an older version), a store makes it again."""
    root = tmp_path / "spool"
    first = Spool(root, node_id="node-a")
    second = Spool(root, node_id="node-b")
    writing = first.incoming / "writing.part"
    writing.write_bytes(b"partial")
    assert second.clean_incoming(live=(), older_than_s=60) == 0
    assert writing.exists()
    assert first.incoming.is_dir()
    ds = pydicom.dcmread(write_series(tmp_path / "src", slices=1)[0])
    writing.unlink()
    first.incoming.rmdir()
    stored = first.store(ds.StudyInstanceUID, ds.SeriesInstanceUID, ds.SOPInstanceUID, [b"x" * 8])
    assert stored.relpath in set(first.walk())
