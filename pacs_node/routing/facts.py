"""What routing sees of a series, computed the same way for the node and for files on a disk.

A series is read as a :class:`SeriesSample`: its instance count, the calling AE, and the headers
of the instance that leads it and the one that ends it in :func:`header_order` (lowest and highest
(Instance Number, SOP Instance UID)). :func:`series_facts` turns a sample into
:class:`~pacs_node.routing.rules.SeriesFacts`; the node builds samples from the catalog and the
spool (:func:`study_facts`), ``pacs-node routes test`` from files (:mod:`pacs_node.routing.files`).
Headers are read up to (5200,9229); pixel data is never read.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from pydicom import Dataset
from sqlalchemy import select
from sqlalchemy.orm import Session

from pacs_node.catalog.models import Instance, Study
from pacs_node.errors import IngestError
from pacs_node.ingest.header import read_spooled_header
from pacs_node.ingest.spool import Spool
from pacs_node.results.codes import PROCESSING_ALGORITHM
from pacs_node.routing.region import AXIAL_MIN_COSINE, SERIES_DESCRIPTION, Geometry, body_region
from pacs_node.routing.rules import SeriesFacts

log = logging.getLogger(__name__)

NODE_MANUFACTURER = "pacs-node"
# The last attribute routing reads: Shared Functional Groups Sequence (5200,9229). Everything
# after it (Per-Frame Functional Groups, pixel data) is never read, nor inflated. Every attribute
# the body region needs (descriptions, requests, positions, field) comes before it.
_LAST_TAG_READ = 0x52009229


def past_routing_tags(tag: Any, _vr: Any, _length: Any) -> bool:
    """``stop_when`` for :func:`~pacs_node.ingest.header.read_spooled_header`."""
    return int(tag) > _LAST_TAG_READ


def header_order(instance_number: int | None, sop_instance_uid: str) -> tuple[bool, int, str]:
    """Sort key of a series' instances: by Instance Number, unnumbered ones last, then by SOP
    Instance UID, so both ways of reading a series pick the same headers."""
    return (instance_number is None, instance_number or 0, sop_instance_uid)


@dataclass(frozen=True)
class SeriesSample:
    """One series as routing reads it: ``first`` and ``last`` are the headers of the instances
    that lead and end it in :func:`header_order` (the same one for a single instance)."""

    series_uid: str
    instances: int
    first: Dataset
    last: Dataset
    calling_ae: str | None = None


@dataclass(frozen=True)
class Recorded:
    """What the catalog recorded of a series, used where its header cannot be read."""

    modality: str | None = None
    body_part: str | None = None
    series_description: str | None = None
    study_description: str | None = None
    series_number: int | None = None


def produced_by_node(ds: Dataset) -> bool:
    """An object this node wrote: its Contributing Equipment names us as processing algorithm
    (IHE AIR). A PACS that forwards everything back must not start a loop."""
    for item in ds.get("ContributingEquipmentSequence", []):
        purposes = item.get("PurposeOfReferenceCodeSequence", [])
        is_algorithm = any(
            p.get("CodeValue") == PROCESSING_ALGORITHM.value
            and p.get("CodingSchemeDesignator") == PROCESSING_ALGORITHM.scheme
            for p in purposes
        )
        if is_algorithm and str(item.get("Manufacturer", "")).strip() == NODE_MANUFACTURER:
            return True
    return False


def _text(value: Any) -> str | None:
    if value is None or value == "":
        return None
    if isinstance(value, (list, tuple)) or type(value).__name__ == "MultiValue":
        value = "\\".join(str(v) for v in value)
    text = str(value).strip()
    return text or None


def _number(value: Any) -> float | None:
    try:
        number = float(value)
    except (TypeError, ValueError):
        return None
    return number if math.isfinite(number) else None


def _numbers(value: Any, count: int) -> tuple[float, ...] | None:
    if value is None or isinstance(value, (str, bytes)):
        return None
    try:
        numbers = tuple(float(v) for v in value)
    except (TypeError, ValueError):
        return None
    ok = len(numbers) == count and all(math.isfinite(n) for n in numbers)
    return numbers if ok else None


def _shared(ds: Dataset, sequence: str, keyword: str) -> Any:
    """An attribute from the data set, else from its Shared Functional Groups (enhanced IODs)."""
    value = ds.get(keyword)
    if value not in (None, ""):
        return value
    for group in ds.get("SharedFunctionalGroupsSequence", []):
        for item in group.get(sequence, []):
            value = item.get(keyword)
            if value not in (None, ""):
                return value
    return None


def _thickness(ds: Dataset) -> float | None:
    return _number(_shared(ds, "PixelMeasuresSequence", "SliceThickness"))


def _integer(value: Any) -> int | None:
    number = _number(value)
    return int(number) if number is not None and number.is_integer() else None


def geometry(sample: SeriesSample) -> Geometry | None:
    """The volume's extent along the slice normal and its field, from two headers: the leading
    and ending positions projected on the normal plus one slice (multi-frame: frames x spacing),
    and Reconstruction Diameter, else Columns x column spacing."""
    orientation = _numbers(
        _shared(sample.first, "PlaneOrientationSequence", "ImageOrientationPatient"), 6
    )
    if orientation is None:
        return None
    row, column = orientation[:3], orientation[3:]
    normal = (
        row[1] * column[2] - row[2] * column[1],
        row[2] * column[0] - row[0] * column[2],
        row[0] * column[1] - row[1] * column[0],
    )
    length = math.sqrt(sum(n * n for n in normal))
    if length < 1e-6:
        return None
    normal = (normal[0] / length, normal[1] / length, normal[2] / length)
    field = _number(sample.first.get("ReconstructionDiameter"))
    spacing = _numbers(_shared(sample.first, "PixelMeasuresSequence", "PixelSpacing"), 2)
    columns = _number(sample.first.get("Columns"))
    if (field is None or field <= 0) and spacing is not None and columns is not None:
        field = columns * spacing[1]
    z_extent: float | None = None
    frames = _integer(sample.first.get("NumberOfFrames"))
    if sample.instances == 1 and frames is not None and frames > 1:
        step = _number(_shared(sample.first, "PixelMeasuresSequence", "SpacingBetweenSlices"))
        step = step or _thickness(sample.first)
        z_extent = frames * abs(step) if step else None
    elif sample.instances > 1:
        start = _numbers(sample.first.get("ImagePositionPatient"), 3)
        end = _numbers(sample.last.get("ImagePositionPatient"), 3)
        if start is not None and end is not None:
            distance = abs(sum((e - s) * n for s, e, n in zip(start, end, normal, strict=True)))
            if distance > 0:
                z_extent = distance + distance / (sample.instances - 1)
    if field is None and z_extent is None:
        return None
    return Geometry(z_extent, field, abs(normal[2]) >= AXIAL_MIN_COSINE)


def _code_meanings(items: Any, keyword: str) -> list[str]:
    meanings = []
    for item in items or []:
        for code in item.get(keyword, []) or []:
            meaning = _text(code.get("CodeMeaning"))
            if meaning:
                meanings.append(meaning)
    return meanings


def descriptions(
    ds: Dataset, series_description: str | None, study_description: str | None
) -> list[tuple[str, str]]:
    """The free-text evidence of a series' body region, most specific first."""
    requested = [_text(ds.get("RequestedProcedureDescription"))]
    for item in ds.get("RequestAttributesSequence", []) or []:
        requested.append(_text(item.get("RequestedProcedureDescription")))
        requested.append(_text(item.get("ScheduledProcedureStepDescription")))
    requested += _code_meanings(
        ds.get("RequestAttributesSequence"), "RequestedProcedureCodeSequence"
    )
    found = [
        (SERIES_DESCRIPTION, series_description),
        ("protocol name", _text(ds.get("ProtocolName"))),
        ("study description", study_description),
        ("requested procedure", " / ".join(dict.fromkeys(r for r in requested if r))),
        ("procedure code", " / ".join(_code_meanings([ds], "ProcedureCodeSequence"))),
    ]
    return [(what, text) for what, text in found if text]


