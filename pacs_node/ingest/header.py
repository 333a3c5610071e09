"""Read the identifying attributes of a received data set, decoded in its own character set."""

from __future__ import annotations

import zlib
from io import BytesIO
from typing import Any

from pydicom.dataset import Dataset
from pydicom.filereader import read_dataset
from pydicom.uid import UID

from pacs_node.errors import UnreadableDataset
from pacs_node.refs import InstanceHeader
from pacs_node.uids import require_uid


def _text(ds: Dataset, keyword: str, limit: int = 64) -> str | None:
    value: Any = ds.get(keyword)
    if value is None or value == "":
        return None
    if isinstance(value, (list, tuple)) or type(value).__name__ == "MultiValue":
        value = "\\".join(str(v) for v in value)
    text = str(value).strip()
    return text[:limit] or None


def _integer(ds: Dataset, keyword: str) -> int | None:
    value: Any = ds.get(keyword)
    if value is None or value == "":
        return None
    try:
        return int(value)
    except (TypeError, ValueError):
        return None


def read_header(ds: Dataset) -> InstanceHeader:
    """The catalog's attributes of ``ds``; UIDs validated, strings decoded (PS3.5 6.1).

    Raises :class:`~pacs_node.errors.IngestError` subclasses for missing or invalid UIDs and
    for values pydicom cannot decode.
    """
    study_uid = require_uid(ds.get("StudyInstanceUID"), "StudyInstanceUID")
    series_uid = require_uid(ds.get("SeriesInstanceUID"), "SeriesInstanceUID")
    sop_uid = require_uid(ds.get("SOPInstanceUID"), "SOPInstanceUID")
    sop_class = require_uid(ds.get("SOPClassUID"), "SOPClassUID")
    try:
        return InstanceHeader(
            study_uid=study_uid,
            series_uid=series_uid,
            sop_instance_uid=sop_uid,
            sop_class_uid=sop_class,
            modality=_text(ds, "Modality", 16),
            instance_number=_integer(ds, "InstanceNumber"),
            series_number=_integer(ds, "SeriesNumber"),
            series_description=_text(ds, "SeriesDescription"),
            body_part=_text(ds, "BodyPartExamined"),
            study_description=_text(ds, "StudyDescription"),
            study_date=_text(ds, "StudyDate", 8),
            study_time=_text(ds, "StudyTime", 16),
            accession_number=_text(ds, "AccessionNumber"),
            patient_name=_text(ds, "PatientName", 324),
            patient_id=_text(ds, "PatientID"),
            issuer_of_patient_id=_text(ds, "IssuerOfPatientID"),
        )
    except (ValueError, TypeError, KeyError, LookupError, UnicodeError) as exc:
        raise UnreadableDataset(f"attribute cannot be decoded: {exc}") from exc


# Every attribute the catalog reads sits in groups 0x0008-0x0020; stop parsing after them so the
# hot path never touches pixel data.
_LAST_GROUP_READ = 0x0020


def _past_identifiers(tag: Any, _vr: Any, _length: Any) -> bool:
    return int(tag.group) > _LAST_GROUP_READ


def parse_identifiers(stream: BytesIO, transfer_syntax_uid: str) -> Dataset:
    """Parse only the leading groups of a network-encoded data set (no file meta, no pixels)."""
    syntax = UID(transfer_syntax_uid)
    try:
        implicit = syntax.is_implicit_VR if syntax.is_transfer_syntax else False
        little = syntax.is_little_endian if syntax.is_transfer_syntax else True
        stream.seek(0)
        if syntax.is_transfer_syntax and syntax.is_deflated:
            inflated = zlib.decompressobj(-zlib.MAX_WBITS).decompress(stream.getbuffer())
            stream = BytesIO(inflated)
        ds = read_dataset(stream, implicit, little, stop_when=_past_identifiers)
        ds.set_original_encoding(implicit, little)
    except Exception as exc:  # pydicom raises many types for hostile bytes
        raise UnreadableDataset(f"data set cannot be parsed: {type(exc).__name__}") from exc
    if len(ds) == 0:
        raise UnreadableDataset("data set is empty")
    return ds
