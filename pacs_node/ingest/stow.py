"""STOW-RS bodies into the receive path: a multipart/related body (PS3.18 10.5), read as it
arrives, each part streamed into a :class:`~pacs_node.ingest.transport.ReceivedFile` and then
handed to :meth:`~pacs_node.ingest.receive.Receiver.receive_instance`, as a C-STORE is.

The boundaries are found by python-multipart's ``MultipartParser``, the streaming parser
Starlette uses for forms: it knows nothing of form-data, only of boundaries and part headers, so
it reads multipart/related as well, holding no more than a chunk and a boundary's length.

Each part must be a DICOM Part 10 file (PS3.10 7.1): its File Meta Information announces the
SOP Class, SOP Instance and Transfer Syntax the data set is then checked against. A part
without the 128-byte preamble (starting at ``DICM``) is taken as if the preamble were there;
a part with no ``DICM`` prefix, or whose meta lacks its Group Length (0002,0000), or whose meta
is longer than :data:`META_LIMIT_BYTES`, is refused (Cannot understand) with the reason. The
node writes its own preamble and meta in front of the data set, as for C-STORE, so the stored
data set bytes are the part's own.

Everything here blocks (files, the catalog): the web door calls it off the event loop.
"""

from __future__ import annotations

import logging
import struct
from dataclasses import dataclass

from python_multipart.exceptions import MultipartParseError
from python_multipart.multipart import MultipartParser, parse_options_header

from pacs_node.errors import IngestError, MalformedBody, OutOfResources, UnreadableDataset
from pacs_node.ingest.part10 import PREAMBLE
from pacs_node.ingest.receive import Announced, Receiver
from pacs_node.ingest.scp import FAILED_COUNTER
from pacs_node.ingest.statuses import status_for
from pacs_node.ingest.transport import ReceivedFile
from pacs_node.statuses import is_stored

log = logging.getLogger(__name__)

DICOM_MEDIA_TYPE = "application/dicom"
META_LIMIT_BYTES = 64 * 2**10  # a File Meta Information group longer than this is refused
_PREFIX = len(PREAMBLE)  # 128-byte preamble + "DICM"
_GROUP_LENGTH_TAG = b"\x02\x00\x00\x00UL\x04\x00"
_PART_HEADER_LIMIT = 8 * 2**10
# RFC 2046 allows 70 characters, but Orthanc's DICOMweb client sends two UUIDs (73); the parser
# takes up to 256.
MAX_BOUNDARY_LENGTH = 200


@dataclass(frozen=True, slots=True)
class PartResult:
    """What became of one part: its DICOM status and the UIDs known for it."""

    status: int
    sop_class_uid: str | None = None
    sop_instance_uid: str | None = None
    study_uid: str | None = None
    series_uid: str | None = None
    reason: str = ""
    oversized: bool = False

    @property
    def stored(self) -> bool:
        return is_stored(self.status)


def multipart_boundary(content_type: str) -> str | None:
    """The boundary of a ``multipart/related; type="application/dicom"`` Content-Type, or None
    for any other media type (a ``type`` other than application/dicom included)."""
    media_type, options = parse_options_header(content_type)
    if media_type != b"multipart/related":
        return None
    kind = options.get(b"type", DICOM_MEDIA_TYPE.encode()).decode("latin-1").strip().lower()
    boundary = options.get(b"boundary", b"").decode("latin-1")
    if kind != DICOM_MEDIA_TYPE or not boundary or len(boundary) > MAX_BOUNDARY_LENGTH:
        return None
    return boundary


class _Part10Front:
    """Checks a part's first bytes (preamble, ``DICM``, meta group length) before they reach
    the :class:`ReceivedFile`; then passes the rest through untouched."""

    def __init__(self, received: ReceivedFile) -> None:
        self.received = received
        self._head = bytearray()
        self.checked = False
        self.error: IngestError | None = None

    def write(self, data: bytes) -> None:
        if self.error is not None:
            return
        if self.checked:
            self.received.write(data)
            return
        self._head += data
        if len(self._head) >= 4 and self._head[:4] == b"DICM":
            self._head[0:0] = b"\x00" * (_PREFIX - 4)  # no preamble: as if it were there
        if len(self._head) < _PREFIX + 12:
            return
        self._check(bytes(self._head[: _PREFIX + 12]))
        if self.error is None:
            self.checked = True
            self.received.write(bytes(self._head))
        self._head = bytearray()

    def _check(self, head: bytes) -> None:
        if head[_PREFIX - 4 : _PREFIX] != b"DICM":
            self.error = UnreadableDataset("part is not a DICOM Part 10 file (no DICM prefix)")
        elif head[_PREFIX : _PREFIX + 8] != _GROUP_LENGTH_TAG:
            self.error = UnreadableDataset(
                "File Meta Information lacks its Group Length (0002,0000)"
            )
        else:
            (length,) = struct.unpack("<I", head[_PREFIX + 8 : _PREFIX + 12])
            if length > META_LIMIT_BYTES:
                self.error = UnreadableDataset("File Meta Information is too long")

    def finish(self) -> None:
        if self.error is not None:
            raise self.error
        if not self.checked:
            raise UnreadableDataset("part ends before its File Meta Information")


class _Part:
    def __init__(self) -> None:
        self.headers: dict[str, str] = {}
        self.field = bytearray()
        self.value = bytearray()
        self.size = 0
        self.received: ReceivedFile | None = None
        self.front: _Part10Front | None = None
        self.refused: IngestError | None = None


