"""STOW-RS (PS3.18 10.5): ``POST /dicomweb/studies`` and ``/dicomweb/studies/{study}``.

The body is read as it arrives and handed, a batch of chunks at a time, to
:class:`~pacs_node.ingest.stow.StowBody` on a worker thread (files and the catalog block), so
the event loop never waits on a disk and the body is never held whole. Each part goes through
the same receive path as a C-STORE (checks, identity and resend policies, ``max_instance_mb``).
The answer is the Store Instances Response Module (PS3.18 Annex I) in DICOM JSON.

STOW-RS clients have no AE title: the stored files' Source AE Title is empty and the catalog's
calling AE is None for them; who sent them is the signed-in user, logged with the counts and
named as ``sender`` in a new study's ``receiving`` event.
"""

from __future__ import annotations

import logging
import threading
from typing import Annotated

import anyio
from fastapi import APIRouter, Depends, HTTPException, Request, status
from fastapi.responses import JSONResponse, Response
from pydicom.dataset import Dataset
from starlette.requests import ClientDisconnect

from pacs_node.catalog.models import Role
from pacs_node.errors import MalformedBody
from pacs_node.ingest.statuses import status_for
from pacs_node.ingest.stow import PartResult, StowBody, multipart_boundary
from pacs_node.services.accounts import Principal
from pacs_node.statuses import CANNOT_UNDERSTAND, SUCCESS
from pacs_node.uids import is_valid_uid
from pacs_node.web.auth import require
from pacs_node.web.context import web_context

log = logging.getLogger(__name__)

router = APIRouter(prefix="/dicomweb", tags=["dicomweb"])

DICOM_JSON = "application/dicom+json"
BATCH_BYTES = 2**20  # chunks gathered before one hop to the worker thread
_ACCEPTABLE = ("application/dicom+json", "application/json", "application/*", "*/*")

Operator = Annotated[Principal, Depends(require(Role.OPERATOR))]


@router.post("/studies", response_class=JSONResponse, summary="STOW-RS: store instances")
async def store_instances(request: Request, principal: Operator) -> Response:
    return await _store(request, principal, None)


@router.post(
    "/studies/{study}",
    response_class=JSONResponse,
    summary="STOW-RS: store instances of one study",
)
async def store_study_instances(request: Request, principal: Operator, study: str) -> Response:
    if not is_valid_uid(study):
        raise HTTPException(status.HTTP_400_BAD_REQUEST, "the study is not a valid UID")
    return await _store(request, principal, study)


def _acceptable(accept: str) -> bool:
    if not accept.strip():
        return True
    for item in accept.split(","):
        media_type = item.split(";", 1)[0].strip().lower()
        if media_type in _ACCEPTABLE:
            return True
    return False


