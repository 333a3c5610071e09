"""Read the attributes of a received data set the node keeps, decoded in its own character set:
the identifying ones the catalog files it by, parsed in one pass with those routing reads
(:mod:`pacs_node.ingest.routing_header`)."""

from __future__ import annotations

import zlib
from collections.abc import Callable, Collection
from pathlib import Path
from typing import Any, BinaryIO

from pydicom import config as pydicom_config
from pydicom.datadict import tag_for_keyword
from pydicom.dataset import Dataset
from pydicom.filereader import _read_file_meta_info, read_dataset
from pydicom.uid import UID

from pacs_node.errors import OutOfResources, UnreadableDataset
from pacs_node.ingest.routing_header import ROUTING_KEYWORDS
from pacs_node.refs import InstanceHeader
from pacs_node.uids import require_uid


def skip_value_validation() -> None:
    """Have pydicom read values without judging them, from now on in this process.

    The catalog's attributes are read for the catalog, not judged: UIDs are checked by our own
    rules, and pydicom's per-value validation warnings cost a third of the C-STORE handler's
    time. The setting is pydicom's one process-wide mode, so each process that receives sets it
    when it starts (the node, every SCP worker), and no import changes it."""
    pydicom_config.settings.reading_validation_mode = pydicom_config.IGNORE


def _text(ds: Dataset, keyword: str, limit: int = 64) -> str | None:
    value: Any = ds.get(keyword)
    if value is None or value == "":
        return None
    if isinstance(value, (list, tuple)) or type(value).__name__ == "MultiValue":
        value = "\\".join(str(v) for v in value)
    text = str(value).strip()
    return text[:limit] or None


INT32_MIN, INT32_MAX = -(2**31), 2**31 - 1


def _integer(ds: Dataset, keyword: str) -> int | None:
    value: Any = ds.get(keyword)
    if value is None or value == "":
        return None
    try:
        number = int(value)
    except (TypeError, ValueError):
        return None
    # IS is at most 12 characters, so values beyond a 32-bit column are possible; such a value
    # is not a usable number and must not make the catalog refuse the instance.
    return number if INT32_MIN <= number <= INT32_MAX else None


def read_header(ds: Dataset) -> InstanceHeader:
    """The catalog's attributes of ``ds``; UIDs validated, strings decoded (PS3.5 6.1).

    Raises :class:`~pacs_node.errors.IngestError` subclasses for missing or invalid UIDs and
    for values pydicom cannot decode.
    """
    study_uid = require_uid(ds.get("StudyInstanceUID"), "StudyInstanceUID")
    series_uid = require_uid(ds.get("SeriesInstanceUID"), "SeriesInstanceUID")
    sop_uid = require_uid(ds.get("SOPInstanceUID"), "SOPInstanceUID")
    sop_class = require_uid(ds.get("SOPClassUID"), "SOPClassUID")
    try:
        return InstanceHeader(
            study_uid=study_uid,
            series_uid=series_uid,
            sop_instance_uid=sop_uid,
            sop_class_uid=sop_class,
            modality=_text(ds, "Modality", 16),
            instance_number=_integer(ds, "InstanceNumber"),
            series_number=_integer(ds, "SeriesNumber"),
            series_description=_text(ds, "SeriesDescription"),
            body_part=_text(ds, "BodyPartExamined"),
            study_description=_text(ds, "StudyDescription"),
            study_date=_text(ds, "StudyDate", 8),
            study_time=_text(ds, "StudyTime", 16),
            accession_number=_text(ds, "AccessionNumber"),
            patient_name=_text(ds, "PatientName", 324),
            patient_id=_text(ds, "PatientID"),
            issuer_of_patient_id=_text(ds, "IssuerOfPatientID"),
        )
    except (ValueError, TypeError, KeyError, LookupError, UnicodeError) as exc:
        raise UnreadableDataset(f"attribute cannot be decoded: {exc}") from exc


