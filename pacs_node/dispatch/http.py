"""The one HTTP stack of dispatch (httpx), as STOW-RS and FHIR use it: no redirects (a 3xx is
an answer, not a detour: a login page is never taken for success), no hidden retries (one
request per outbox attempt; the outbox decides when to try again), a total deadline, a bounded
answer, and HTTP statuses read as transient or permanent failures.

The deadline is the destination's ``timeout_s`` for the whole exchange (connect, upload,
answer): httpx's own timeouts apply to each read, so a server that trickles a byte at a time
would hold a request for ever. The exchange runs on a thread of its own and is abandoned at the
deadline; the thread itself stops reading at the deadline too (a trickling answer) or at httpx's
next per-read timeout (a silent one), so no thread outlives ``2 * timeout_s``.

TLS (:func:`client_context`, on :mod:`pacs_node.tls`): version 1.2 or 1.3, TLS 1.2 with ECDHE
and AES-GCM only, the server verified against the destination's ``tls_ca_file`` (else the
system's trust store) and its host name checked; a client certificate when the destination has
one. A file changed on disk is read again, so a renewed certificate is used without a restart.
"""

from __future__ import annotations

import math
import ssl
import threading
import time
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from email.utils import parsedate_to_datetime
from pathlib import Path

import httpx

from pacs_node.errors import PermanentDelivery, TransientDelivery
from pacs_node.tls import TLSFileError, TLSFiles, shared_client_context

MAX_ANSWER_BYTES = 8 * 1024 * 1024  # more than any STOW or FHIR answer we read needs
MAX_RETRY_AFTER_S = 86_400.0  # a Retry-After further out than a day is read as a day
TRANSIENT_STATUSES = frozenset({408, 425, 429, 500, 502, 503, 504})


@dataclass(frozen=True)
class Answer:
    status: int
    headers: httpx.Headers
    body: bytes
    truncated: bool = False

    @property
    def media_type(self) -> str:
        value = str(self.headers.get("content-type", ""))
        return value.split(";", 1)[0].strip().lower()

    def text(self, limit: int = 300) -> str:
        return self.body[:limit].decode("utf-8", "replace")


def classify_http(status: int, what: str) -> TransientDelivery | PermanentDelivery:
    """An HTTP status that is not success as the delivery error it means: 408, 425, 429 and
    5xx may pass; a redirect or any other 4xx needs a person (wrong URL, credentials, a login
    page in front of the service, a request the server will never take)."""
    if status in TRANSIENT_STATUSES or status >= 500:
        return TransientDelivery(f"{what}: HTTP {status}")
    if 300 <= status < 400:
        return PermanentDelivery(f"{what}: HTTP {status} redirect (not followed)")
    return PermanentDelivery(f"{what}: HTTP {status}")


def retry_after(headers: httpx.Headers, now: datetime | None = None) -> datetime | None:
    """When the server asked to be tried again (Retry-After: seconds or an HTTP date)."""
    value = str(headers.get("retry-after", "")).strip()
    if not value:
        return None
    now = now or datetime.now(UTC)
    try:
        seconds = float(value)
    except ValueError:
        try:
            at = parsedate_to_datetime(value)
        except (TypeError, ValueError, IndexError):
            return None
        if at.tzinfo is None:
            at = at.replace(tzinfo=UTC)
        seconds = (at - now).total_seconds()
    if math.isnan(seconds) or seconds <= 0:  # unreadable, or the past
        return None
    return now + timedelta(seconds=min(seconds, MAX_RETRY_AFTER_S))


def client_context(
    ca_file: Path | None = None, cert_file: Path | None = None, key_file: Path | None = None
) -> ssl.SSLContext:
    """The TLS context of a request to an HTTP destination (module docstring). A file that
    cannot be read, or a key that does not fit, is a permanent failure: a person must fix it."""
    try:
        return shared_client_context(TLSFiles(cert_file, key_file, ca_file))
    except TLSFileError as exc:
        raise PermanentDelivery(f"TLS files cannot be used: {exc.key}") from exc


def exchange(
    method: str,
    url: str,
    *,
    timeout_s: float,
    headers: dict[str, str],
    content: bytes | None = None,
    params: dict[str, str] | None = None,
    what: str,
    tls: ssl.SSLContext | None = None,
) -> Answer:
    """One request, no redirect followed, finished within ``timeout_s`` or given up on;
    ``tls``: the context of an https URL (default: :func:`client_context`).
    Raises :class:`TransientDelivery` for a transport failure or the deadline."""
    verify = tls if tls is not None else client_context()
    outcome: list[Answer | BaseException] = []
    done = threading.Event()
    deadline = time.monotonic() + timeout_s

    def run() -> None:
        try:
            with (
                httpx.Client(
                    timeout=httpx.Timeout(timeout_s), follow_redirects=False, verify=verify
                ) as client,
                client.stream(method, url, headers=headers, content=content, params=params) as r,
            ):
                body = bytearray()
                truncated = False
                for chunk in r.iter_bytes():
                    if time.monotonic() > deadline:
                        raise TimeoutError("answer still coming at the deadline")
                    body += chunk
                    if len(body) > MAX_ANSWER_BYTES:
                        truncated = True
                        del body[MAX_ANSWER_BYTES:]
                        break
                outcome.append(Answer(r.status_code, r.headers, bytes(body), truncated))
        except BaseException as exc:  # handed to the caller's thread
            outcome.append(exc)
        finally:
            done.set()

    thread = threading.Thread(target=run, name="dispatch-http", daemon=True)
    thread.start()
    if not done.wait(timeout_s):
        raise TransientDelivery(f"{what}: no complete answer within {timeout_s:g} s")
    result = outcome[0]
    if isinstance(result, Answer):
        return result
    if isinstance(result, httpx.HTTPError | httpx.InvalidURL):
        raise TransientDelivery(f"{what}: {type(result).__name__}: {result}") from result
    raise result
