"""What routing reads of an instance's header, taken once, as the instance arrives.

:func:`read_routing_header` is the one extraction of a :class:`~pacs_node.refs.RoutingHeader`
from a data set: the receive path runs it on the attributes it parses anyway
(:func:`~pacs_node.ingest.header.parse_received`), and ``pacs-node routes test`` on files, so a
series routes the same whichever way it was read. Values are kept as the data set holds them
(an enhanced IOD's geometry taken from its Shared Functional Groups); judging them is
:mod:`pacs_node.routing`'s job.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from typing import Any

from pydicom.datadict import tag_for_keyword
from pydicom.dataset import Dataset

from pacs_node.refs import Equipment, RoutingHeader

# Every top-level attribute read_routing_header reads (a sequence's items are read whole): the
# receive path parses these and the identifiers, and steps over the rest.
ROUTING_KEYWORDS = (
    "Modality",
    "SOPClassUID",
    "StudyDescription",
    "SeriesDescription",
    "BodyPartExamined",
    "SeriesNumber",
    "Manufacturer",
    "ProtocolName",
    "ImageType",
    "NumberOfFrames",
    "RequestedProcedureDescription",
    "RequestAttributesSequence",
    "ProcedureCodeSequence",
    "ImagePositionPatient",
    "ImageOrientationPatient",
    "PixelSpacing",
    "Columns",
    "ReconstructionDiameter",
    "SliceThickness",
    "SpacingBetweenSlices",
    "ContributingEquipmentSequence",
    "SharedFunctionalGroupsSequence",
)

# Bounds on what a routing header keeps of hostile values: the attributes are LO or CS (64 or 16
# characters), and the few sequences hold a handful of items.
_ROUTING_TEXT_LIMIT = 1024
_ROUTING_ITEMS_LIMIT = 64
# A code's value and scheme (SH, 16 characters; UC code values are kept to this): a hostile
# instance cannot make a series end's JSON megabytes long.
_CODE_LIMIT = 64


def _get(ds: Dataset, keyword: str) -> Any:
    """A value routing may read; None where it is absent or cannot be decoded, as routing
    would not use it (the identifying attributes, which must decode, are
    :func:`~pacs_node.ingest.header.read_header`'s).
    Looked up by tag: most are absent, and a missing keyword costs pydicom an exception.
    Any exception is caught: pydicom decodes lazily and raises many types (OSError, struct.error)
    for hostile bytes, and the routing header is read after the identifiers were accepted."""
    tag = tag_for_keyword(keyword)
    try:
        return ds[tag].value if tag is not None and tag in ds else None
    except Exception:  # any type: see above
        return None


def _free_text(value: Any) -> str | None:
    """A value as routing compares it: multi-values joined by backslash, stripped, None if empty."""
    if value is None or value == "":
        return None
    try:
        if isinstance(value, (list, tuple)) or type(value).__name__ == "MultiValue":
            value = "\\".join(str(v) for v in value)
        text = str(value).strip()
    except Exception:  # a value pydicom cannot decode: left out
        return None
    return text[:_ROUTING_TEXT_LIMIT] or None


def _values(value: Any) -> tuple[str, ...]:
    """A multi-valued code string's values (one value is a str, not its characters)."""
    if value is None or value == "":
        return ()
    if isinstance(value, (str, bytes)):
        value = [value]
    try:
        return tuple(str(v)[:_ROUTING_TEXT_LIMIT] for v in value)[:_ROUTING_ITEMS_LIMIT]
    except Exception:  # a lazily decoded value may raise any type
        return ()


def _number(value: Any) -> float | None:
    try:
        number = float(value)
    except Exception:  # not a number, whatever the value is
        return None
    return number if math.isfinite(number) else None


def _whole(value: Any) -> int | None:
    number = _number(value)
    return int(number) if number is not None and number.is_integer() else None


def _numbers(value: Any, count: int) -> tuple[float, ...] | None:
    if value is None or isinstance(value, (str, bytes)):
        return None
    try:
        numbers = tuple(float(v) for v in value)
    except Exception:  # not numbers, whatever the value is
        return None
    ok = len(numbers) == count and all(math.isfinite(n) for n in numbers)
    return numbers if ok else None


def _items(ds: Dataset, keyword: str) -> list[Dataset]:
    """A sequence's items, at most :data:`_ROUTING_ITEMS_LIMIT`; none for a value of another VR."""
    value = _get(ds, keyword)
    if value is None or isinstance(value, (str, bytes)):
        return []
    try:
        return [item for item in list(value)[:_ROUTING_ITEMS_LIMIT] if isinstance(item, Dataset)]
    except Exception:  # a lazily decoded sequence may raise any type
        return []


def _shared(ds: Dataset, sequence: str, keyword: str) -> Any:
    """An attribute from the data set, else from its Shared Functional Groups (enhanced IODs)."""
    value = _get(ds, keyword)
    if value not in (None, ""):
        return value
    for group in _items(ds, "SharedFunctionalGroupsSequence"):
        for item in _items(group, sequence):
            value = _get(item, keyword)
            if value not in (None, ""):
                return value
    return None


def _meanings(items: Iterable[Dataset], keyword: str) -> list[str]:
    meanings = []
    for item in items:
        for code in _items(item, keyword):
            meaning = _free_text(_get(code, "CodeMeaning"))
            if meaning:
                meanings.append(meaning)
    return meanings


def _requested(ds: Dataset) -> tuple[str, ...]:
    requests = _items(ds, "RequestAttributesSequence")
    found = [_free_text(_get(ds, "RequestedProcedureDescription"))]
    for item in requests:
        found.append(_free_text(_get(item, "RequestedProcedureDescription")))
        found.append(_free_text(_get(item, "ScheduledProcedureStepDescription")))
    found += _meanings(requests, "RequestedProcedureCodeSequence")
    return tuple(text for text in found if text)[:_ROUTING_ITEMS_LIMIT]


def _code(ds: Dataset, keyword: str) -> str:
    return str(_get(ds, keyword) or "")[:_CODE_LIMIT]


def _equipment(ds: Dataset) -> tuple[Equipment, ...]:
    found = []
    for item in _items(ds, "ContributingEquipmentSequence"):
        purposes = tuple(
            (_code(code, "CodeValue"), _code(code, "CodingSchemeDesignator"))
            for code in _items(item, "PurposeOfReferenceCodeSequence")
        )
        found.append((_free_text(_get(item, "Manufacturer")), purposes))
    return tuple(found)


def read_routing_header(ds: Dataset) -> RoutingHeader:
    """What routing reads of ``ds`` (parsed by :func:`~pacs_node.ingest.header.parse_received`
    or further): one
    implementation for the receive path and for files on a disk. Nothing here refuses an
    instance: a value that cannot be decoded or is malformed is left out."""
    return RoutingHeader(
        modality=_free_text(_get(ds, "Modality")),
        sop_class_uid=_free_text(_get(ds, "SOPClassUID")),
        manufacturer=_free_text(_get(ds, "Manufacturer")),
        body_part_examined=_free_text(_get(ds, "BodyPartExamined")),
        study_description=_free_text(_get(ds, "StudyDescription")),
        series_description=_free_text(_get(ds, "SeriesDescription")),
        protocol_name=_free_text(_get(ds, "ProtocolName")),
        image_type=_values(_get(ds, "ImageType")),
        series_number=_whole(_get(ds, "SeriesNumber")),
        number_of_frames=_whole(_get(ds, "NumberOfFrames")),
        requested_procedures=_requested(ds),
        procedure_codes=tuple(_meanings([ds], "ProcedureCodeSequence"))[:_ROUTING_ITEMS_LIMIT],
        image_position_patient=_numbers(_get(ds, "ImagePositionPatient"), 3),
        image_orientation_patient=_numbers(
            _shared(ds, "PlaneOrientationSequence", "ImageOrientationPatient"), 6
        ),
        pixel_spacing=_numbers(_shared(ds, "PixelMeasuresSequence", "PixelSpacing"), 2),
        columns=_whole(_get(ds, "Columns")),
        reconstruction_diameter=_number(_get(ds, "ReconstructionDiameter")),
        slice_thickness=_number(_shared(ds, "PixelMeasuresSequence", "SliceThickness")),
        spacing_between_slices=_number(
            _shared(ds, "PixelMeasuresSequence", "SpacingBetweenSlices")
        ),
        contributing_equipment=_equipment(ds),
    )
