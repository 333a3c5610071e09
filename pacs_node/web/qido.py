"""QIDO-RS (PS3.18 10.6): searches for studies, series and instances, answered as
application/dicom+json; see :mod:`pacs_node.services.qido` for the matching rules."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Depends, HTTPException, Path, Request, status
from fastapi.responses import JSONResponse

from pacs_node.catalog.models import Role
from pacs_node.services import qido
from pacs_node.services.archive import Archive
from pacs_node.services.qido import Level, QueryError
from pacs_node.uids import is_valid_uid
from pacs_node.web.accept import parse_accept
from pacs_node.web.auth import require
from pacs_node.web.context import web_context

DICOM_JSON = "application/dicom+json"
PREFIX = "/dicomweb"
_JSON_TYPES = frozenset({DICOM_JSON, "application/json", "application/*", "*/*"})

router = APIRouter(prefix=PREFIX, tags=["DICOMweb"], dependencies=[Depends(require(Role.VIEWER))])


def checked_uid(value: str) -> str:
    """A UID from the path, refused (400) unless it is one."""
    if not is_valid_uid(value):
        raise HTTPException(status.HTTP_400_BAD_REQUEST, "not a valid UID")
    return value


StudyUID = Annotated[str, Path(description="Study Instance UID")]
SeriesUID = Annotated[str, Path(description="Series Instance UID")]


def archive_of(request: Request) -> Archive:
    context = web_context(request)
    return Archive.of(context.settings, context.catalog, context.spool)


def dicomweb_root(request: Request) -> str:
    """The absolute DICOMweb root URLs in answers start with. Some clients (dicomweb-client)
    send a Host header without the port: the port the request came in on is used then."""
    url = request.base_url
    server = request.scope.get("server")
    if url.port is None and server and server[1] != (443 if url.scheme == "https" else 80):
        url = url.replace(port=int(server[1]))
    return str(url).rstrip("/") + PREFIX


def _search(
    request: Request, level: Level, study: str | None = None, series: str | None = None
) -> JSONResponse:
    if not any(r.media_type in _JSON_TYPES for r in parse_accept(request.headers.get("accept"))):
        raise HTTPException(status.HTTP_406_NOT_ACCEPTABLE, f"search results are {DICOM_JSON}")
    if study is not None:
        checked_uid(study)
    if series is not None:
        checked_uid(series)
    try:
        query = qido.parse_query(
            level, list(request.query_params.multi_items()), study_uid=study, series_uid=series
        )
        page = qido.search(archive_of(request), query, dicomweb_root(request))
    except QueryError as exc:
        raise HTTPException(status.HTTP_400_BAD_REQUEST, str(exc)) from exc
    headers = {"Warning": ", ".join(page.warnings(query))} if page.warnings(query) else None
    return JSONResponse(page.items, media_type=DICOM_JSON, headers=headers)


@router.get("/studies", summary="QIDO-RS: search for studies")
def search_studies(request: Request) -> JSONResponse:
    return _search(request, Level.STUDY)


@router.get("/series", summary="QIDO-RS: search for series")
def search_series(request: Request) -> JSONResponse:
    return _search(request, Level.SERIES)


@router.get("/studies/{study}/series", summary="QIDO-RS: search for a study's series")
def search_study_series(request: Request, study: StudyUID) -> JSONResponse:
    return _search(request, Level.SERIES, study)


@router.get("/instances", summary="QIDO-RS: search for instances")
def search_instances(request: Request) -> JSONResponse:
    return _search(request, Level.INSTANCE)


@router.get("/studies/{study}/instances", summary="QIDO-RS: search for a study's instances")
def search_study_instances(request: Request, study: StudyUID) -> JSONResponse:
    return _search(request, Level.INSTANCE, study)


@router.get(
    "/studies/{study}/series/{series}/instances",
    summary="QIDO-RS: search for a series' instances",
)
def search_series_instances(request: Request, study: StudyUID, series: SeriesUID) -> JSONResponse:
    return _search(request, Level.INSTANCE, study, series)
