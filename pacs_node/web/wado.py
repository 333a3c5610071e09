"""WADO-RS (PS3.18 10.4): studies, series and instances as multipart/related application/dicom
(the stored bytes, streamed from disk), their metadata as DICOM JSON, an instance's frames, bulk
data and rendered images. See :mod:`pacs_node.services.wado` for what each one holds."""

from __future__ import annotations

import re
import secrets
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path as FilePath

from fastapi import APIRouter, Depends, HTTPException, Request, status
from fastapi.responses import JSONResponse, Response, StreamingResponse
from pydicom.uid import ExplicitVRLittleEndian

from pacs_node.catalog.models import Role
from pacs_node.imaging.render import JPEG, PNG, Window
from pacs_node.services import wado
from pacs_node.services.archive import StoredObject
from pacs_node.services.wado import NotAcceptable, NotAnImage, NotFound, Part
from pacs_node.web.accept import parse_accept
from pacs_node.web.auth import require
from pacs_node.web.qido import (
    DICOM_JSON,
    PREFIX,
    SeriesUID,
    StudyUID,
    archive_of,
    checked_uid,
    dicomweb_root,
)

DICOM = "application/dicom"
MULTIPART = "multipart/related"
_ANY = frozenset({"*/*", "multipart/*"})
MAX_FRAMES = 4096  # the most frame numbers one frames request may list

router = APIRouter(prefix=PREFIX, tags=["DICOMweb"], dependencies=[Depends(require(Role.VIEWER))])


def _objects(
    request: Request, study: str, series: str | None = None, instance: str | None = None
) -> list[StoredObject]:
    for uid in (study, series, instance):
        if uid is not None:
            checked_uid(uid)
    found = archive_of(request).objects(study, series, instance)
    if not found:
        raise HTTPException(status.HTTP_404_NOT_FOUND, "no such object in this node")
    return found


def _multipart(parts: Iterator[Part], part_type: str) -> StreamingResponse:
    boundary = secrets.token_hex(16)

    def body() -> Iterator[bytes]:
        for part in parts:
            content_type = part.media_type
            if part.transfer_syntax_uid:
                content_type += f"; transfer-syntax={part.transfer_syntax_uid}"
            yield f"--{boundary}\r\nContent-Type: {content_type}\r\n\r\n".encode()
            yield from part.chunks
            yield b"\r\n"
        yield f"--{boundary}--\r\n".encode()

    media_type = f'{MULTIPART}; type="{part_type}"; boundary={boundary}'
    return StreamingResponse(body(), media_type=media_type)


def _dicom_syntaxes(request: Request) -> list[str]:
    """The transfer syntaxes the client takes application/dicom in ("*": any)."""
    syntaxes: list[str] = []
    for item in parse_accept(request.headers.get("accept")):
        if item.media_type in _ANY:
            syntaxes.append(item.transfer_syntax or "*")
        elif item.media_type == MULTIPART and item.part_type in (None, DICOM):
            syntaxes.append(item.transfer_syntax or ExplicitVRLittleEndian)
    if not syntaxes:
        raise HTTPException(
            status.HTTP_406_NOT_ACCEPTABLE, f'instances are sent as {MULTIPART}; type="{DICOM}"'
        )
    return syntaxes


def _encoding(obj: StoredObject, syntaxes: Sequence[str]) -> tuple[str, FilePath] | None:
    for wanted in syntaxes:
        for syntax, path in obj.encodings:
            if wanted in ("*", syntax):
                return syntax, path
    return None


def _retrieve(request: Request, objects: list[StoredObject]) -> StreamingResponse:
    syntaxes = _dicom_syntaxes(request)
    chosen = [_encoding(obj, syntaxes) for obj in objects]
    missing = [obj for obj, enc in zip(objects, chosen, strict=True) if enc is None]
    if missing:
        stored = sorted({obj.transfer_syntax_uid for obj in missing})
        raise HTTPException(
            status.HTTP_406_NOT_ACCEPTABLE,
            f"stored as {', '.join(stored)}; the node does not transcode: "
            "accept transfer-syntax=* or the stored syntax",
        )
    parts = (
        Part(DICOM, syntax, wado.stored_file(path))
        for syntax, path in (enc for enc in chosen if enc is not None)
    )
    return _multipart(parts, DICOM)


def _metadata(request: Request, objects: list[StoredObject]) -> JSONResponse:
    root = dicomweb_root(request)
    items = []
    for obj in objects:
        url = (
            f"{root}/studies/{obj.study_uid}/series/{obj.series_uid}"
            f"/instances/{obj.sop_instance_uid}"
        )
        items.append(wado.metadata(obj, url))
    return JSONResponse(items, media_type=DICOM_JSON)


@router.get("/studies/{study}", summary="WADO-RS: a study's instances")
def retrieve_study(request: Request, study: StudyUID) -> StreamingResponse:
    return _retrieve(request, _objects(request, study))


@router.get("/studies/{study}/series/{series}", summary="WADO-RS: a series' instances")
def retrieve_series(request: Request, study: StudyUID, series: SeriesUID) -> StreamingResponse:
    return _retrieve(request, _objects(request, study, series))


@router.get(
    "/studies/{study}/series/{series}/instances/{instance}", summary="WADO-RS: one instance"
)
def retrieve_instance(
    request: Request, study: StudyUID, series: SeriesUID, instance: str
) -> StreamingResponse:
    return _retrieve(request, _objects(request, study, series, instance))


@router.get("/studies/{study}/metadata", summary="WADO-RS: a study's metadata")
def study_metadata(request: Request, study: StudyUID) -> JSONResponse:
    return _metadata(request, _objects(request, study))


