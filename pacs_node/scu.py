"""A Storage and Verification SCU: what ``pacs-node send`` and ``pacs-node echo`` use (the
C-STORE itself is :mod:`pacs_node.cstore`, shared with the outbox)."""

from __future__ import annotations

import logging
import re
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

from pydicom import dcmread
from pydicom.errors import InvalidDicomError
from pynetdicom.presentation import build_context
from pynetdicom.sop_class import Verification  # type: ignore[attr-defined]

from pacs_node.aetitle import check_ae_title
from pacs_node.cstore import (
    ABORTED,
    MAX_CONTEXTS,
    NO_RESPONSE,
    StoreResult,
    accepted_pairs,
    associate,
    pair_contexts,
    store,
)
from pacs_node.dimse_client import parked
from pacs_node.statuses import SUCCESS

log = logging.getLogger(__name__)

_ADDRESS = re.compile(r"(?P<ae>[^@]{1,16})@(?P<host>\[[^\]]+\]|[^:]+):(?P<port>\d{1,5})")


@dataclass(frozen=True)
class Peer:
    ae_title: str
    host: str
    port: int

    @classmethod
    def parse(cls, text: str) -> Peer:
        """``AE@HOST:PORT`` (``AE@[::1]:104`` for IPv6)."""
        match = _ADDRESS.fullmatch(text.strip())
        if match is None:
            raise ValueError(f"expected AE@HOST:PORT, got {text!r}")
        port = int(match["port"])
        if not 1 <= port <= 65535:
            raise ValueError(f"port {port} is out of range")
        return cls(check_ae_title(match["ae"]), match["host"].strip("[]"), port)

    def __str__(self) -> str:
        return f"{self.ae_title}@{self.host}:{self.port}"


@dataclass(frozen=True)
class DicomFile:
    path: Path
    sop_class_uid: str
    transfer_syntax_uid: str


@dataclass
class SendReport:
    sent: int = 0
    failed: list[tuple[Path, str]] = field(default_factory=list)
    skipped: list[tuple[Path, str]] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.failed


def iter_paths(paths: Iterable[Path]) -> Iterator[Path]:
    for path in paths:
        if path.is_dir():
            yield from sorted(p for p in path.rglob("*") if p.is_file())
        else:
            yield path


def scan(paths: Iterable[Path], report: SendReport) -> list[DicomFile]:
    """Read the headers of every file under ``paths``; non-DICOM files are skipped with a reason."""
    files: list[DicomFile] = []
    for path in iter_paths(paths):
        try:
            ds = dcmread(path, stop_before_pixels=True)
            meta = ds.file_meta
            files.append(
                DicomFile(path, str(meta.MediaStorageSOPClassUID), str(meta.TransferSyntaxUID))
            )
        except (InvalidDicomError, AttributeError, OSError, ValueError) as exc:
            report.skipped.append((path, f"not a DICOM file: {exc}"))
    return files


def _batches(files: list[DicomFile]) -> Iterator[list[DicomFile]]:
    """Split ``files`` so no association needs more than 128 presentation contexts."""
    batch: list[DicomFile] = []
    contexts: set[tuple[str, str]] = set()
    for item in files:
        key = (item.sop_class_uid, item.transfer_syntax_uid)
        if key not in contexts and len(contexts) == MAX_CONTEXTS:
            yield batch
            batch, contexts = [], set()
        contexts.add(key)
        batch.append(item)
    if batch:
        yield batch


def send(
    files: list[DicomFile],
    peer: Peer,
    calling_ae: str,
    report: SendReport,
    progress: Callable[[int], None] = lambda _n: None,
) -> SendReport:
    """C-STORE every file as stored on disk (its own transfer syntax, nothing converted)."""
    for batch in _batches(files):
        keys = sorted({(f.sop_class_uid, f.transfer_syntax_uid) for f in batch})
        assoc = associate(calling_ae, peer.ae_title, peer.host, peer.port, pair_contexts(keys))
        if not assoc.is_established:
            reason = "association rejected" if assoc.is_rejected else "association failed"
            report.failed.extend((f.path, reason) for f in batch)
            progress(len(batch))
            continue
        try:
            accepted = accepted_pairs(assoc)
            for index, item in enumerate(batch):
                if not assoc.is_established:
                    rest = batch[index:]
                    report.failed.extend((f.path, ABORTED) for f in rest)
                    progress(len(rest))
                    break
                result = store(
                    assoc, item.sop_class_uid, {item.transfer_syntax_uid: item.path}, accepted
                )
                if result.stored:
                    report.sent += 1
                else:
                    report.failed.append((item.path, _failure(result)))
                progress(1)
        finally:
            if assoc.is_established:
                assoc.release()
    return report


def _failure(result: StoreResult) -> str:
    """A failed C-STORE in the words ``pacs-node send`` reports."""
    if result.status is not None:
        return f"status 0x{result.status:04X} {result.comment}".strip()
    return "no response" if result.problem == NO_RESPONSE else result.problem


def echo(peer: Peer, calling_ae: str) -> float:
    """C-ECHO ``peer``; return the round trip in seconds or raise ``ConnectionError``."""
    started = time.perf_counter()
    assoc = associate(
        calling_ae, peer.ae_title, peer.host, peer.port, [build_context(Verification)]
    )
    if not assoc.is_established:
        raise ConnectionError("association rejected" if assoc.is_rejected else "no association")
    try:
        status = parked(assoc).send_c_echo()
    finally:
        assoc.release()
    code = int(getattr(status, "Status", -1)) if status else -1
    if code != SUCCESS:
        raise ConnectionError(f"C-ECHO answered status 0x{code:04X}" if code >= 0 else "no reply")
    return time.perf_counter() - started
