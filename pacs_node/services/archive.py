"""What the node holds, as its own DICOMweb serves it: the instances it received (files in the
spool) and the result objects it produced (files under ``data_dir/results``), the latter filed
under the study they were made from.

A result whose job an operator rejected is not served at all (IOCM: rejected objects disappear
from the archive's own query and retrieve); :func:`result_visible` is the one place that says so
for the node's own copy, :func:`received_visible` for a copy the PACS sent back to the node.
FHIR Bundles have no SOP Instance UID and are not DICOM: they are never part of the archive.

Result files are immutable once written (see :mod:`pacs_node.catalog.results`), so their headers
are read once and cached (:func:`stored_header`).
"""

from __future__ import annotations

import functools
import logging
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from pydicom import Dataset, dcmread
from pydicom.errors import InvalidDicomError
from sqlalchemy import ColumnElement, or_, select
from sqlalchemy.orm import Session

from pacs_node.catalog.db import Catalog
from pacs_node.catalog.models import Instance, Job, Result, Series, Study
from pacs_node.catalog.quality import REJECTED
from pacs_node.config import Settings
from pacs_node.ingest.spool import Spool

log = logging.getLogger(__name__)

HEADER_CACHE_SIZE = 4096


def result_visible() -> ColumnElement[bool]:
    """The IOCM filter: a result is served unless an operator rejected its job's result."""
    return or_(Job.qa_decision.is_(None), Job.qa_decision != REJECTED)


def received_visible() -> ColumnElement[bool]:
    """The IOCM filter for received instances: a PACS that forwards everything sends the node's
    results back, and a rejected one must not come back to life as a received instance."""
    rejected = (
        select(Result.sop_instance_uid)
        .join(Job, Result.job_id == Job.id)
        .where(Job.qa_decision == REJECTED, Result.sop_instance_uid.is_not(None))
    )
    return Instance.sop_instance_uid.not_in(rejected)


@dataclass(frozen=True, slots=True)
class StoredObject:
    """One DICOM object the node serves: its UIDs and its stored encodings, preferred first."""

    study_uid: str
    series_uid: str
    sop_class_uid: str
    sop_instance_uid: str
    encodings: tuple[tuple[str, Path], ...]  # (transfer syntax UID, file)
    produced: bool  # a result of this node, not a received instance
    instance_number: int | None = None  # received instances: from the catalog
    row_id: int = 0  # the catalog row (instances or results), for a stable order

    @property
    def path(self) -> Path:
        return self.encodings[0][1]

    @property
    def transfer_syntax_uid(self) -> str:
        return self.encodings[0][0]

    def header(self) -> Dataset:
        """The stored file's header, without pixel data (cached: never change it)."""
        return stored_header(self.path)


@functools.lru_cache(maxsize=HEADER_CACHE_SIZE)
def _read_header(path: str, _mtime_ns: int, _size: int) -> Dataset:
    return dcmread(path, stop_before_pixels=True)


def stored_header(path: Path) -> Dataset:
    """A stored file's header without its pixel data, read once per file version."""
    stat = path.stat()
    return _read_header(str(path), stat.st_mtime_ns, stat.st_size)


def header_or_none(path: Path) -> Dataset | None:
    """:func:`stored_header`, or None (logged) when the file is gone or unreadable."""
    try:
        return stored_header(path)
    except (OSError, InvalidDicomError) as exc:
        log.warning("stored file unreadable", extra={"path": str(path), "error": str(exc)})
        return None


@dataclass(frozen=True)
class Archive:
    """Where the stored files are: the spool for received instances, the results folder for
    what the node produced."""

    catalog: Catalog
    spool: Spool
    results_dir: Path

    @classmethod
    def of(cls, settings: Settings, catalog: Catalog, spool: Spool) -> Archive:
        return cls(catalog, spool, settings.node.data_dir / "results")

    def received(self, instance: Instance, series_uid: str, study_uid: str) -> StoredObject:
        return StoredObject(
            study_uid=study_uid,
            series_uid=series_uid,
            sop_class_uid=instance.sop_class_uid,
            sop_instance_uid=instance.sop_instance_uid,
            encodings=((instance.transfer_syntax_uid, self.spool.path(instance.path)),),
            produced=False,
            instance_number=instance.instance_number,
            row_id=instance.id,
        )

    def produced(self, result: Result, study_uid: str) -> StoredObject | None:
        """A result row as a served object; None for non-DICOM results (FHIR)."""
        if not (result.sop_instance_uid and result.sop_class_uid and result.series_uid):
            return None
        return StoredObject(
            study_uid=study_uid,
            series_uid=result.series_uid,
            sop_class_uid=result.sop_class_uid,
            sop_instance_uid=result.sop_instance_uid,
            encodings=tuple(
                (syntax, self.results_dir / relpath) for syntax, relpath in result.encodings.items()
            ),
            produced=True,
            row_id=result.id,
        )

    def objects(
        self, study_uid: str, series_uid: str | None = None, sop_instance_uid: str | None = None
    ) -> list[StoredObject]:
        """Every object of a study (or of one series, or one instance): received ones first,
        in the order they were recorded, then the visible results."""
        with self.catalog.sessions() as session:
            return self._received(session, study_uid, series_uid, sop_instance_uid) + (
                self._produced(session, study_uid, series_uid, sop_instance_uid)
            )

    def _received(
        self,
        session: Session,
        study_uid: str,
        series_uid: str | None,
        sop_instance_uid: str | None,
    ) -> list[StoredObject]:
        stmt = (
            select(Instance, Series.series_uid)
            .join(Series, Instance.series_id == Series.id)
            .join(Study, Series.study_id == Study.id)
            .where(Study.study_uid == study_uid, received_visible())
            .order_by(Series.id, Instance.instance_number, Instance.id)
        )
        if series_uid is not None:
            stmt = stmt.where(Series.series_uid == series_uid)
        if sop_instance_uid is not None:
            stmt = stmt.where(Instance.sop_instance_uid == sop_instance_uid)
        return [self.received(i, s, study_uid) for i, s in session.execute(stmt)]

    def _produced(
        self,
        session: Session,
        study_uid: str,
        series_uid: str | None,
        sop_instance_uid: str | None,
    ) -> list[StoredObject]:
        stmt = (
            select(Result)
            .join(Job, Result.job_id == Job.id)
            .join(Study, Job.study_id == Study.id)
            .where(Study.study_uid == study_uid, result_visible())
            .where(Result.sop_instance_uid.is_not(None))
            .order_by(Result.id)
        )
        if series_uid is not None:
            stmt = stmt.where(Result.series_uid == series_uid)
        if sop_instance_uid is not None:
            stmt = stmt.where(Result.sop_instance_uid == sop_instance_uid)
        found = (self.produced(r, study_uid) for r in session.scalars(stmt))
        return not_received(session, [o for o in found if o is not None])


def not_received(session: Session, produced: Sequence[StoredObject]) -> list[StoredObject]:
    """``produced`` less the results that came back to the node as received instances (a PACS
    forwarding everything): those are served once, as received."""
    uids = [o.sop_instance_uid for o in produced]
    echoed: set[str] = set()
    for start in range(0, len(uids), 500):
        echoed.update(
            session.scalars(
                select(Instance.sop_instance_uid).where(
                    Instance.sop_instance_uid.in_(uids[start : start + 500])
                )
            )
        )
    return [o for o in produced if o.sop_instance_uid not in echoed]
