"""WADO-RS contents of one stored object (PS3.18 10.4): its metadata as DICOM JSON (F.2), its
bulk data, its frames and rendered images.

Frames are cut from the stored bytes without decoding where the stored encoding allows: native
(uncompressed) frames are read at their offset in the file, compressed ones taken out of the
encapsulated Pixel Data as they were compressed. A compressed frame is decoded only for a client
that accepts nothing but uncompressed frames. Each frame is read from the file only when its part
is sent, so an answer holds one frame in memory at a time, however many it lists.
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from pydicom import Dataset, dcmread
from pydicom.datadict import dictionary_VR
from pydicom.dataelem import RawDataElement
from pydicom.encaps import get_frame
from pydicom.pixels.utils import pixel_array
from pydicom.tag import Tag
from pydicom.uid import (
    UID,
    DeflatedExplicitVRLittleEndian,
    ExplicitVRBigEndian,
    ExplicitVRLittleEndian,
)

from pacs_node.errors import RequestError
from pacs_node.imaging.render import PNG, Window, render
from pacs_node.services.archive import StoredObject

BULK_THRESHOLD = 1024  # binary values longer than this are sent as a BulkDataURI
PIXEL_DATA = 0x7FE00010
OCTET_STREAM = "application/octet-stream"
UTF8 = "ISO_IR 192"
_BULK_VRS = frozenset({"OB", "OD", "OF", "OL", "OV", "OW", "UN", "OB or OW", "US or OW"})
_CHUNK = 1 << 20
# PS3.18 Table 8.7.3-2: the media type of a compressed frame, by transfer syntax
FRAME_MEDIA_TYPES = {
    "1.2.840.10008.1.2.4.50": "image/jpeg",
    "1.2.840.10008.1.2.4.51": "image/jpeg",
    "1.2.840.10008.1.2.4.57": "image/jpeg",
    "1.2.840.10008.1.2.4.70": "image/jpeg",
    "1.2.840.10008.1.2.4.80": "image/jls",
    "1.2.840.10008.1.2.4.81": "image/jls",
    "1.2.840.10008.1.2.4.90": "image/jp2",
    "1.2.840.10008.1.2.4.91": "image/jp2",
    "1.2.840.10008.1.2.4.92": "image/jpx",
    "1.2.840.10008.1.2.4.93": "image/jpx",
    "1.2.840.10008.1.2.4.201": "image/jphc",
    "1.2.840.10008.1.2.4.202": "image/jphc",
    "1.2.840.10008.1.2.4.203": "image/jphc",
    "1.2.840.10008.1.2.5": "image/dicom-rle",
}


class NotFound(RequestError):
    """The object has no such frame or bulk data element."""


class NotAnImage(RequestError):
    """Frames or a rendering asked of an object without pixel data."""


@dataclass(frozen=True, slots=True)
class Part:
    """One body part of a multipart answer: its media type, the transfer syntax of its bytes
    (None: not DICOM-encoded) and the bytes, produced in chunks."""

    media_type: str
    transfer_syntax_uid: str | None
    chunks: Iterator[bytes]


def _file_bytes(path: Path, offset: int, length: int) -> Iterator[bytes]:
    with path.open("rb") as handle:
        handle.seek(offset)
        left = length
        while left > 0:
            chunk = handle.read(min(_CHUNK, left))
            if not chunk:
                raise OSError(f"{path.name} ended early")
            left -= len(chunk)
            yield chunk


def stored_file(path: Path) -> Iterator[bytes]:
    """A stored file's bytes as they are on disk, in chunks."""
    return _file_bytes(path, 0, path.stat().st_size)


def _open(obj: StoredObject) -> Dataset:
    """The object's data set with long binary values left on disk (read when touched)."""
    return dcmread(obj.path, defer_size=BULK_THRESHOLD)


def _vr(ds: Dataset, tag: int, raw: Any) -> str:
    vr = raw.VR if raw.VR else dictionary_VR(tag)
    if tag == PIXEL_DATA:
        compressed = UID(str(ds.file_meta.get("TransferSyntaxUID", ""))).is_compressed
        if compressed or int(ds.get("BitsAllocated", 16) or 16) <= 8:
            return "OB"
        return "OW"
    if " or " in str(vr):
        return "OW"
    return str(vr)


