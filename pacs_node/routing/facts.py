"""What routing sees of a study: per series, catalog counts plus a few attributes read from the
header of one spooled instance (slice thickness, image type, manufacturer, our own provenance).
"""

from __future__ import annotations

import logging
from typing import Any

from pydicom import Dataset
from sqlalchemy import func, select
from sqlalchemy.orm import Session

from pacs_node.catalog.models import Instance, Study
from pacs_node.errors import IngestError
from pacs_node.ingest.header import read_spooled_header
from pacs_node.ingest.spool import Spool
from pacs_node.results.codes import PROCESSING_ALGORITHM
from pacs_node.routing.rules import SeriesFacts

log = logging.getLogger(__name__)

NODE_MANUFACTURER = "pacs-node"
# The last attribute routing reads: Shared Functional Groups Sequence (5200,9229). Everything
# after it (Per-Frame Functional Groups, pixel data) is never read, nor inflated.
_LAST_TAG_READ = 0x52009229


def _past_routing_tags(tag: Any, _vr: Any, _length: Any) -> bool:
    return int(tag) > _LAST_TAG_READ


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


def _thickness(ds: Dataset) -> float | None:
    value: Any = ds.get("SliceThickness")
    if value in (None, ""):
        for group in ds.get("SharedFunctionalGroupsSequence", []):
            for measures in group.get("PixelMeasuresSequence", []):
                value = measures.get("SliceThickness")
    try:
        return float(value) if value not in (None, "") else None
    except (TypeError, ValueError):
        return None


def _text(value: Any) -> str | None:
    text = str(value).strip() if value not in (None, "") else ""
    return text or None


def study_facts(session: Session, spool: Spool, study_uid: str) -> list[SeriesFacts]:
    study = session.scalars(select(Study).where(Study.study_uid == study_uid)).one()
    facts: list[SeriesFacts] = []
    for series in study.series:
        count, first_path = session.execute(
            select(func.count(Instance.id), func.min(Instance.path)).where(
                Instance.series_id == series.id
            )
        ).one()
        header = Dataset()
        if first_path is not None:
            try:
                header = read_spooled_header(spool.path(first_path), _past_routing_tags)
            except (OSError, ValueError, IngestError) as exc:
                log.warning(
                    "series header unreadable",
                    extra={"series_uid": series.series_uid, "reason": str(exc)},
                )
        slices = int(count)
        frames = header.get("NumberOfFrames")
        if slices == 1 and frames not in (None, ""):
            slices = int(frames)
        calling = session.scalar(
            select(Instance.calling_ae).where(Instance.series_id == series.id).limit(1)
        )
        facts.append(
            SeriesFacts(
                series_uid=series.series_uid,
                modality=series.modality,
                body_part=series.body_part,
                study_description=study.study_description,
                series_description=series.series_description,
                sop_class=_text(header.get("SOPClassUID")),
                calling_ae=calling or study.calling_ae,
                manufacturer=_text(header.get("Manufacturer")),
                image_type=tuple(str(v) for v in header.get("ImageType", []) or []),
                slices=slices,
                slice_thickness=_thickness(header),
                series_number=series.series_number,
                produced_by_node=produced_by_node(header),
            )
        )
    return facts
