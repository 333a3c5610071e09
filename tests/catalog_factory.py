"""Put DICOM files into a node's spool and catalog as if they had been received."""

from __future__ import annotations

import json
import shutil
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

from pydicom import dcmread
from sqlalchemy import select, update
from sqlalchemy.orm import Session

from pacs_node.catalog.db import Catalog
from pacs_node.catalog.deliveries import create_deliveries
from pacs_node.catalog.jobs import add_job_event, queue_job
from pacs_node.catalog.models import Job, JobEvent, JobState, Study, utcnow
from pacs_node.catalog.results import StoredEncoding, add_result_rows, write_files
from pacs_node.catalog.studies import record_instances
from pacs_node.ingest.header import read_header
from pacs_node.ingest.routing_header import read_routing_header
from pacs_node.refs import InstanceRef

if TYPE_CHECKING:
    from pacs_node.results import ResultSet


def ingest(
    catalog: Catalog, spool_dir: Path, paths: Sequence[Path], calling_ae: str | None = "CT1"
) -> tuple[int, str, list[str]]:
    """Copy ``paths`` into the spool layout and record them; (study id, study UID, series UIDs)."""
    refs = []
    now = utcnow()
    for path in paths:
        ds = dcmread(path, stop_before_pixels=True)
        header = read_header(ds)
        relpath = f"{header.study_uid}/{header.series_uid}/{header.sop_instance_uid}.dcm"
        target = spool_dir / relpath
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(path, target)
        refs.append(
            InstanceRef(
                header=header,
                transfer_syntax_uid=str(ds.file_meta.TransferSyntaxUID),
                path=relpath,
                size_bytes=target.stat().st_size,
                received_at=now,
                calling_ae=calling_ae,
                routing=read_routing_header(ds),
            )
        )
    with catalog.sessions.begin() as session:
        record_instances(session, refs)
        study_uid = refs[0].study_uid
        study_id = session.scalar(select(Study.id).where(Study.study_uid == study_uid))
    assert study_id is not None
    series = list(dict.fromkeys(ref.series_uid for ref in refs))
    return study_id, study_uid, series


def job_events(catalog: Catalog) -> list[tuple[str, str]]:
    """Every job event as (kind, detail), oldest first."""
    with catalog.sessions() as session:
        return [
            (e.kind, json.dumps(e.detail, sort_keys=True) if e.detail else "")
            for e in session.scalars(select(JobEvent).order_by(JobEvent.id))
        ]


def stable_study(session: Session, study_uid: str = "1.2.3") -> int:
    """A stable study with nothing received yet; its row id."""
    now = utcnow()
    study = Study(
        study_uid=study_uid,
        state="stable",
        first_received_at=now,
        receiving_since=now,
        last_received_at=now,
        reopened_count=0,
        duplicate_count=0,
    )
    session.add(study)
    session.flush()
    return study.id


def queue_stored_results(
    session: Session,
    results_dir: Path,
    items: Sequence[StoredEncoding],
    destinations: dict[str, list[str]],
    study_uid: str = "1.2.3",
) -> tuple[int, list[tuple[int, str]]]:
    """A stable study with one job whose stored ``items`` are to go to ``destinations``."""
    job_id = queue_job(session, stable_study(session, study_uid), "m", ["1.2.3.4"], {})
    relpaths = write_files(results_dir, f"{job_id}/1", list(items), fsync=False)
    results = add_result_rows(session, job_id, list(items), relpaths)
    create_deliveries(session, job_id, results, destinations)
    return job_id, results


def done_job_with_results(
    catalog: Catalog,
    results_dir: Path,
    built: ResultSet,
    destinations: dict[str, list[str]],
    model_version: str = "1.0.0",
    model: str = "m",
) -> int:
    """A done job of ``built``'s study whose results are stored and due to ``destinations``
    (keyed by result kind), as a worker leaves it; its id. Jobs of one study share its row."""
    from pacs_node.worker import stored_encodings

    items = stored_encodings(built, destinations.get("fhir", []))
    with catalog.sessions.begin() as session:
        uid = built.study_instance_uid
        study_id = session.scalar(select(Study.id).where(Study.study_uid == uid))
        if study_id is None:
            study_id = stable_study(session, uid)
        job_id = queue_job(session, study_id, model, ["1.2.3.4"], {})
        relpaths = write_files(results_dir, f"{job_id}/1", items, fsync=False)
        results = add_result_rows(session, job_id, items, relpaths)
        create_deliveries(session, job_id, results, destinations)
        session.execute(update(Job).where(Job.id == job_id).values(state=JobState.DONE))
        add_job_event(session, job_id, "done", model_version=model_version)
    return job_id