# Every attribute the catalog files an instance by sits in groups 0x0008-0x0020: those must be
# read, or the instance is refused.
_LAST_GROUP_READ = 0x0020
# The last attribute routing reads: Shared Functional Groups Sequence (5200,9229). Everything
# after it (Per-Frame Functional Groups, pixel data) is never read, nor inflated. Every other
# attribute routing judges a series by (descriptions, requests, positions, field) sits in groups
# 0x0008-0x0040; the Shared Functional Groups belong to multi-frame IODs only, which have Number
# of Frames (0028,0008) (Multi-frame Functional Groups Module, type 1), so an instance without it
# is read no further than Request Attributes Sequence (0040,0275), routing's last attribute of
# group 0x0040 (past it: an SR's Content Sequence (0040,A730), private groups, documents).
_LAST_ROUTING_TAG = 0x52009229
_LAST_SINGLE_FRAME_ROUTING_TAG = 0x00400275
_NUMBER_OF_FRAMES = 0x00280008
_UNDEFINED_LENGTH = 0xFFFFFFFF
# The most bytes of a data set the header readers take in (inflated, for Deflated Explicit VR
# Little Endian): leading groups are kilobytes; a data set whose leading groups exceed this is
# refused rather than read into memory, whatever the transfer syntax.
HEADER_LIMIT_BYTES = 16 * 2**20
# The most bytes of an undefined-length sequence the readers build: pydicom makes Python objects
# of every item (1 MiB of empty items costs some 90 MiB), and the sequences read are kilobytes.
SEQUENCE_LIMIT_BYTES = 2**20
_CHUNK = 64 * 2**10


class HeaderTooLarge(OutOfResources):
    """The attributes before the ones needed exceed :data:`HEADER_LIMIT_BYTES` (a deflate bomb,
    or a huge private element in a leading group)."""


class SequenceTooLarge(HeaderTooLarge):
    """An undefined-length value the readers would build exceeds :data:`SEQUENCE_LIMIT_BYTES`
    (``tag``: its attribute)."""

    def __init__(self, message: str, tag: int) -> None:
        super().__init__(message)
        self.tag = tag


class HeaderStream:
    """A read-only, seekable view of the start of a data set, at most ``limit`` bytes of it.

    Deflated data are inflated only as far as they are read, in small steps, with the output
    capped; pydicom's reader sees an ordinary stream and may seek back within what it read.
    """

    def __init__(self, source: BinaryIO, *, deflated: bool, limit: int = HEADER_LIMIT_BYTES):
        self._source = source
        self._inflater = zlib.decompressobj(-zlib.MAX_WBITS) if deflated else None
        self._buffer = bytearray()
        self._position = 0
        self._limit = limit
        self._sequence_end: int | None = None
        self._sequence_tag = 0
        self._eof = False

    def bound_sequence(self, tag: int, budget: int | None) -> None:
        """Have the next ``budget`` bytes be all the undefined-length value of ``tag`` starting
        here may take (None: no bound but the stream's)."""
        self._sequence_end = None if budget is None else self._position + budget
        self._sequence_tag = tag

    def _fill(self, end: int) -> None:
        while len(self._buffer) < end and not self._eof:
            room = self._limit - len(self._buffer)
            if room <= 0:
                raise HeaderTooLarge(
                    f"leading attributes exceed {self._limit // 2**20} MiB; not read further"
                )
            step = min(room, _CHUNK)
            if self._inflater is None:
                data = self._source.read(step)
                self._eof = not data
            else:
                pending = self._inflater.unconsumed_tail or self._source.read(_CHUNK)
                if not pending:
                    data = self._inflater.flush()
                    self._eof = True
                else:
                    data = self._inflater.decompress(pending, step)
                    self._eof = self._inflater.eof
            self._buffer += data

    def read(self, size: int = -1) -> bytes:
        if size is None or size < 0:
            self._fill(self._limit + 1)
            end = len(self._buffer)
        else:
            end = self._position + size
            if self._sequence_end is not None and end > self._sequence_end:
                raise SequenceTooLarge(
                    f"the undefined-length value of ({self._sequence_tag >> 16:04X},"
                    f"{self._sequence_tag & 0xFFFF:04X}) exceeds "
                    f"{SEQUENCE_LIMIT_BYTES // 2**20} MiB; not read",
                    self._sequence_tag,
                )
            self._fill(end)
        data = bytes(self._buffer[self._position : end])
        self._position += len(data)
        return data

    def tell(self) -> int:
        return self._position

    def seek(self, offset: int, whence: int = 0) -> int:
        if whence == 1:
            offset += self._position
        elif whence == 2:
            self._fill(self._limit + 1)
            offset += len(self._buffer)
        self._position = max(0, offset)
        return self._position


