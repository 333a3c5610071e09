"""What routing sees of a series, computed the same way for the node and for files on a disk.

A series is read as a :class:`SeriesSample`: its instance count, the calling AE, and the
:class:`~pacs_node.refs.RoutingHeader` of the instance that leads it and the one that ends it in
:func:`header_order` (lowest and highest (Instance Number, SOP Instance UID)).
:func:`series_facts` turns a sample into :class:`~pacs_node.routing.rules.SeriesFacts`.
The node takes those two headers from the catalog, which recorded them as the instances arrived
(:func:`study_facts`); a series recorded before the catalog kept them is read from the spool.
``pacs-node routes test`` reads them from files (:mod:`pacs_node.routing.files`). Either way the
header comes from :func:`~pacs_node.ingest.header.read_routing_header`, parsed up to
(5200,9229); pixel data is never read.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass

from sqlalchemy import func, select
from sqlalchemy.orm import Session

from pacs_node.catalog.models import Instance, Series, Study
from pacs_node.catalog.studies import series_headers
from pacs_node.errors import IngestError
from pacs_node.ingest.header import read_received_file
from pacs_node.ingest.routing_header import read_routing_header
from pacs_node.ingest.spool import Spool
from pacs_node.refs import RoutingHeader, header_order
from pacs_node.results.codes import PROCESSING_ALGORITHM
from pacs_node.routing.region import AXIAL_MIN_COSINE, SERIES_DESCRIPTION, Geometry, body_region
from pacs_node.routing.rules import SeriesFacts

log = logging.getLogger(__name__)

NODE_MANUFACTURER = "pacs-node"


@dataclass(frozen=True)
class SeriesSample:
    """One series as routing reads it: ``first`` and ``last`` are the headers of the instances
    that lead and end it in :func:`header_order` (the same one for a single instance)."""

    series_uid: str
    instances: int
    first: RoutingHeader
    last: RoutingHeader
    calling_ae: str | None = None


@dataclass(frozen=True)
class Recorded:
    """What the catalog recorded of a series, used where its header lacks it."""

    modality: str | None = None
    body_part: str | None = None
    series_description: str | None = None
    study_description: str | None = None
    series_number: int | None = None


def produced_by_node(header: RoutingHeader) -> bool:
    """An object this node wrote: its Contributing Equipment names us as processing algorithm
    (IHE AIR). A PACS that forwards everything back must not start a loop."""
    algorithm = (PROCESSING_ALGORITHM.value, PROCESSING_ALGORITHM.scheme)
    return any(
        maker == NODE_MANUFACTURER and algorithm in purposes
        for maker, purposes in header.contributing_equipment
    )


def geometry(sample: SeriesSample) -> Geometry | None:
    """The volume's extent along the slice normal and its field, from two headers: the leading
    and ending positions projected on the normal plus one slice (multi-frame: frames x spacing),
    and Reconstruction Diameter, else Columns x column spacing."""
    first = sample.first
    orientation = first.image_orientation_patient
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
    field = first.reconstruction_diameter
    spacing = first.pixel_spacing
    if (field is None or field <= 0) and spacing is not None and first.columns is not None:
        field = first.columns * spacing[1]
    z_extent: float | None = None
    frames = first.number_of_frames
    if sample.instances == 1 and frames is not None and frames > 1:
        step = first.spacing_between_slices or first.slice_thickness
        z_extent = frames * abs(step) if step else None
    elif sample.instances > 1:
        start, end = first.image_position_patient, sample.last.image_position_patient
        if start is not None and end is not None:
            distance = abs(sum((e - s) * n for s, e, n in zip(start, end, normal, strict=True)))
            if distance > 0:
                z_extent = distance + distance / (sample.instances - 1)
    if field is None and z_extent is None:
        return None
    return Geometry(z_extent, field, abs(normal[2]) >= AXIAL_MIN_COSINE)


def descriptions(
    header: RoutingHeader, series_description: str | None, study_description: str | None
) -> list[tuple[str, str]]:
    """The free-text evidence of a series' body region, most specific first."""
    found = [
        (SERIES_DESCRIPTION, series_description),
        ("protocol name", header.protocol_name),
        ("study description", study_description),
        ("requested procedure", " / ".join(dict.fromkeys(header.requested_procedures))),
        ("procedure code", " / ".join(header.procedure_codes)),
    ]
    return [(what, text) for what, text in found if text]


