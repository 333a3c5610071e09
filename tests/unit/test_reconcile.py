"""Startup reconciliation: an acknowledged file whose row never committed is recorded at start."""

from __future__ import annotations

from pathlib import Path

import pydicom

from pacs_node.catalog.db import open_catalog
from pacs_node.catalog.studies import list_studies
from pacs_node.ingest.reconcile import reconcile
from pacs_node.ingest.recorder import CatalogRecorder
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