def _past_identifiers(tag: Any, _vr: Any, _length: Any) -> bool:
    return int(tag.group) > _LAST_GROUP_READ


def stop_after_routing() -> Callable[[Any, Any, Any], bool]:
    """A fresh ``stop_when`` for one parse that reads the identifiers and what routing reads,
    and nothing after (see :data:`_LAST_ROUTING_TAG`)."""
    multi_frame = False

    def stop(tag: Any, _vr: Any, _length: Any) -> bool:
        nonlocal multi_frame
        number = int(tag)
        if number == _NUMBER_OF_FRAMES:
            multi_frame = True
        last = _LAST_ROUTING_TAG if multi_frame else _LAST_SINGLE_FRAME_ROUTING_TAG
        return number > last

    return stop


def _bounded(
    stop_when: Callable[[Any, Any, Any], bool],
    view: HeaderStream,
    limit: int,
    ends: Collection[int],
) -> Callable[[Any, Any, Any], bool]:
    """``stop_when``, and stop before an attribute past the identifying groups whose value would
    end beyond ``limit``: routing's attributes are optional (an Encapsulated Document may hold
    tens of MiB before them), so such an instance keeps the attributes before it instead of
    being refused. A value of undefined length cannot be judged ahead: pydicom builds every item
    of a sequence, even one it steps over, so it may take :data:`SEQUENCE_LIMIT_BYTES`; past the
    identifying groups, one that exceeds it is put in ``ends`` and the parse is run again to
    stop before it (see :func:`parse_identifiers`)."""

    def stop(tag: Any, vr: Any, length: Any) -> bool:
        number = int(tag)
        view.bound_sequence(number, None)
        if stop_when(tag, vr, length) or number in ends:
            return True
        if length == _UNDEFINED_LENGTH:
            view.bound_sequence(number, SEQUENCE_LIMIT_BYTES)
            return False
        optional = int(tag.group) > _LAST_GROUP_READ
        return optional and view.tell() + int(length) > limit

    return stop


def _too_large(exc: BaseException) -> HeaderTooLarge | None:
    """The bound ``exc`` is, or that pydicom's exception was raised over."""
    for found in (exc, exc.__context__, exc.__cause__):
        if isinstance(found, HeaderTooLarge):
            return found
    return None