class StowBody:
    """Feed a STOW-RS body to :meth:`write` chunk by chunk, then :meth:`close`; each part is
    stored (or refused) as soon as it ends, and :attr:`results` lists one entry per part."""

    def __init__(
        self,
        receiver: Receiver,
        boundary: str,
        study_uid: str | None = None,
        sender: str | None = None,
    ) -> None:
        """``study_uid``: the study of a ``/studies/{study}`` request; ``sender``: the user
        (recorded in the study's events, STOW-RS having no AE title)."""
        self.receiver = receiver
        self.study_uid = study_uid
        self.sender = sender
        self.results: list[PartResult] = []
        self._part: _Part | None = None
        self._ended = False
        self._parser = MultipartParser(
            boundary.encode("latin-1"),
            {
                "on_part_begin": self._begin,
                "on_header_field": self._header_field,
                "on_header_value": self._header_value,
                "on_header_end": self._header_end,
                "on_headers_finished": self._headers_finished,
                "on_part_data": self._data,
                "on_part_end": self._end,
                "on_end": self._body_end,
            },
        )

    def write(self, chunk: bytes) -> None:
        if self._ended:
            return  # the epilogue after the close delimiter is ignored (RFC 2046 5.1.1)
        try:
            self._parser.write(chunk)
        except MultipartParseError as exc:
            self.abort()
            raise MalformedBody(f"multipart body cannot be read: {exc}") from exc

    def close(self) -> list[PartResult]:
        """The results; :class:`MalformedBody` when the body ended before its close delimiter."""
        if not self._ended:
            self.abort()
            raise MalformedBody("multipart body ends before its close delimiter")
        return self.results

    def abort(self) -> None:
        """Drop the part being received (the client went away, or the body is malformed)."""
        part, self._part = self._part, None
        if part is not None and part.received is not None:
            part.received.remove()

    # -- parser callbacks ------------------------------------------------------------------

    def _begin(self) -> None:
        self._part = _Part()

    def _header_field(self, data: bytes, start: int, end: int) -> None:
        self._header_bytes(self._current.field, data[start:end])

    def _header_value(self, data: bytes, start: int, end: int) -> None:
        self._header_bytes(self._current.value, data[start:end])

    def _header_bytes(self, into: bytearray, data: bytes) -> None:
        part = self._current
        part.size += len(data)
        if part.size > _PART_HEADER_LIMIT:
            raise MultipartParseError("part headers are too long")
        into += data

    def _header_end(self) -> None:
        part = self._current
        name = part.field.decode("latin-1").strip().lower()
        part.headers[name] = part.value.decode("latin-1").strip()
        part.field.clear()
        part.value.clear()

    def _headers_finished(self) -> None:
        part = self._current
        content_type = part.headers.get("content-type")
        if content_type is not None:
            media_type, _ = parse_options_header(content_type)
            if media_type != DICOM_MEDIA_TYPE.encode():
                shown = media_type.decode("latin-1")[:60]
                part.refused = UnreadableDataset(f"part of media type {shown!r} is not DICOM")
                return
        try:
            part.received = self.receiver.incoming("")
        except OSError as exc:  # no file to write it to (disk full, no descriptor left)
            part.refused = OutOfResources(f"the spool cannot take it: {exc.strerror or exc}")
            return
        part.front = _Part10Front(part.received)

    def _data(self, data: bytes, start: int, end: int) -> None:
        part = self._current
        if part.front is not None:
            part.front.write(data[start:end])

    def _end(self) -> None:
        part, self._part = self._current, None
        result = self._store(part)
        if not result.stored:
            self.receiver.recorder.count(FAILED_COUNTER)
            log.warning(
                "STOW-RS part refused",
                extra={"status": f"0x{result.status:04X}", "reason": result.reason},
            )
        self.results.append(result)

    def _body_end(self) -> None:
        self._ended = True

    @property
    def _current(self) -> _Part:
        if self._part is None:  # the parser calls part_begin first
            raise MultipartParseError("part data outside a part")
        return self._part

    # -- one part into the receive path -----------------------------------------------------

    def _store(self, part: _Part) -> PartResult:
        received = part.received
        if part.refused is not None or received is None or part.front is None:
            error = part.refused or UnreadableDataset("part has no content")
            return PartResult(status_for(error), reason=str(error))
        uids: tuple[str, str, str] | None = None
        try:
            part.front.finish()
            uids = received.meta_uids
            if uids is None:
                received.finish()  # raises the error met while writing the meta
                raise UnreadableDataset("File Meta Information cannot be read")
            announced = Announced(
                sop_class_uids=(uids[0],),
                sop_instance_uid=uids[1],
                transfer_syntax_uid=uids[2],
                study_uid=self.study_uid,
            )
            receipt = self.receiver.receive_instance(received, announced, None, sender=self.sender)
        except IngestError as exc:
            received.remove()
            return self._failed(exc, uids, oversized=received.oversized)
        except Exception as exc:  # one bad part must not fail the others
            received.remove()
            log.exception("STOW-RS part failed")
            failure = _failed_internally(exc)
            return self._failed(failure, uids, status=status_for(exc))
        header = receipt.header
        return PartResult(
            receipt.status,
            header.sop_class_uid,
            header.sop_instance_uid,
            header.study_uid,
            header.series_uid,
        )

    @staticmethod
    def _failed(
        error: IngestError,
        uids: tuple[str, str, str] | None,
        *,
        oversized: bool = False,
        status: int | None = None,
    ) -> PartResult:
        sop_class, sop_instance = (uids[0], uids[1]) if uids is not None else (None, None)
        return PartResult(
            status if status is not None else status_for(error),
            sop_class,
            sop_instance,
            reason=str(error),
            oversized=oversized and isinstance(error, OutOfResources),
        )


def _failed_internally(exc: Exception) -> IngestError:
    return IngestError(f"internal error: {type(exc).__name__}")