@router.get("/studies/{study}/series/{series}/metadata", summary="WADO-RS: a series' metadata")
def series_metadata(request: Request, study: StudyUID, series: SeriesUID) -> JSONResponse:
    return _metadata(request, _objects(request, study, series))


@router.get(
    "/studies/{study}/series/{series}/instances/{instance}/metadata",
    summary="WADO-RS: an instance's metadata",
)
def instance_metadata(
    request: Request, study: StudyUID, series: SeriesUID, instance: str
) -> JSONResponse:
    return _metadata(request, _objects(request, study, series, instance))


def _frame_numbers(text: str) -> list[int]:
    """The frame list of the path: at most :data:`MAX_FRAMES` positive integers."""
    pieces = text.split(",")
    if len(pieces) > MAX_FRAMES:
        raise HTTPException(
            status.HTTP_400_BAD_REQUEST, f"at most {MAX_FRAMES} frames in one request"
        )
    numbers: list[int] = []
    for piece in pieces:
        if not re.fullmatch(r"[0-9]{1,9}", piece.strip()) or int(piece) < 1:
            raise HTTPException(status.HTTP_400_BAD_REQUEST, "frames are positive integers")
        numbers.append(int(piece))
    return numbers


def _frame_accept(request: Request) -> list[tuple[str, str]]:
    """(media type, transfer syntax or "*") pairs the client takes frames in, best first."""
    accepted: list[tuple[str, str]] = []
    for item in parse_accept(request.headers.get("accept")):
        if item.media_type in _ANY:
            accepted.append(("*/*", item.transfer_syntax or "*"))
        elif item.media_type == MULTIPART:
            kind = item.part_type or wado.OCTET_STREAM
            default = ExplicitVRLittleEndian if kind == wado.OCTET_STREAM else "*"
            accepted.append((kind, item.transfer_syntax or default))
    return accepted


def _pixel_parts(call: Callable[[], list[Part]]) -> list[Part]:
    try:
        return call()
    except (NotFound, NotAnImage) as exc:
        raise HTTPException(status.HTTP_404_NOT_FOUND, str(exc)) from exc
    except NotAcceptable as exc:
        raise HTTPException(status.HTTP_406_NOT_ACCEPTABLE, str(exc)) from exc


@router.get(
    "/studies/{study}/series/{series}/instances/{instance}/frames/{frames}",
    summary="WADO-RS: frames of an instance",
)
def retrieve_frames(
    request: Request, study: StudyUID, series: SeriesUID, instance: str, frames: str
) -> StreamingResponse:
    numbers = _frame_numbers(frames)
    obj = _objects(request, study, series, instance)[0]
    accepted = _frame_accept(request)
    parts = _pixel_parts(lambda: wado.frames(obj, numbers, accepted))
    return _multipart(iter(parts), parts[0].media_type if parts else wado.OCTET_STREAM)


@router.get(
    "/studies/{study}/series/{series}/instances/{instance}/bulkdata/{tag}",
    summary="WADO-RS: a bulk data value of an instance",
)
def retrieve_bulkdata(
    request: Request, study: StudyUID, series: SeriesUID, instance: str, tag: str
) -> StreamingResponse:
    obj = _objects(request, study, series, instance)[0]
    parts = _pixel_parts(lambda: wado.bulkdata(obj, tag))
    return _multipart(iter(parts), parts[0].media_type if parts else wado.OCTET_STREAM)


def _rendered(request: Request, obj: StoredObject, number: int) -> Response:
    media_type = None
    for item in parse_accept(request.headers.get("accept")):
        if item.media_type in (PNG, JPEG):
            media_type = item.media_type
        elif item.media_type in ("*/*", "image/*"):
            media_type = PNG
        if media_type:
            break
    if media_type is None:
        raise HTTPException(status.HTTP_406_NOT_ACCEPTABLE, f"rendered as {PNG} or {JPEG}")
    chosen = _window(request.query_params.get("window"))
    try:
        data = wado.rendered(obj, number, media_type, chosen)
    except (NotFound, NotAnImage) as exc:
        raise HTTPException(status.HTTP_404_NOT_FOUND, str(exc)) from exc
    return Response(data, media_type=media_type)


def _window(text: str | None) -> Window | None:
    """PS3.18 8.3.5.1.4: ``window=center,width[,function]`` (only a linear function)."""
    if not text:
        return None
    pieces = text.split(",")
    try:
        center, width = float(pieces[0]), float(pieces[1])
    except (IndexError, ValueError) as exc:
        raise HTTPException(status.HTTP_400_BAD_REQUEST, "window is center,width") from exc
    if width <= 0 or (len(pieces) > 2 and pieces[2].lower() not in ("linear", "")):
        raise HTTPException(status.HTTP_400_BAD_REQUEST, "window: a linear one, width > 0")
    return Window(center, width)


@router.get(
    "/studies/{study}/series/{series}/instances/{instance}/rendered",
    summary="WADO-RS: an instance rendered (its first frame)",
)
def render_instance(
    request: Request, study: StudyUID, series: SeriesUID, instance: str
) -> Response:
    obj = _objects(request, study, series, instance)[0]
    return _rendered(request, obj, 1)


@router.get(
    "/studies/{study}/series/{series}/instances/{instance}/frames/{frame}/rendered",
    summary="WADO-RS: one frame rendered",
)
def render_frame(
    request: Request, study: StudyUID, series: SeriesUID, instance: str, frame: str
) -> Response:
    numbers = _frame_numbers(frame)
    if len(numbers) != 1:
        raise HTTPException(status.HTTP_400_BAD_REQUEST, "one frame is rendered at a time")
    obj = _objects(request, study, series, instance)[0]
    return _rendered(request, obj, numbers[0])