def metadata(obj: StoredObject, instance_url: str) -> dict[str, Any]:
    """The object's data set as DICOM JSON (PS3.18 F.2): strings decoded from their character
    set (so ``SpecificCharacterSet`` becomes ISO_IR 192), Person Names as component groups,
    top-level binary values over :data:`BULK_THRESHOLD` as BulkDataURIs of this instance's
    ``bulkdata`` resource (smaller and nested ones inline)."""
    ds = _open(obj)
    bulk: list[tuple[int, str]] = []
    for tag in list(ds.keys()):
        raw = ds.get_item(tag, keep_deferred=True)
        if raw is None:
            continue
        vr = _vr(ds, tag, raw)
        deferred = isinstance(raw, RawDataElement) and raw.value is None and raw.length
        if tag == PIXEL_DATA or (deferred and vr in _BULK_VRS):
            bulk.append((int(tag), vr))
            del ds[tag]
    json = ds.to_json_dict(bulk_data_threshold=2**62)
    if "00080005" in json:
        json["00080005"] = {"vr": "CS", "Value": [UTF8]}
    for number, vr in bulk:
        json[f"{number:08X}"] = {"vr": vr, "BulkDataURI": f"{instance_url}/bulkdata/{number:08X}"}
    return dict(sorted(json.items()))


def bulkdata(obj: StoredObject, tag_text: str) -> list[Part]:
    """A top-level binary value of the object as octet-stream bytes read from the file;
    compressed Pixel Data as its frames, each in the media type of its compression."""
    if not re.fullmatch(r"[0-9A-Fa-f]{8}", tag_text):
        raise NotFound(f"not a tag: {tag_text!r}")
    tag = Tag(int(tag_text, 16))
    ds = _open(obj)
    if tag == PIXEL_DATA and UID(str(ds.file_meta.get("TransferSyntaxUID", ""))).is_compressed:
        return frames(obj, None, [("*/*", "*")])
    raw = ds.get_item(tag, keep_deferred=True)
    if raw is None or _vr(ds, tag, raw) not in _BULK_VRS:
        raise NotFound(f"no bulk data element {tag_text}")
    located = _location(obj, ds, raw)
    if located is not None:
        return [Part(OCTET_STREAM, None, _file_bytes(obj.path, *located))]
    return [Part(OCTET_STREAM, None, iter([bytes(ds[tag].value)]))]


def _location(obj: StoredObject, ds: Dataset, raw: Any) -> tuple[int, int] | None:
    """(offset, length) of a deferred little-endian value in the stored file, else None."""
    syntax = str(ds.file_meta.get("TransferSyntaxUID", ""))
    if not isinstance(raw, RawDataElement) or raw.value is not None:
        return None
    if syntax in (DeflatedExplicitVRLittleEndian, ExplicitVRBigEndian):
        return None
    return int(raw.value_tell), int(raw.length)


def frame_count(ds: Dataset) -> int:
    try:
        return max(int(ds.get("NumberOfFrames", 1) or 1), 1)
    except (TypeError, ValueError):
        return 1


