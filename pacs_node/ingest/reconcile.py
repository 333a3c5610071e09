"""Startup reconciliation: every file in the spool has its catalog row.

An instance is acknowledged once its file is in the spool; its row may still have been queued
when the process died. At start the spool is compared with the catalog and missing rows are
recorded from the files' own headers, so nothing acknowledged is ever invisible.
"""

from __future__ import annotations

import logging
from datetime import UTC, datetime

from pydicom import dcmread

from pacs_node.catalog.studies import known_paths
from pacs_node.errors import IngestError
from pacs_node.ingest.header import read_header
from pacs_node.ingest.recorder import CatalogRecorder
from pacs_node.ingest.spool import Spool
from pacs_node.refs import InstanceRef

log = logging.getLogger(__name__)

BATCH = 500


def _ref_from_file(spool: Spool, relpath: str) -> InstanceRef:
    path = spool.path(relpath)
    ds = dcmread(path, stop_before_pixels=True)
    header = read_header(ds)
    meta = ds.file_meta
    calling = meta.get("SourceApplicationEntityTitle")
    stat = path.stat()
    return InstanceRef(
        header=header,
        transfer_syntax_uid=str(meta.TransferSyntaxUID),
        path=relpath,
        size_bytes=stat.st_size,
        received_at=datetime.fromtimestamp(stat.st_mtime, UTC),
        calling_ae=str(calling).strip() if calling else None,
        sha256=spool.digest(relpath),
    )


def _modified_since(spool: Spool, relpath: str, since: float) -> bool:
    try:
        return spool.path(relpath).stat().st_mtime >= since
    except FileNotFoundError:  # removed meanwhile
        return False


def reconcile(spool: Spool, recorder: CatalogRecorder, *, since: float | None = None) -> int:
    """Record spooled files the catalog lacks; return how many were recorded.

    At start (``since`` None) it also removes partial files. While the node runs (an SCP worker
    died between spooling a file and handing over its row) it looks only at files modified at
    or after ``since``, and leaves ``.incoming`` to the live workers writing there.
    """
    if since is None:
        removed = spool.clean_incoming()
        if removed:
            log.info("removed unacknowledged partial files", extra={"files": removed})
    with recorder.catalog.sessions() as session:
        known = known_paths(session)
    missing = [
        relpath
        for relpath in spool.walk()
        if relpath not in known and (since is None or _modified_since(spool, relpath, since))
    ]
    recorded = 0
    batch: list[InstanceRef] = []
    for relpath in missing:
        try:
            batch.append(_ref_from_file(spool, relpath))
        except (IngestError, OSError, ValueError) as exc:
            # Written by us after validation, so this means outside tampering: keep the file.
            log.error("spool file cannot be read", extra={"path": relpath, "reason": str(exc)})
            continue
        if len(batch) >= BATCH:
            recorded += recorder.record(batch).recorded
            batch = []
    if batch:
        recorded += recorder.record(batch).recorded
    if missing:
        log.info("catalog reconciled from spool", extra={"instances": recorded})
    return recorded
