"""C-STORE of stored files, for ``pacs-node send`` (:mod:`pacs_node.scu`) and the outbox's
``dimse`` destinations (:mod:`pacs_node.dispatch.dimse`).

One association per batch, each (SOP class, transfer syntax) pair proposed as a presentation
context of its own, so the peer accepts or refuses each encoding on its own. An instance goes
out in the first of its encodings (preferred first) whose context was accepted, as the file's
bytes read in chunks: never decoded and re-encoded, so nothing is converted (compressed
syntaxes stay compressed) and memory stays flat for large files. What the peer answered, or
why it could not answer, is the caller's to judge.
"""

from __future__ import annotations

import ssl
import weakref
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, cast

from pynetdicom import AE, _config
from pynetdicom.association import Association
from pynetdicom.presentation import PresentationContext, build_context

from pacs_node.dimse_client import parked
from pacs_node.statuses import is_stored

MAX_CONTEXTS = 128  # PS3.8: presentation context IDs are odd numbers 1-255
ABORTED = "association aborted"
NO_RESPONSE = "no C-STORE response"


@dataclass(frozen=True)
class StoreResult:
    """One instance's C-STORE: the peer's status, or the problem that left it without one."""

    status: int | None = None
    comment: str = ""  # the status's Error Comment
    transfer_syntax_uid: str | None = None  # the encoding that went out
    problem: str = ""  # not sent or not answered: why (ABORTED, NO_RESPONSE, ...)
    refused: bool = False  # the peer accepted none of its encodings: sending again won't help

    @property
    def stored(self) -> bool:
        return self.status is not None and is_stored(self.status)


def pair_contexts(pairs: Iterable[tuple[str, str]]) -> list[PresentationContext]:
    """One presentation context per (SOP class, transfer syntax) pair, in the given order."""
    return [build_context(sop_class, [syntax]) for sop_class, syntax in pairs]


# OpenSSL verify codes (X509_V_ERR_*) a sender's handshake fails with, worded for the operator.
_VERIFY_FAILURES = {
    10: "certificate expired",
    9: "certificate not yet valid",
    62: "host name mismatch",
    64: "host name mismatch",
    2: "certificate not trusted (unknown CA)",
    18: "certificate not trusted (unknown CA)",
    19: "certificate not trusted (unknown CA)",
    20: "certificate not trusted (unknown CA)",
    21: "certificate not trusted (unknown CA)",
    23: "certificate revoked",
}
_tls_failures: weakref.WeakKeyDictionary[Association, str] = weakref.WeakKeyDictionary()


def describe_tls_failure(exc: ssl.SSLError) -> str:
    """Why a handshake as the client failed, in words the reason scrubber keeps."""
    if isinstance(exc, ssl.SSLCertVerificationError):
        code = exc.verify_code
        return f"TLS certificate failure: {_VERIFY_FAILURES.get(code, f'verify failed {code}')}"
    reason = str(exc.reason or "")
    if "CERTIFICATE" in reason or "UNKNOWN_CA" in reason:
        return "TLS certificate failure: our certificate refused by the peer"
    return "TLS handshake failed"


class _TLSAttempt:
    """Stands in for the client context in pynetdicom's ``wrap_socket`` call: pynetdicom
    connects (which handshakes) and logs and drops any error, so the reason is kept here."""

    def __init__(self, context: ssl.SSLContext) -> None:
        self.context = context
        self.error: ssl.SSLError | None = None

    def wrap_socket(self, sock: Any, **kwargs: Any) -> ssl.SSLSocket:
        wrapped = self.context.wrap_socket(sock, **kwargs)
        connect = wrapped.connect

        def connect_recording(address: Any) -> None:
            try:
                connect(address)
            except ssl.SSLError as exc:
                self.error = exc
                raise

        wrapped.connect = connect_recording  # type: ignore[method-assign,assignment]
        return wrapped


def tls_failure(assoc: Association) -> str | None:
    """Why an association over TLS failed in its handshake (None: it did not, or no TLS)."""
    return _tls_failures.get(assoc)


def associate(
    calling_ae: str,
    called_ae: str,
    host: str,
    port: int,
    requested: Sequence[PresentationContext],
    *,
    timeout_s: float | None = None,
    evt_handlers: list[Any] | None = None,
    tls: ssl.SSLContext | None = None,
) -> Association:
    """An association as ``calling_ae`` proposing ``requested``; established or not (the
    caller words the refusal). ``timeout_s`` bounds the TCP connect with its TLS handshake
    (pynetdicom's ``connection_timeout`` covers ``connect``, which handshakes) and the ACSE,
    DIMSE and network waits (None: pynetdicom's defaults, without a connect deadline); ``tls``:
    over DICOM TLS with this client context, the host name checked against the peer's
    certificate."""
    ae = AE(ae_title=calling_ae)
    if timeout_s is not None:
        ae.connection_timeout = timeout_s
        ae.acse_timeout = timeout_s
        ae.dimse_timeout = timeout_s
        ae.network_timeout = timeout_s
    ae.requested_contexts = list(requested)
    attempt = _TLSAttempt(tls) if tls is not None else None
    tls_args = (cast(ssl.SSLContext, attempt), host) if attempt is not None else None
    assoc = ae.associate(
        host, port, ae_title=called_ae, evt_handlers=evt_handlers, tls_args=tls_args
    )
    if attempt is not None and attempt.error is not None:
        _tls_failures[assoc] = describe_tls_failure(attempt.error)
    return assoc


def accepted_pairs(assoc: Association) -> set[tuple[str, str]]:
    """The (SOP class, transfer syntax) pairs the peer accepted."""
    return {(str(cx.abstract_syntax), str(cx.transfer_syntax[0])) for cx in assoc.accepted_contexts}


def store(
    assoc: Association,
    sop_class_uid: str,
    encodings: Mapping[str, Path],
    accepted: set[tuple[str, str]],
) -> StoreResult:
    """C-STORE one instance in the first of ``encodings`` (transfer syntax -> file) whose
    context ``accepted`` holds."""
    syntax = next((ts for ts in encodings if (sop_class_uid, ts) in accepted), None)
    if syntax is None:
        offered = ", ".join(encodings)
        return StoreResult(
            problem=f"SOP class {sop_class_uid} not accepted in {offered}", refused=True
        )
    if not assoc.is_established:
        return StoreResult(problem=ABORTED)
    # Set where it is used, not at import: pynetdicom's settings are the whole process's.
    _config.STORE_SEND_CHUNKED_DATASET = True
    try:
        status = parked(assoc).send_c_store(encodings[syntax])
    except (OSError, ValueError, RuntimeError) as exc:
        return StoreResult(problem=f"C-STORE failed: {exc}")
    if not status or "Status" not in status:
        return StoreResult(problem=NO_RESPONSE)
    return StoreResult(int(status.Status), str(status.get("ErrorComment", "")), syntax)