async def _store(request: Request, principal: Principal, study: str | None) -> Response:
    context = web_context(request)
    if context.receiver is None:
        raise HTTPException(status.HTTP_503_SERVICE_UNAVAILABLE, "this node does not store")
    boundary = multipart_boundary(request.headers.get("content-type", ""))
    if boundary is None:
        raise HTTPException(
            status.HTTP_415_UNSUPPORTED_MEDIA_TYPE,
            'only multipart/related; type="application/dicom" is stored',
        )
    if not _acceptable(request.headers.get("accept", "")):
        raise HTTPException(status.HTTP_406_NOT_ACCEPTABLE, f"the response is {DICOM_JSON}")
    body = StowBody(context.receiver, boundary, study, sender=principal.name)
    finished = False
    try:
        results = await _read(request, body, context.stow_parts)
        finished = True
    except MalformedBody as exc:
        if not body.results:
            raise HTTPException(status.HTTP_400_BAD_REQUEST, str(exc)) from exc
        # What was stored before the body broke stays stored; the rest is one failure.
        broken = PartResult(CANNOT_UNDERSTAND, reason=str(exc))
        results = [*body.results, broken]
        finished = True
        log.warning("STOW-RS body broke off", extra={"user": principal.name, "reason": str(exc)})
    except ClientDisconnect:
        # Nobody reads the answer; the part under way is dropped (below), those stored stay.
        log.info("STOW-RS client went away", extra={"user": principal.name})
        return Response(status_code=status.HTTP_400_BAD_REQUEST)
    except Exception as exc:
        if not body.results:
            raise
        # The parts stored before it stay stored and are answered as such.
        log.exception("STOW-RS request failed", extra={"user": principal.name})
        failure = PartResult(status_for(exc), reason=f"internal error: {type(exc).__name__}")
        results = [*body.results, failure]
    finally:
        if not finished:  # the client went away (or the request was cancelled)
            with anyio.CancelScope(shield=True):
                await anyio.to_thread.run_sync(body.abort)
    if not results:
        raise HTTPException(status.HTTP_400_BAD_REQUEST, "the body holds no part")
    stored = sum(result.stored for result in results)
    log.info(
        "STOW-RS request",
        extra={"user": principal.name, "stored": stored, "failed": len(results) - stored},
    )
    base = str(request.base_url).rstrip("/") + router.prefix
    return JSONResponse(
        response_module(results, base, study),
        status_code=http_status(results),
        media_type=DICOM_JSON,
    )


async def _read(request: Request, body: StowBody, slots: threading.Semaphore) -> list[PartResult]:
    """Feed the body to ``body`` off the event loop; each hop holds one of ``slots``, so no
    more than that many threads parse and store parts at once, however many requests come."""

    def write(data: bytes) -> None:
        with slots:
            body.write(data)

    pending = bytearray()
    async for chunk in request.stream():
        pending += chunk
        if len(pending) >= BATCH_BYTES:
            await anyio.to_thread.run_sync(write, bytes(pending))
            pending.clear()
    if pending:
        await anyio.to_thread.run_sync(write, bytes(pending))
    return body.close()


def http_status(results: list[PartResult]) -> int:
    """PS3.18 10.5.3: 200 all stored, 202 some failed or warned, 409 none stored; 413 when
    none was stored and each was refused for its size (Payload Too Large, PS3.18 8.5)."""
    stored = [result for result in results if result.stored]
    if not stored:
        if all(result.oversized for result in results):
            return status.HTTP_413_CONTENT_TOO_LARGE
        return status.HTTP_409_CONFLICT
    if len(stored) == len(results) and all(result.status == SUCCESS for result in stored):
        return status.HTTP_200_OK
    return status.HTTP_202_ACCEPTED


def response_module(results: list[PartResult], base: str, study: str | None) -> dict[str, object]:
    """The Store Instances Response Module (PS3.18 Annex I) as DICOM JSON."""
    response = Dataset()
    studies = {result.study_uid for result in results if result.stored}
    only = study or (next(iter(studies)) if len(studies) == 1 else None)
    response.RetrieveURL = f"{base}/studies/{only}" if only else None  # Type 2
    referenced: list[Dataset] = []
    failed: list[Dataset] = []
    for result in results:
        item = Dataset()
        # a failed part's UIDs come from its own File Meta Information: only valid ones are named
        if result.sop_class_uid and is_valid_uid(result.sop_class_uid):
            item.ReferencedSOPClassUID = result.sop_class_uid
        if result.sop_instance_uid and is_valid_uid(result.sop_instance_uid):
            item.ReferencedSOPInstanceUID = result.sop_instance_uid
        if result.stored:
            item.RetrieveURL = (
                f"{base}/studies/{result.study_uid}/series/{result.series_uid}"
                f"/instances/{result.sop_instance_uid}"
            )
            if result.status != SUCCESS:
                item.WarningReason = result.status
            referenced.append(item)
        else:
            item.FailureReason = result.status
            failed.append(item)
    if failed:
        response.FailedSOPSequence = failed
    if referenced:
        response.ReferencedSOPSequence = referenced
    return response.to_json_dict()
