"""Startup reconciliation: every file in the spool has its catalog row.

An instance is acknowledged once its file is in the spool; its row may still have been queued
when the process died. At start the spool is compared with the catalog and missing rows are
recorded from the files' own headers, so nothing acknowledged is ever invisible. Copies kept
apart in the spool's quarantine area are looked at too: one without its row is recorded in
quarantine.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Collection, Iterable, Iterator
from dataclasses import replace
from datetime import UTC, datetime

from pydicom.filereader import read_file_meta_info

from pacs_node.catalog.quarantine import lookup_held
from pacs_node.catalog.studies import known_paths
from pacs_node.errors import IngestError
from pacs_node.ingest.header import read_header, read_received_file
from pacs_node.ingest.identity import Held, Reason, Verdict, decide, header_key
from pacs_node.ingest.recorder import CatalogRecorder
from pacs_node.ingest.routing_header import read_routing_header
from pacs_node.ingest.spool import QUARANTINE, SUFFIX, Spool
from pacs_node.refs import InstanceRef

log = logging.getLogger(__name__)

BATCH = 500


def _ref_from_file(spool: Spool, relpath: str) -> InstanceRef:
    path = spool.path(relpath)
    # read as the receive path reads a data set, so its facts are those a receipt records
    ds = read_received_file(path)
    header = read_header(ds)
    meta = read_file_meta_info(path)
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
        routing=read_routing_header(ds),
    )


def _modified_since(spool: Spool, relpath: str, since: float) -> bool:
    try:
        return spool.path(relpath).stat().st_mtime >= since
    except FileNotFoundError:  # removed meanwhile
        return False


def reconcile(
    spool: Spool,
    recorder: CatalogRecorder,
    *,
    since: float | None = None,
    live: Collection[str] = (),
    older_than_s: float = 0.0,
) -> int:
    """Record spooled files the catalog lacks; return how many were recorded.

    At start (``since`` None) it also removes partial files: this node's own, and those of
    nodes not in ``live`` (the other nodes running on the shared data path, whose files are
    being written) last modified more than ``older_than_s`` ago. While the node runs (an SCP
    worker died between spooling a file and handing over its row) it looks only at files
    modified at or after ``since``, and leaves
    ``.incoming`` to the live workers writing there.
    """
    if since is None:
        removed = spool.clean_incoming(live, older_than_s=older_than_s)
        if removed:
            log.info("removed unacknowledged partial files", extra={"files": removed})
    recorded = _record_missing(spool, recorder, spool.walk(), since, apart=False)
    # then the quarantine area: copies kept apart when acknowledged, whose row never committed
    held = _record_missing(spool, recorder, _walk_quarantine(spool), since, apart=True)
    if recorded or held:
        log.info("catalog reconciled from spool", extra={"instances": recorded, "held": held})
    return recorded


def _walk_quarantine(spool: Spool) -> Iterator[str]:
    """``.quarantine/<SOP Instance UID>/<sha256>.dcm``: every copy kept apart."""
    for sop in os.scandir(spool.quarantine):
        if not sop.is_dir():
            continue
        for entry in os.scandir(sop.path):
            if entry.name.endswith(SUFFIX) and entry.is_file():
                yield f"{QUARANTINE}/{sop.name}/{entry.name}"


def _record_missing(
    spool: Spool,
    recorder: CatalogRecorder,
    relpaths: Iterable[str],
    since: float | None,
    *,
    apart: bool,
) -> int:
    """Record the files of ``relpaths`` the catalog does not account for; ``apart``: they are
    quarantined copies (the reason is decided here: the collision they make now, else a
    re-send of other bytes)."""
    with recorder.catalog.sessions() as session:
        known = known_paths(session)
    missing = [
        relpath
        for relpath in relpaths
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
            recorded += _record(recorder, batch, apart)
            batch = []
    if batch:
        recorded += _record(recorder, batch, apart)
    return recorded


def _record(recorder: CatalogRecorder, refs: list[InstanceRef], apart: bool) -> int:
    # record_each: one instance the catalog cannot take is quarantined alone, and never stops
    # the node from starting
    if not apart:
        return recorder.record_each(refs)
    recorder.record_each(_with_reasons(recorder, refs))
    return len(refs)


def _with_reasons(recorder: CatalogRecorder, refs: list[InstanceRef]) -> list[InstanceRef]:
    with recorder.catalog.sessions() as session:
        held = lookup_held(
            session,
            {r.study_uid for r in refs},
            {r.series_uid for r in refs},
            {r.sop_instance_uid for r in refs},
        )
    out = []
    for ref in refs:
        decision = decide(
            ref.study_uid,
            ref.series_uid,
            header_key(ref.header),
            ref.sha256,
            Held.of(held, ref.study_uid, ref.series_uid, ref.sop_instance_uid),
        )
        reason = decision.reason if decision.verdict == Verdict.CONFLICT else Reason.RESEND
        out.append(replace(ref, quarantine_reason=reason))
    return out