def series_facts(sample: SeriesSample, recorded: Recorded | None = None) -> SeriesFacts:
    """What routing knows of one series: its leading header, else what the catalog recorded."""
    header, known = sample.first, recorded or Recorded()
    slices = sample.instances
    if slices == 1 and header.number_of_frames is not None:
        slices = header.number_of_frames
    body_part = header.body_part_examined or known.body_part
    study_description = header.study_description or known.study_description
    series_description = header.series_description or known.series_description
    evidence = descriptions(header, series_description, study_description)
    return SeriesFacts(
        series_uid=sample.series_uid,
        modality=header.modality or known.modality,
        body_part=body_part,
        study_description=study_description,
        series_description=series_description,
        sop_class=header.sop_class_uid,
        calling_ae=sample.calling_ae,
        manufacturer=header.manufacturer,
        image_type=header.image_type,
        body_region=body_region(body_part, evidence, geometry(sample)),
        slices=slices,
        slice_thickness=header.slice_thickness,
        series_number=known.series_number if header.series_number is None else header.series_number,
        produced_by_node=produced_by_node(header),
    )


def series_order(facts: SeriesFacts) -> tuple[bool, int, str]:
    """The order series are evaluated and shown in: by Series Number, then UID."""
    return (facts.series_number is None, facts.series_number or 0, facts.series_uid)


def _read(spool: Spool, relpath: str, series_uid: str) -> RoutingHeader:
    try:
        return read_routing_header(read_received_file(spool.path(relpath)))
    except (OSError, ValueError, IngestError) as exc:
        log.warning(
            "series header unreadable", extra={"series_uid": series_uid, "reason": str(exc)}
        )
        return RoutingHeader()


def _sample_from_spool(
    session: Session, spool: Spool, series: Series, calling_ae: str | None
) -> SeriesSample:
    """A series the catalog recorded no headers for (recorded before it kept them): its
    leading and ending instances' files are read, as they were before."""
    rows = session.execute(
        select(
            Instance.instance_number,
            Instance.sop_instance_uid,
            Instance.path,
            Instance.calling_ae,
        ).where(Instance.series_id == series.id)
    ).all()
    ordered = sorted(rows, key=lambda r: header_order(r[0], r[1]))
    first = last = RoutingHeader()
    if ordered:
        first = _read(spool, ordered[0].path, series.series_uid)
        last = first if len(ordered) == 1 else _read(spool, ordered[-1].path, series.series_uid)
        calling_ae = ordered[0].calling_ae or calling_ae
    return SeriesSample(series.series_uid, len(ordered), first, last, calling_ae)


def study_facts(session: Session, spool: Spool, study_uid: str) -> list[SeriesFacts]:
    """Every series of a catalogued study, from the headers the catalog recorded as its
    instances arrived; a series without them is read from the spool."""
    study = session.scalars(select(Study).where(Study.study_uid == study_uid)).one()
    counts: dict[int, int] = dict(
        session.execute(
            select(Instance.series_id, func.count())
            .join(Series, Series.id == Instance.series_id)
            .where(Series.study_id == study.id)
            .group_by(Instance.series_id)
        ).all()
    )
    facts: list[SeriesFacts] = []
    for series in study.series:
        recorded_headers = series_headers(series)
        if recorded_headers is None:
            sample = _sample_from_spool(session, spool, series, study.calling_ae)
        else:
            sample = SeriesSample(
                series.series_uid,
                counts.get(series.id, 0),
                recorded_headers.first,
                recorded_headers.last,
                recorded_headers.calling_ae or study.calling_ae,
            )
        recorded = Recorded(
            modality=series.modality,
            body_part=series.body_part,
            series_description=series.series_description,
            study_description=study.study_description,
            series_number=series.series_number,
        )
        facts.append(series_facts(sample, recorded))
    return sorted(facts, key=series_order)