def frames(
    obj: StoredObject, numbers: list[int] | None, accepted: list[tuple[str, str]]
) -> list[Part]:
    """Frames ``numbers`` (1-based; None: all; a repeated one sent once, where it first
    appears) as ``accepted`` allows: (media type, transfer syntax or "*") pairs in order of
    preference. Raises :class:`NotAcceptable` when none fits, :class:`NotFound` for a frame
    the object does not have. The parts read their frame when they are sent."""
    ds = _open(obj)
    if ds.get_item(PIXEL_DATA, keep_deferred=True) is None or "Rows" not in ds:
        raise NotAnImage("the object has no pixel data")
    count = frame_count(ds)
    wanted = list(range(1, count + 1)) if numbers is None else list(dict.fromkeys(numbers))
    for number in wanted:
        if not 1 <= number <= count:
            raise NotFound(f"frame {number} is not one of the object's {count} frames")
    syntax = str(ds.file_meta.get("TransferSyntaxUID", ExplicitVRLittleEndian))
    compressed = UID(syntax).is_compressed
    stored_type = FRAME_MEDIA_TYPES.get(syntax, OCTET_STREAM) if compressed else OCTET_STREAM
    native = ExplicitVRLittleEndian
    for media_type, asked in accepted:
        anything = media_type in ("*/*", "*")
        if compressed and asked in ("*", syntax) and (anything or media_type == stored_type):
            return [Part(stored_type, syntax, _stored_frame(obj, ds, n)) for n in wanted]
        if compressed and asked in ("*", syntax) and media_type == OCTET_STREAM:
            return [Part(OCTET_STREAM, syntax, _stored_frame(obj, ds, n)) for n in wanted]
        if (anything or media_type == OCTET_STREAM) and asked in ("*", native, syntax):
            if compressed or syntax == ExplicitVRBigEndian:
                return [Part(OCTET_STREAM, native, _decoded_chunks(obj, n)) for n in wanted]
            return [Part(OCTET_STREAM, native, _stored_frame(obj, ds, n)) for n in wanted]
    raise NotAcceptable(f"frames are stored as {stored_type} ({syntax})")


class NotAcceptable(RequestError):
    """No representation the client accepts can be given (406)."""


def _stored_frame(obj: StoredObject, ds: Dataset, number: int) -> Iterator[bytes]:
    """Frame ``number`` as stored, read from the file only when iterated: a native frame at
    its offset, a compressed one found through the offset tables (or the fragments' item
    headers) without reading the other frames."""
    syntax = UID(str(ds.file_meta.get("TransferSyntaxUID", ExplicitVRLittleEndian)))
    raw = ds.get_item(PIXEL_DATA, keep_deferred=True)
    if syntax.is_compressed:
        offsets = None
        if "ExtendedOffsetTable" in ds and "ExtendedOffsetTableLengths" in ds:
            offsets = (ds.ExtendedOffsetTable, ds.ExtendedOffsetTableLengths)
        count = frame_count(ds)
        if isinstance(raw, RawDataElement) and raw.value is None:
            with obj.path.open("rb") as handle:
                handle.seek(int(raw.value_tell))
                yield get_frame(
                    handle, number - 1, extended_offsets=offsets, number_of_frames=count
                )
            return
        yield get_frame(ds.PixelData, number - 1, extended_offsets=offsets, number_of_frames=count)
        return
    samples = int(ds.get("SamplesPerPixel", 1) or 1)
    bits = int(ds.Rows) * int(ds.Columns) * samples * int(ds.BitsAllocated)
    if bits % 8:
        yield _decoded(obj, number)
        return
    size = bits // 8
    located = _location(obj, ds, raw)
    if located is not None:
        yield from _file_bytes(obj.path, located[0] + (number - 1) * size, size)
    else:
        yield bytes(ds.PixelData[(number - 1) * size : number * size])


def _decoded_chunks(obj: StoredObject, number: int) -> Iterator[bytes]:
    """:func:`_decoded`, run only when iterated."""
    yield _decoded(obj, number)


def _decoded(obj: StoredObject, number: int) -> bytes:
    """One frame decoded to native little-endian samples (colour as RGB; 1-bit packed)."""
    array = pixel_array(obj.path, index=number - 1)
    if int(obj.header().get("BitsAllocated", 16) or 16) == 1:
        return np.packbits(array.astype(np.uint8).ravel(), bitorder="little").tobytes()
    return np.ascontiguousarray(array, dtype=array.dtype.newbyteorder("<")).tobytes()


def rendered(
    obj: StoredObject, number: int, media_type: str = PNG, chosen: Window | None = None
) -> bytes:
    """Frame ``number`` (1-based) as a consumer image (see :mod:`pacs_node.imaging.render`)."""
    header = obj.header()
    if "Rows" not in header:
        raise NotAnImage("the object has no pixel data")
    count = frame_count(header)
    if not 1 <= number <= count:
        raise NotFound(f"frame {number} is not one of the object's {count} frames")
    frame = pixel_array(obj.path, index=number - 1)
    return render(frame, header, media_type, chosen)