def parse_identifiers(
    stream: BinaryIO,
    transfer_syntax_uid: str,
    *,
    stop_when: Callable[[Any, Any, Any], bool] = _past_identifiers,
    limit: int = HEADER_LIMIT_BYTES,
    only: Collection[int] | None = None,
) -> Dataset:
    """Parse only the leading groups of a network-encoded data set (no file meta, no pixels),
    read from the stream's current position; at most ``limit`` bytes, inflated or not.
    ``only``: the top-level attributes to keep (others are stepped over, not decoded)."""
    syntax = UID(transfer_syntax_uid)
    ends: set[int] = set()
    view: HeaderStream | None = None
    while True:
        try:
            implicit = syntax.is_implicit_VR if syntax.is_transfer_syntax else False
            little = syntax.is_little_endian if syntax.is_transfer_syntax else True
            deflated = bool(syntax.is_transfer_syntax and syntax.is_deflated)
            if view is None:
                view = HeaderStream(stream, deflated=deflated, limit=limit)
            view.seek(0)  # again from the start: the view keeps what it read
            ds = read_dataset(
                view,  # type: ignore[arg-type]
                implicit,
                little,
                stop_when=_bounded(stop_when, view, limit, ends),
                specific_tags=None if only is None else list(only),
            )
            ds.set_original_encoding(implicit, little)
            break
        except Exception as exc:  # pydicom raises many types for hostile bytes
            bound = _too_large(exc)
            optional = isinstance(bound, SequenceTooLarge) and bound.tag >> 16 > _LAST_GROUP_READ
            if optional and isinstance(bound, SequenceTooLarge) and bound.tag not in ends:
                ends.add(bound.tag)  # the parse stops before it instead
                continue
            if bound is not None:
                raise bound from None
            raise UnreadableDataset(f"data set cannot be parsed: {type(exc).__name__}") from exc
    if len(ds) == 0:
        raise UnreadableDataset("data set is empty")
    return ds


# What the receive path keeps of a data set: what read_header files it by and what routing
# reads (routing_header.ROUTING_KEYWORDS). Every other attribute before the stop is stepped
# over, not decoded into an element: a GE CT header (private groups 0009-0029) is read in a
# sixth less time so.
_IDENTIFYING_KEYWORDS = (
    "StudyInstanceUID",
    "SeriesInstanceUID",
    "SOPInstanceUID",
    "SOPClassUID",
    "Modality",
    "InstanceNumber",
    "SeriesNumber",
    "SeriesDescription",
    "BodyPartExamined",
    "StudyDescription",
    "StudyDate",
    "StudyTime",
    "AccessionNumber",
    "PatientName",
    "PatientID",
    "IssuerOfPatientID",
)
RECEIVED_TAGS = frozenset(
    int(tag)
    for tag in (tag_for_keyword(k) for k in _IDENTIFYING_KEYWORDS + ROUTING_KEYWORDS)
    if tag is not None
)


def parse_received(
    stream: BinaryIO, transfer_syntax_uid: str, *, limit: int = HEADER_LIMIT_BYTES
) -> Dataset:
    """What the receive path reads of a data set, in one pass: the attributes :func:`read_header`
    and :func:`~pacs_node.ingest.routing_header.read_routing_header` take (:data:`RECEIVED_TAGS`),
    up to :func:`stop_after_routing`."""
    return parse_identifiers(
        stream,
        transfer_syntax_uid,
        stop_when=stop_after_routing(),
        limit=limit,
        only=RECEIVED_TAGS,
    )


def _read_spooled(path: Path, parse: Callable[[BinaryIO, str], Dataset]) -> Dataset:
    with path.open("rb") as handle:
        handle.seek(128)
        if handle.read(4) != b"DICM":
            raise UnreadableDataset("not a Part 10 file")
        try:
            meta = _read_file_meta_info(handle)
        except Exception as exc:
            raise UnreadableDataset(f"file meta cannot be parsed: {type(exc).__name__}") from exc
        syntax = str(meta.get("TransferSyntaxUID", ""))
        if not syntax:
            raise UnreadableDataset("file meta names no transfer syntax")
        return parse(handle, syntax)


def read_spooled_header(
    path: Path,
    stop_when: Callable[[Any, Any, Any], bool],
    limit: int = HEADER_LIMIT_BYTES,
) -> Dataset:
    """The leading attributes of a spooled Part 10 file, up to ``stop_when``, never more than
    ``limit`` bytes of the data set (inflated or not)."""

    def parse(handle: BinaryIO, syntax: str) -> Dataset:
        return parse_identifiers(handle, syntax, stop_when=stop_when, limit=limit)

    return _read_spooled(path, parse)


def read_received_file(path: Path) -> Dataset:
    """A Part 10 file read as :func:`parse_received` reads a data set that arrives: routing
    reads a series received before its headers were recorded, and files on a disk, this way."""
    return _read_spooled(path, parse_received)
