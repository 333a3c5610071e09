"""Stored results: each object's bytes written once, atomically, under ``data_dir/results/<job>/``,
and one ``results`` row per object naming its encodings. Dispatch reads these files and never
rebuilds an object, so a retry re-sends exactly the bytes that were built.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from pathlib import Path

from sqlalchemy.orm import Session

from pacs_node.catalog.models import Result, utcnow
from pacs_node.datadir import fsync_dir

FHIR_MEDIA_TYPE = "application/fhir+json"
PDF_MEDIA_TYPE = "application/pdf"
_SAFE = re.compile(r"[^0-9A-Za-z.+-]")


@dataclass(frozen=True)
class StoredEncoding:
    """One encoding of one result object, as the worker hands it over."""

    kind: str
    sop_class_uid: str | None
    sop_instance_uid: str | None
    series_uid: str | None
    encoding: str  # transfer syntax UID, or a media type for non-DICOM objects
    data: bytes
    patient_search: str | None = None
    destination: str | None = None  # built for this destination only (a FHIR Bundle)
    primary: bool = True  # False: a second encoding of the primary object of the same kind


def write_atomic(path: Path, data: bytes, *, fsync: bool = True) -> None:
    """Write to a temporary name, fsync, rename: a reader sees the whole file or none."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    with tmp.open("wb") as handle:
        handle.write(data)
        if fsync:
            handle.flush()
            os.fsync(handle.fileno())
    os.replace(tmp, path)
    if fsync:
        fd = os.open(path.parent, os.O_RDONLY | os.O_DIRECTORY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def _file_name(item: StoredEncoding, index: int) -> str:
    stem = item.sop_instance_uid or f"{item.kind}-{index}"
    suffix = ".json" if item.encoding == FHIR_MEDIA_TYPE else ".dcm"
    if item.encoding == PDF_MEDIA_TYPE:
        suffix = ".pdf"
    return _SAFE.sub("_", f"{stem}.{item.encoding}")[:200] + suffix


def attempt_folder(job_id: int, attempt: int) -> str:
    """Each attempt of a job writes its own folder, so an attempt that is abandoned (its worker
    was presumed dead) can never remove or overwrite the files of the attempt that counts."""
    return f"{job_id}/{attempt}"


def write_files(
    results_dir: Path, folder: str, items: list[StoredEncoding], *, fsync: bool = True
) -> list[str]:
    """Write every encoding's bytes under ``folder``; their paths relative to ``results_dir``."""
    relpaths: list[str] = []
    for index, item in enumerate(items):
        relpath = f"{folder}/{_file_name(item, index)}"
        write_atomic(results_dir / relpath, item.data, fsync=fsync)
        relpaths.append(relpath)
    if fsync:  # the new folders' own entries, up to the data folder, before a row names them
        directory = results_dir / folder
        while directory != results_dir.parent and results_dir in (directory, *directory.parents):
            directory = directory.parent
            fsync_dir(directory)
    return relpaths


def add_result_rows(
    session: Session, job_id: int, items: list[StoredEncoding], relpaths: list[str]
) -> list[tuple[int, str]]:
    """One row per object (alternates join the primary of their kind); (id, kind) of each."""
    rows: list[Result] = []
    by_kind: dict[str, Result] = {}
    encodings: dict[int, dict[str, str]] = {}
    now = utcnow()
    for item, relpath in zip(items, relpaths, strict=True):
        if not item.primary and item.kind in by_kind:
            row = by_kind[item.kind]
            encodings[id(row)][item.encoding] = relpath
            row.size_bytes += len(item.data)
            continue
        row = Result(
            job_id=job_id,
            kind=item.kind,
            sop_class_uid=item.sop_class_uid,
            sop_instance_uid=item.sop_instance_uid,
            series_uid=item.series_uid,
            encodings={},
            size_bytes=len(item.data),
            patient_search=item.patient_search,
            destination=item.destination,
            created_at=now,
        )
        rows.append(row)
        by_kind.setdefault(item.kind, row)
        encodings[id(row)] = {item.encoding: relpath}
    for row in rows:
        row.encodings = encodings[id(row)]  # insertion order: preferred first
        session.add(row)
    session.flush()
    return [(row.id, row.kind) for row in rows]
