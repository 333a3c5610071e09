"""What routing needs of a series is taken as its instances arrive over a real association:
the storage SCP parses it in the same pass as the identifiers, the recorder keeps it per series,
and routing then gives the facts ``pacs-node routes test`` gives for the same files, without
opening any of them."""

from __future__ import annotations

import shutil
from collections.abc import Iterator
from pathlib import Path

import pydicom
import pytest
from pydicom import config as pydicom_config
from pydicom.dataset import Dataset
from pydicom.uid import ExplicitVRLittleEndian, ImplicitVRLittleEndian
from pynetdicom import AE, _config, dimse_messages
from pynetdicom.sop_class import (  # type: ignore[attr-defined]
    CTImageStorage,
    EnhancedMRImageStorage,
    MRImageStorage,
)
from sqlalchemy import select

import pacs_node.routing.facts as facts_module
from pacs_node.catalog.db import Catalog, open_catalog
from pacs_node.catalog.models import Instance, Study
from pacs_node.config import NodeOptions, Settings
from pacs_node.ingest.recorder import CatalogRecorder
from pacs_node.ingest.scp import StorageSCP
from pacs_node.ingest.spool import Spool
from pacs_node.routing.facts import study_facts
from pacs_node.routing.files import read_studies
from pacs_node.routing.rules import SeriesFacts
from tests.conftest import free_port
from tests.dicom_factory import write_enhanced_mr, write_requested_ct, write_series

pytestmark = pytest.mark.integration

CALLING_AE = "STORESCU"


@pytest.fixture
def node(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> Iterator[tuple[StorageSCP, CatalogRecorder, Catalog]]:
    """An in-process storage SCP and recorder on a free loopback port, stopped after the test;
    the process-wide settings the SCP makes are put back."""
    monkeypatch.setattr(
        pydicom_config.settings,
        "reading_validation_mode",
        pydicom_config.settings.reading_validation_mode,
    )
    monkeypatch.setattr(_config, "STORE_RECV_CHUNKED_DATASET", _config.STORE_RECV_CHUNKED_DATASET)
    monkeypatch.setattr(
        _config, "UNRESTRICTED_STORAGE_SERVICE", _config.UNRESTRICTED_STORAGE_SERVICE
    )
    monkeypatch.setattr(dimse_messages, "NamedTemporaryFile", dimse_messages.NamedTemporaryFile)
    options = NodeOptions(
        data_dir=tmp_path / "var",
        dicom_host="127.0.0.1",
        dicom_port=free_port(),
        min_free_mb=0,
        promiscuous=True,
    )
    catalog = open_catalog(options.catalog_url)
    spool = Spool(options.spool_dir)
    recorder = CatalogRecorder(catalog, spool)
    recorder.start()
    scp = StorageSCP(Settings(node=options, peers=()), spool, recorder, catalog)
    scp.start()
    try:
        yield scp, recorder, catalog
    finally:
        scp.stop()
        recorder.stop()
        catalog.dispose()


def _store(scp: StorageSCP, paths: list[Path]) -> None:
    ae = AE(ae_title=CALLING_AE)
    ae.add_requested_context(CTImageStorage, ExplicitVRLittleEndian)
    ae.add_requested_context(EnhancedMRImageStorage, ExplicitVRLittleEndian)
    ae.add_requested_context(MRImageStorage, ImplicitVRLittleEndian)
    assoc = ae.associate("127.0.0.1", scp.port, ae_title="PACSNODE")
    assert assoc.is_established
    try:
        for path in paths:
            status: Dataset = assoc.send_c_store(pydicom.dcmread(path))
            assert int(status.Status) == 0, path
    finally:
        assoc.release()


def _node_facts(catalog: Catalog, spool: Spool) -> dict[str, list[SeriesFacts]]:
    with catalog.sessions() as session:
        studies = session.scalars(select(Study.study_uid)).all()
        return {uid: study_facts(session, spool, uid) for uid in studies}


def test_routing_reads_what_the_scp_recorded_and_opens_no_file(
    node: tuple[StorageSCP, CatalogRecorder, Catalog],
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    scp, recorder, catalog = node
    files = tmp_path / "files"
    paths = write_requested_ct(files / "ct")  # explicit VR
    paths += write_enhanced_mr(files / "emr")  # one multi-frame instance
    paths += write_series(files / "mr", modality="MR", slices=8)  # sent as implicit VR
    _store(scp, list(reversed(paths)))  # the last slice first
    assert recorder.wait_idle(10)

    found, skipped = read_studies([files], calling_ae=CALLING_AE)
    assert skipped == []
    expected = {study.study_uid: list(study.series) for study in found}
    assert _node_facts(catalog, scp.spool) == expected
    ct = next(facts for series in expected.values() for facts in series if facts.modality == "CT")
    assert ct.body_region.regions == ("CHEST", "ABDOMEN", "PELVIS")

    shutil.rmtree(scp.spool.root)

    def no_file(*_args: object) -> Dataset:
        raise AssertionError("routing opened a spooled file")

    monkeypatch.setattr(facts_module, "read_received_file", no_file)
    assert _node_facts(catalog, scp.spool) == expected


def _with_damaged_request_sequence(path: Path) -> Path:
    """``path`` rewritten as Implicit VR Little Endian, a Request Attributes Sequence
    (0040,0275) of 7 garbage bytes inserted before its pixel data: pydicom parses it only when
    the value is read (and raises OSError then)."""
    ds = pydicom.dcmread(path)
    ds.file_meta.TransferSyntaxUID = ImplicitVRLittleEndian
    ds.save_as(path, enforce_file_format=True, implicit_vr=True, little_endian=True)
    data = path.read_bytes()
    pixels = data.rindex(b"\xe0\x7f\x10\x00")
    damaged = b"\x40\x00\x75\x02" + (7).to_bytes(4, "little") + b"\x01" * 7
    path.write_bytes(data[:pixels] + damaged + data[pixels:])
    return path


def test_an_instance_with_an_undecodable_routing_sequence_is_stored_and_recorded(
    node: tuple[StorageSCP, CatalogRecorder, Catalog], tmp_path: Path
) -> None:
    scp, recorder, catalog = node
    (path,) = write_series(tmp_path / "ct", slices=1)
    _with_damaged_request_sequence(path)
    ae = AE(ae_title=CALLING_AE)
    ae.add_requested_context(CTImageStorage, ImplicitVRLittleEndian)
    assoc = ae.associate("127.0.0.1", scp.port, ae_title="PACSNODE")
    assert assoc.is_established
    try:
        status: Dataset = assoc.send_c_store(path)  # the bytes as they are
    finally:
        assoc.release()
    assert int(status.Status) == 0
    assert recorder.wait_idle(10)
    sop_uid = pydicom.dcmread(path, stop_before_pixels=True).SOPInstanceUID
    with catalog.sessions() as session:
        (row,) = session.scalars(select(Instance).where(Instance.sop_instance_uid == sop_uid))
        assert scp.spool.path(row.path).exists()