def series_facts(sample: SeriesSample, recorded: Recorded | None = None) -> SeriesFacts:
    """What routing knows of one series: its leading header, else what the catalog recorded."""
    ds, known = sample.first, recorded or Recorded()
    slices = sample.instances
    frames = _integer(ds.get("NumberOfFrames"))
    if slices == 1 and frames is not None:
        slices = frames
    body_part = _text(ds.get("BodyPartExamined")) or known.body_part
    study_description = _text(ds.get("StudyDescription")) or known.study_description
    series_description = _text(ds.get("SeriesDescription")) or known.series_description
    evidence = descriptions(ds, series_description, study_description)
    series_number = _integer(ds.get("SeriesNumber"))
    return SeriesFacts(
        series_uid=sample.series_uid,
        modality=_text(ds.get("Modality")) or known.modality,
        body_part=body_part,
        study_description=study_description,
        series_description=series_description,
        sop_class=_text(ds.get("SOPClassUID")),
        calling_ae=sample.calling_ae,
        manufacturer=_text(ds.get("Manufacturer")),
        image_type=tuple(str(v) for v in ds.get("ImageType", []) or []),
        body_region=body_region(body_part, evidence, geometry(sample)),
        slices=slices,
        slice_thickness=_thickness(ds),
        series_number=known.series_number if series_number is None else series_number,
        produced_by_node=produced_by_node(ds),
    )


def series_order(facts: SeriesFacts) -> tuple[bool, int, str]:
    """The order series are evaluated and shown in: by Series Number, then UID."""
    return (facts.series_number is None, facts.series_number or 0, facts.series_uid)


def _read(spool: Spool, relpath: str, series_uid: str) -> Dataset:
    try:
        return read_spooled_header(spool.path(relpath), past_routing_tags)
    except (OSError, ValueError, IngestError) as exc:
        log.warning(
            "series header unreadable", extra={"series_uid": series_uid, "reason": str(exc)}
        )
        return Dataset()


def study_facts(session: Session, spool: Spool, study_uid: str) -> list[SeriesFacts]:
    """Every series of a catalogued study, read from the catalog and the spool."""
    study = session.scalars(select(Study).where(Study.study_uid == study_uid)).one()
    facts: list[SeriesFacts] = []
    for series in study.series:
        rows = session.execute(
            select(
                Instance.instance_number,
                Instance.sop_instance_uid,
                Instance.path,
                Instance.calling_ae,
            ).where(Instance.series_id == series.id)
        ).all()
        ordered: Sequence[Any] = sorted(rows, key=lambda r: header_order(r[0], r[1]))
        first = last = Dataset()
        calling = study.calling_ae
        if ordered:
            first = _read(spool, ordered[0].path, series.series_uid)
            last = first if len(ordered) == 1 else _read(spool, ordered[-1].path, series.series_uid)
            calling = ordered[0].calling_ae or calling
        sample = SeriesSample(series.series_uid, len(ordered), first, last, calling)
        recorded = Recorded(
            modality=series.modality,
            body_part=series.body_part,
            series_description=series.series_description,
            study_description=study.study_description,
            series_number=series.series_number,
        )
        facts.append(series_facts(sample, recorded))
    return sorted(facts, key=series_order)
