"""ASGI middleware: every answered read of patient data and every search goes to the audit
trail (:class:`~pacs_node.services.audit.PatientReads`), whichever route served it.

Classified by path, after a successful answer to a signed-in principal: DICOMweb searches
(QIDO-RS) and the study searches of the API and the dashboard (``/``, which lists patients'
names, and its polled ``/studies/rows``) are queries (110112); WADO-RS,
the study page, the result viewer and the JSON API's study reads are reads of a study (110103).
Recording runs on a worker thread after the answer went out, so it never delays or breaks the
response.
"""

from __future__ import annotations

import logging
import re

from starlette.concurrency import run_in_threadpool
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from pacs_node.services.audit import PatientReads
from pacs_node.web.auth import DICOMWEB_PREFIX

log = logging.getLogger(__name__)

_UID = r"([0-9.]{1,64})"
_QIDO = re.compile(
    rf"^{DICOMWEB_PREFIX}/(?:studies|series|instances"
    rf"|studies/{_UID}/(?:series|instances)|studies/{_UID}/series/{_UID}/instances)$"
    r"|^/api/studies$|^/$|^/studies/rows$"  # the API's and the dashboard's study searches
)
_READS = (
    (re.compile(rf"^{DICOMWEB_PREFIX}/studies/{_UID}(?:/|$)"), "wado"),
    (re.compile(rf"^/studies/{_UID}/jobs/\d+/viewer"), "viewer"),
    (re.compile(rf"^/api/studies/{_UID}(?:/|$)"), "api"),
    (re.compile(rf"^/studies/{_UID}$"), "study page"),
)


def classify(path: str) -> tuple[str, str | None]:
    """("query", None), ("read", study UID with its kind as "kind:uid"), or ("", None)."""
    if _QIDO.match(path):
        return "query", None
    for pattern, kind in _READS:
        match = pattern.match(path)
        if match:
            return "read", f"{kind}:{match.group(1)}"
    return "", None


class AuditReads:
    def __init__(self, app: ASGIApp, reads: PatientReads) -> None:
        self.app = app
        self.reads = reads

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["method"] != "GET":
            await self.app(scope, receive, send)
            return
        kind, target = classify(scope.get("path", ""))
        if not kind:
            await self.app(scope, receive, send)
            return
        state = scope.setdefault("state", {})  # shared with the route's request.state
        answered: list[int] = []

        async def watch(message: Message) -> None:
            if message["type"] == "http.response.start":
                answered.append(int(message["status"]))
            await send(message)

        await self.app(scope, receive, watch)
        principal = state.get("principal")
        if principal is None or not answered or answered[0] >= 400:
            return
        client = scope.get("client")
        address = str(client[0]) if client else None
        user = f"user:{principal.name}"
        try:
            if kind == "query":
                query = scope.get("query_string", b"").decode("latin-1")
                await run_in_threadpool(self.reads.query, user, address, f"{scope['path']}?{query}")
            elif target is not None:
                what, _, study_uid = target.partition(":")
                await run_in_threadpool(self.reads.read, user, address, study_uid, what)
        except Exception as exc:  # the answer went out; auditing must not turn it into an error
            # the class only: the error's text may quote the query, patient data included
            log.error("read not audited", extra={"error": type(exc).__name__})
