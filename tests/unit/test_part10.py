"""The hand-written Part 10 header is byte-identical to pydicom's and reads back."""

from __future__ import annotations

from io import BytesIO

import pydicom
import pytest
from pydicom.dataset import FileMetaDataset
from pydicom.filebase import DicomBytesIO
from pydicom.filewriter import write_file_meta_info
from pynetdicom import PYNETDICOM_IMPLEMENTATION_UID, PYNETDICOM_IMPLEMENTATION_VERSION

from pacs_node.ingest.part10 import PREAMBLE, file_meta


@pytest.mark.parametrize(
    ("sop_class", "sop_instance", "syntax", "ae"),
    [
        ("1.2.840.10008.5.1.4.1.1.2", "1.2.3.4", "1.2.840.10008.1.2.1", "STORESCU"),
        ("1.2.840.10008.5.1.4.1.1.4", "1.2.3.45", "1.2.840.10008.1.2", "CT1"),
        ("1.2.840.10008.5.1.4.1.1.66.4", "1.22.333", "1.2.840.10008.1.2.4.90", "ABCDEFGHIJKLMNOP"),
    ],
)
def test_matches_pydicom(sop_class: str, sop_instance: str, syntax: str, ae: str) -> None:
    meta = FileMetaDataset()
    meta.FileMetaInformationVersion = b"\x00\x01"
    meta.MediaStorageSOPClassUID = sop_class
    meta.MediaStorageSOPInstanceUID = sop_instance
    meta.TransferSyntaxUID = syntax
    meta.ImplementationClassUID = PYNETDICOM_IMPLEMENTATION_UID
    meta.ImplementationVersionName = PYNETDICOM_IMPLEMENTATION_VERSION
    meta.SourceApplicationEntityTitle = ae
    expected = DicomBytesIO()
    expected.write(PREAMBLE)
    write_file_meta_info(expected, meta, enforce_standard=True)
    ours = file_meta(sop_class, sop_instance, syntax, ae)
    assert ours == expected.getvalue()
    read = pydicom.dcmread(BytesIO(ours + b"\x08\x00\x16\x00UI\x02\x001\x00"), force=True)
    assert read.file_meta.MediaStorageSOPInstanceUID == sop_instance
    assert read.file_meta.SourceApplicationEntityTitle.strip() == ae
