"""What the DICOM port reads before pynetdicom decodes it: limits, deadlines, where data sets go.

pynetdicom 3.0 reads a PDU as its 6-byte header and then the declared length whole
(``DULServiceProvider._read_pdu_data`` through ``AssociationSocket.recv``) from an accepted socket
that has no timeout, and writes a chunked C-STORE data set to ``NamedTemporaryFile`` in the
system temporary folder (``dimse_messages``). Both are private, so this module is the only place
that touches them:

- :class:`GuardedServer` accepts each connection as a :class:`GuardedSocket`, a real socket whose
  ``recv`` follows the PDU framing itself: it refuses a PDU whose declared length exceeds what
  the association's state allows before reading its body (answering A-ASSOCIATE-RJ or A-ABORT),
  gives a connection ``assoc_request_timeout_s`` to deliver its A-ASSOCIATE-RQ, and times out a
  read that stalls mid-PDU. Connections still awaiting their A-ASSOCIATE-RQ are counted per
  process (:mod:`pacs_node.ingest.limits`): at a limit the oldest such connection from the same
  address (or any, at the total) is closed to make room, so a flood cannot keep a scanner out,
  and the process that accepted the new connection always holds one to close.
- Over TLS (``dicom_tls_port``) :class:`GuardedServer` wraps each accepted connection without
  any I/O on the accept thread (pynetdicom's own ``ssl_context`` handshakes there, so one silent
  client would hold the port) and :class:`GuardedTLSSocket` runs the handshake on the
  connection's own thread within ``assoc_request_timeout_s`` of the accept; the same limits
  apply to the PDUs read through it. A failed handshake is counted, closed and reported to the
  Guard's ``alert`` (:data:`SecurityAlert`).
- :func:`install_received_files` makes pynetdicom's chunked receive write into a
  :class:`ReceivedFile` in the spool's incoming folder: our own Part 10 header in front, the data
  set as received after it, at most ``max_instance_mb`` of it kept (beyond that nothing more is
  written and the handler answers Out of Resources). The File Meta Information pynetdicom would
  encode in front of it reaches :class:`ReceivedFile` as its three UIDs instead
  (``create_file_meta`` and ``write_file_meta_info`` in ``dimse_messages``).
- A request whose command set announces a data set but whose next PDV is the next request's
  command (the data set never came), or that gets no PDV for half the read timeout, is
  answered with a failure status and cleared, so the next request is decoded on its own and
  answered (:func:`_receive_primitive`, :func:`_end_stalled_request`); pynetdicom would leave
  the first open until the association ends and append the next command set to it.
- Per C-STORE cost: ``AssociationSocket.recv`` reads a guarded connection's PDU body in large
  steps rather than pynetdicom's 4096 bytes, and the reactors' 1 ms idle pauses (``time.sleep``
  in ``dul`` and ``association``) end as soon as data arrives or a decoded message is queued.

``tests/unit/test_transport.py`` fails when pynetdicom's code at these points changes.
"""

from __future__ import annotations

import contextlib
import errno
import functools
import hashlib
import logging
import os
import queue
import select
import socket
import ssl
import struct
import threading
import time
import types
from collections.abc import Callable
from dataclasses import dataclass
from io import BytesIO
from pathlib import Path
from typing import Any

from pydicom.filereader import read_dataset
from pynetdicom import association as pynetdicom_association
from pynetdicom import dimse as pynetdicom_dimse
from pynetdicom import dimse_messages, transport
from pynetdicom import dul as pynetdicom_dul
from pynetdicom.pdu_primitives import P_DATA
from pynetdicom.transport import ThreadedAssociationServer

from pacs_node.errors import IngestError, OutOfResources, UnreadableDataset
from pacs_node.ingest.limits import Lease, SharedLimits, address_key
from pacs_node.ingest.part10 import PREAMBLE, file_meta
from pacs_node.ingest.spool import temporary_part
from pacs_node.ingest.statuses import CANNOT_UNDERSTAND_UNREADABLE, PROCESSING_FAILURE
from pacs_node.tls import ReloadingContext, subject_text

log = logging.getLogger(__name__)

PDU_HEADER = 6
A_ASSOCIATE_RQ, P_DATA_TF = 0x01, 0x04
KNOWN_PDU_TYPES = frozenset(range(0x01, 0x08))
# A-RELEASE-RQ/RP, A-ABORT and A-ASSOCIATE-RJ carry 4 bytes; anything but an A-ASSOCIATE-RQ or a
# P-DATA-TF longer than this is refused unread.
SMALL_PDU_BYTES = 4096
# When max_pdu_bytes is 0 (pynetdicom announces "no limit"), a P-DATA-TF is read up to this.
UNLIMITED_PDU_BYTES = 64 * 2**20
# A-ASSOCIATE-RJ (PS3.8 9.3.4): result 1 permanent / 2 transient, source 3 service provider
# (presentation), reason 2 local-limit-exceeded. A-ABORT (9.3.8): source 2 service provider,
# reason 1 unrecognized-PDU, 6 invalid-PDU-parameter-value.
REJECT_PERMANENT, REJECT_TRANSIENT = 0x01, 0x02
SOURCE_PRESENTATION, LOCAL_LIMIT_EXCEEDED = 0x03, 0x02
ABORT_UNRECOGNIZED_PDU, ABORT_INVALID_PARAMETER = 0x01, 0x06

# Counters (the RecordSink's count()).
LOCAL_LIMIT_COUNTER = "local_limit_refusals"
IDLE_COUNTER = "idle_connections_closed"
OVERSIZED_PDU_COUNTER = "oversized_pdus"
STALLED_COUNTER = "stalled_reads"
OVERSIZED_MESSAGE_COUNTER = "oversized_messages"
TLS_HANDSHAKE_COUNTER = "tls_handshake_failures"

# security_alert(kind, address, detail): a refused TLS handshake or certificate. Kinds:
# "tls-handshake-timeout", "tls-handshake-failed", "tls-handshake-evicted" (closed mid-handshake
# to make room for a newer connection), "tls-certificate-refused" (no or untrusted client
# certificate), "tls-peer-refused-our-certificate" (the client did not trust the node's),
# "tls-certificate-not-bound" (a subject other than peers.yaml's).
# ``detail`` is a short reason (an OpenSSL reason code, a subject): never patient data. The hook
# is where a refused handshake is reported (the default logs it): one that audits should log too.
# Workers send alerts to the node in batches (see workers.py): there ``detail`` may end with
# "(N times in 1 s)".
SecurityAlert = Callable[[str, str, str], None]
# OpenSSL reasons that mean the peer's certificate was missing or not trusted.
_CERTIFICATE_REASONS = ("CERTIFICATE", "UNKNOWN_CA", "NO_CERTIFICATE")
# Alerts the client sent: it refused the certificate the node showed.
_PEER_REFUSED_REASONS = ("TLSV1_ALERT_UNKNOWN_CA", "SSLV3_ALERT_BAD_CERTIFICATE")
SECURITY_LOG_INTERVAL_S = 10.0


def log_security_alert(kind: str, address: str, detail: str) -> None:
    """The default :data:`SecurityAlert`: a warning line, the first of each kind and then at
    most one per ``SECURITY_LOG_INTERVAL_S`` (with how many were not logged): a flood on the
    TLS port must not become a flood of log lines (``tls_handshake_failures`` counts each)."""
    _security_throttle().warning(
        kind, "security alert", {"kind": kind, "address": address, "detail": detail}
    )


@functools.cache
def _security_throttle() -> Throttle:
    return Throttle(SECURITY_LOG_INTERVAL_S)


def handshake_failure_kind(reason: str) -> str:
    """The alert kind for an OpenSSL reason a server-side handshake failed with."""
    if any(word in reason for word in _PEER_REFUSED_REASONS):
        return "tls-peer-refused-our-certificate"
    if any(word in reason for word in _CERTIFICATE_REASONS):
        return "tls-certificate-refused"
    return "tls-handshake-failed"


# pynetdicom gathers a DIMSE command set, and the data set of any message but a C-STORE-RQ (which
# streams to a file), in memory without a limit; these bound them.
COMMAND_LIMIT_BYTES = 64 * 2**10
OTHER_DATA_SET_LIMIT_BYTES = 16 * 2**20
C_STORE_RQ = 0x0001
_COMMAND_FIELD = 0x00000100


def command_field(command: bytes | bytearray) -> int | None:
    """(0000,0100) Command Field of an Implicit VR Little Endian command set, if present."""
    offset = 0
    while offset + 8 <= len(command):
        group, element, length = struct.unpack_from("<HHI", command, offset)
        offset += 8
        if (group << 16 | element) == _COMMAND_FIELD and length == 2:
            (value,) = struct.unpack_from("<H", command, offset)
            return int(value)
        offset += length
    return None


class MessageSizes:
    """Follows the PDVs of P-DATA-TF bodies (PS3.8 9.3.5, E.2) and says when a command set, or
    the data set of a message other than a C-STORE-RQ, grows past its limit."""

    def __init__(self) -> None:
        self._header = bytearray()
        self._left = 0  # bytes of the current PDV's fragment still to come
        self._is_command = False
        self._is_last = False
        self._command = bytearray()
        self._command_done = False
        self._is_store = False
        self._data = 0

    def end_of_pdu(self) -> None:
        """A PDV never spans PDUs; whatever is left is pynetdicom's to refuse."""
        self._header.clear()
        self._left = 0

    def follow(self, data: bytes) -> bool:
        offset = 0
        while offset < len(data):
            if self._left == 0:
                take = min(6 - len(self._header), len(data) - offset)
                self._header += data[offset : offset + take]
                offset += take
                if len(self._header) == 6:
                    length, _context, control = struct.unpack(">LBB", bytes(self._header))
                    self._header.clear()
                    self._start(max(0, length - 2), control)
                continue
            take = min(self._left, len(data) - offset)
            self._left -= take
            if self._is_command:
                if len(self._command) + take > COMMAND_LIMIT_BYTES:
                    return False
                self._command += data[offset : offset + take]
            else:
                self._data += take
                if not self._is_store and self._data > OTHER_DATA_SET_LIMIT_BYTES:
                    return False
            offset += take
            if self._left == 0:
                self._end()
        return True

    def _start(self, length: int, control: int) -> None:
        self._is_command, self._is_last = bool(control & 1), bool(control & 2)
        if self._is_command and self._command_done:  # the next message begins
            self._command.clear()
            self._command_done = False
            self._data = 0
        self._left = length
        if length == 0:
            self._end()

    def _end(self) -> None:
        if not self._is_last:
            return
        if self._is_command:
            self._command_done = True
            self._is_store = command_field(self._command) == C_STORE_RQ
        else:  # the data set is whole: the next PDV starts a new message
            self._command.clear()
            self._command_done = False
            self._data = 0


def associate_reject(result: int, source: int, reason: int) -> bytes:
    return struct.pack(">BBIBBBB", 0x03, 0, 4, 0, result, source, reason)


def abort_pdu(reason: int) -> bytes:
    return struct.pack(">BBIBBBB", 0x07, 0, 4, 0, 0, 0x02, reason)


class Throttle:
    """Log the first of a kind of event, then at most one line per ``interval_s`` with a count
    of those not logged: a flood of refused connections must not become a flood of log lines."""

    def __init__(self, interval_s: float = 10.0) -> None:
        self.interval_s = interval_s
        self._lock = threading.Lock()
        self._last: dict[str, float] = {}
        self._suppressed: dict[str, int] = {}

    def warning(self, kind: str, message: str, extra: dict[str, Any]) -> None:
        now = time.monotonic()
        with self._lock:
            last = self._last.get(kind)
            if last is not None and now - last < self.interval_s:
                self._suppressed[kind] = self._suppressed.get(kind, 0) + 1
                return
            self._last[kind] = now
            suppressed = self._suppressed.pop(kind, 0)
        log.warning(message, extra={**extra, "suppressed": suppressed})


@dataclass(frozen=True, slots=True)
class Guard:
    """Everything a guarded connection needs, built once per SCP from the settings."""

    limits: SharedLimits  # established associations, node-wide
    pending: SharedLimits  # connections awaiting their A-ASSOCIATE-RQ, in this process
    count: Callable[[str], None]
    request_bytes: int  # largest A-ASSOCIATE-RQ read
    data_bytes: int  # largest P-DATA-TF read
    request_timeout_s: float  # from accept to a complete A-ASSOCIATE-RQ
    read_timeout_s: float  # one stalled read inside a PDU, once associated
    incoming: Path  # where received data sets are written (the spool's filesystem)
    max_instance_bytes: int
    throttle: Throttle
    alert: SecurityAlert = log_security_alert


class GuardedSocket(socket.socket):
    """An accepted connection whose reads follow the PDU framing (see the module docstring)."""

    guard: Guard
    address: str
    # Until :meth:`start_guard` (the accept thread wraps a TLS connection first, and Python's
    # ``SSLSocket`` reads from one that was reset before it was accepted) it is a plain socket.
    _guarded = False
    requested = False
    dropped = False

    def start_guard(self, guard: Guard, address: str, pending: Lease) -> None:
        self.guard = guard
        self.address = address
        self.accepted = time.monotonic()
        self._pending: Lease | None = pending
        self._header = bytearray()
        self._body_left = 0
        self._pdu_type = 0
        self._messages = MessageSizes()
        self.requested = False  # a whole A-ASSOCIATE-RQ has been read
        self.dropped = False
        self._peer_closed = False
        self._on_close: list[Callable[[], None]] = []
        self._lock = threading.Lock()
        self._finished = False
        self._assoc: Any = None
        self._guarded = True

    def attach(self, assoc: Any) -> None:
        """The pynetdicom Association reading this connection (from EVT_CONN_OPEN), so that a
        connection dropped before its A-ASSOCIATE-RQ also ends its two threads at once."""
        self._assoc = assoc
        if self.dropped and not self.requested:
            self._end_threads()

    def _end_threads(self) -> None:
        """Stop the DUL reactor (it polls every millisecond) and wake the Association thread
        waiting for the A-ASSOCIATE-RQ: ``None`` reads as its timeout, after which it closes."""
        dul = getattr(self._assoc, "dul", None)
        if dul is None:
            return
        dul.kill_dul()
        dul.to_user_queue.put(None)

    # -- what the SCP attaches -------------------------------------------------------------
    def hold_association(self, lease: Lease) -> None:
        """Keep ``lease`` (an established association) until this connection closes."""
        self.on_close(lease.release)

    def on_close(self, callback: Callable[[], None]) -> None:
        """Call ``callback`` when the connection closes (at once if it has closed already)."""
        with self._lock:
            if not self._finished:
                self._on_close.append(callback)
                return
        callback()

    def forget_on_close(self, callback: Callable[[], None]) -> None:
        """Drop ``callback`` (its work is done): one per C-STORE would otherwise be kept, with
        what it refers to, until the connection closes."""
        with self._lock, contextlib.suppress(ValueError):
            self._on_close.remove(callback)

    # -- reading -----------------------------------------------------------------------------
    def _read_timeout(self) -> float:
        if self.requested:
            return self.guard.read_timeout_s
        return self.accepted + self.guard.request_timeout_s - time.monotonic()

    def recv(self, bufsize: int, flags: int = 0) -> bytes:
        if not self._guarded:
            return super().recv(bufsize, flags)
        if self.dropped:
            return b""
        in_header = self._body_left == 0
        want = min(bufsize, PDU_HEADER - len(self._header) if in_header else self._body_left)
        timeout = self._read_timeout()
        if timeout <= 0:
            self._drop_idle()
            return b""
        try:
            self.settimeout(timeout)
            data = super().recv(want, flags)
        except TimeoutError:
            if self.requested:
                self._stalled()
            else:
                self._drop_idle()
            return b""
        except OSError:
            self._peer_closed = True
            return b""
        if not data:
            self._peer_closed = True
            return data
        if not in_header:
            self._body_left -= len(data)
            if self._pdu_type == P_DATA_TF and self.requested and not self._messages.follow(data):
                self._oversized_message()
                return b""
            if self._body_left == 0:
                self._messages.end_of_pdu()
                if not self.requested and self._pdu_type == A_ASSOCIATE_RQ:
                    self._requested()
            return data
        self._header += data
        if len(self._header) < PDU_HEADER:
            return data
        pdu_type, _, length = struct.unpack(">BBL", bytes(self._header))
        self._header.clear()
        self._pdu_type = pdu_type
        if not self._allowed(pdu_type, length):
            return b""
        self._body_left = length
        if length == 0 and not self.requested and pdu_type == A_ASSOCIATE_RQ:
            self._requested()
        return data

    def _allowed(self, pdu_type: int, length: int) -> bool:
        guard = self.guard
        if pdu_type not in KNOWN_PDU_TYPES:
            limit = 0
        elif not self.requested:
            limit = guard.request_bytes if pdu_type == A_ASSOCIATE_RQ else SMALL_PDU_BYTES
        else:
            limit = guard.data_bytes if pdu_type == P_DATA_TF else SMALL_PDU_BYTES
        if length <= limit:
            return True
        if not self.requested and pdu_type == A_ASSOCIATE_RQ:
            answer = associate_reject(REJECT_PERMANENT, SOURCE_PRESENTATION, LOCAL_LIMIT_EXCEEDED)
        elif pdu_type not in KNOWN_PDU_TYPES:
            answer = abort_pdu(ABORT_UNRECOGNIZED_PDU)
        else:
            answer = abort_pdu(ABORT_INVALID_PARAMETER)
        guard.count(OVERSIZED_PDU_COUNTER)
        guard.throttle.warning(
            "oversized",
            "PDU refused unread: longer than allowed",
            {
                "address": self.address,
                "pdu_type": f"0x{pdu_type:02X}",
                "declared_bytes": length,
                "allowed_bytes": limit,
            },
        )
        self._drop(answer)
        return False

    def _oversized_message(self) -> None:
        self.guard.count(OVERSIZED_MESSAGE_COUNTER)
        self.guard.throttle.warning(
            "oversized-message",
            "association aborted: a DIMSE command or a non-storage data set is too large",
            {"address": self.address},
        )
        self._drop(abort_pdu(ABORT_INVALID_PARAMETER))

    def _requested(self) -> None:
        self.requested = True
        self._release_pending()

    def _stalled(self) -> None:
        self.guard.count(STALLED_COUNTER)
        self.guard.throttle.warning(
            "stalled",
            "connection dropped: a PDU stalled mid-read",
            {"address": self.address, "timeout_s": self.guard.read_timeout_s},
        )
        self._drop(abort_pdu(0x00))

    def _drop_idle(self) -> None:
        self.guard.count(IDLE_COUNTER)
        self.guard.throttle.warning(
            "idle",
            "connection dropped: no A-ASSOCIATE-RQ in time",
            {"address": self.address, "timeout_s": self.guard.request_timeout_s},
        )
        self._drop(b"")

    def evict(self) -> None:
        """Close a pending connection to make room for a newer one (see GuardedServer)."""
        self.guard.count(IDLE_COUNTER)
        self._drop(b"")

    def _drop(self, answer: bytes) -> None:
        """Answer (best effort), then shut the connection; the reader sees it closed."""
        with self._lock:
            if self.dropped:
                return
            self.dropped = True
        self._release_pending()
        if not self.requested:
            self._end_threads()
        try:
            if answer:
                self.settimeout(1.0)
                self.sendall(answer)
            self.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass

    def _release_pending(self) -> None:
        pending, self._pending = self._pending, None
        if pending is not None:
            pending.release()

    def close(self) -> None:
        guard = getattr(self, "guard", None)
        if guard is not None:
            if not self.requested and not self.dropped and not self._peer_closed:
                # pynetdicom's own ARTIM or ACSE timer closed it before the RQ came.
                self._drop_idle()
            self._release_pending()
            with self._lock:
                self._finished = True
                callbacks, self._on_close = self._on_close, []
            for callback in callbacks:
                callback()
        super().close()


class GuardedTLSSocket(GuardedSocket, ssl.SSLSocket):  # type: ignore[misc]  # recv: same use
    """A guarded connection over TLS. Wrapped on the accept thread without any I/O; its
    :meth:`handshake` runs on the connection's own thread before pynetdicom reads from it."""

    tls_subject: str | None = None  # the verified client certificate's subject (RFC 4514)

    def handshake(self) -> bool:
        """Complete the TLS handshake by the connection's deadline (``assoc_request_timeout_s``
        after the accept, as for the A-ASSOCIATE-RQ); on failure count it, report it to the
        guard's ``alert``, close the connection and return False."""
        guard = self.guard
        try:
            remaining = self.accepted + guard.request_timeout_s - time.monotonic()
            if self.dropped or remaining <= 0:
                raise TimeoutError
            self.settimeout(remaining)
            self.do_handshake()
            if self.context.verify_mode != ssl.CERT_NONE:  # a certificate shown was verified
                self.tls_subject = subject_text(self.getpeercert(binary_form=True))
            if self.dropped:  # closed to make room just as the handshake ended
                raise OSError("closed to make room")
            return True
        except TimeoutError:
            kind, detail = "tls-handshake-timeout", f"no handshake in {guard.request_timeout_s} s"
        except ssl.SSLError as exc:
            detail = str(exc.reason or type(exc).__name__)
            kind = handshake_failure_kind(detail)
        except (OSError, AttributeError, ValueError) as exc:  # reset, or closed to make room
            kind, detail = "tls-handshake-failed", type(exc).__name__
        if self.dropped:  # closed to make room for a newer connection (counted there)
            kind, detail = "tls-handshake-evicted", "closed to make room for a newer connection"
        else:
            guard.count(TLS_HANDSHAKE_COUNTER)
        try:
            guard.alert(kind, self.address, detail)
        except Exception:
            log.exception("the security alert hook failed")
        self._drop(b"")
        return False


def connection_of(assoc: Any) -> GuardedSocket | None:
    """The guarded connection an acceptor association reads (None for any other)."""
    connection = getattr(getattr(assoc, "dul", None), "socket", None)
    raw = getattr(connection, "socket", None)
    return raw if isinstance(raw, GuardedSocket) else None


def tls_subject(assoc: Any) -> str | None:
    """The subject of the client certificate an association's peer showed over TLS (RFC 4514,
    e.g. ``CN=CT1,O=Hospital``); None on the plain port or when it showed none."""
    connection = connection_of(assoc)
    return connection.tls_subject if isinstance(connection, GuardedTLSSocket) else None


def is_tls(assoc: Any) -> bool:
    """Whether an acceptor association came in over DICOM TLS."""
    return isinstance(connection_of(assoc), GuardedTLSSocket)


class GuardedServer(ThreadedAssociationServer):
    """pynetdicom's threaded server, accepting connections as :class:`GuardedSocket` (over TLS
    as :class:`GuardedTLSSocket` when given ``tls``, the server context in force)."""

    def __init__(
        self, *args: Any, guard: Guard, tls: ReloadingContext | None = None, **kwargs: Any
    ) -> None:
        self.guard = guard
        self.tls = tls
        self._pending: list[GuardedSocket] = []
        self._pending_lock = threading.Lock()
        super().__init__(*args, **kwargs)

    def get_request(self) -> tuple[socket.socket, tuple[str, int]]:
        """Accept and wrap a connection. socketserver survives only an ``OSError`` here (it
        skips that connection): anything else would end ``serve_forever`` and close the port
        for good, so whatever one connection raises is turned into one."""
        sock, address = super().get_request()
        try:
            if self.tls is not None:
                context = self.tls.context()  # a renewed certificate serves from here on
                context.sslsocket_class = GuardedTLSSocket
                wrapped = context.wrap_socket(sock, server_side=True, do_handshake_on_connect=False)
                if not isinstance(wrapped, GuardedTLSSocket):
                    wrapped.close()
                    raise OSError("the TLS context did not wrap a guarded socket")
                return wrapped, address
            guarded = GuardedSocket(sock.family, sock.type, sock.proto, fileno=sock.detach())
            return guarded, address
        except Exception as exc:
            sock.close()  # nothing left to close once wrapped (the wrapper took the descriptor)
            if isinstance(exc, OSError):
                raise
            log.exception("a connection could not be accepted")
            raise OSError(f"connection not accepted: {type(exc).__name__}") from exc

    def process_request_thread(self, request: Any, client_address: Any) -> None:
        """The connection's own thread: over TLS the handshake comes first, here."""
        if isinstance(request, GuardedTLSSocket):
            try:
                shaken = request.handshake()
            except Exception:
                log.exception("TLS handshake failed unexpectedly")
                shaken = False
            if not shaken:
                self.shutdown_request(request)
                return
        super().process_request_thread(request, client_address)

    def verify_request(self, request: Any, client_address: Any) -> bool:
        """Admit a new connection as pending, making room by closing our oldest pending one
        from the same address (or any, at the total limit) when a limit is reached."""
        guarded: GuardedSocket = request
        address = str(client_address[0])
        limits = self.guard.pending
        lease = limits.take_pending(address)
        if lease is None:
            which = limits.pending_limit(address)
            if self._evict(address if which == "address" else None):
                lease = limits.take_pending(address)
        if lease is None:
            self.guard.count(LOCAL_LIMIT_COUNTER)
            self.guard.throttle.warning(
                "pending-limit",
                "connection refused: local limit of connections awaiting A-ASSOCIATE-RQ",
                {
                    "address": address,
                    "pending": limits.pending(),
                    "per_address": limits.caps.pending_per_address,
                },
            )
            if not isinstance(guarded, GuardedTLSSocket):  # no TLS session to answer in yet
                with contextlib.suppress(OSError):  # read after its A-ASSOCIATE-RQ, if at all
                    guarded.setblocking(False)
                    guarded.send(
                        associate_reject(
                            REJECT_TRANSIENT, SOURCE_PRESENTATION, LOCAL_LIMIT_EXCEEDED
                        )
                    )
            return False
        guarded.start_guard(self.guard, address, lease)
        with self._pending_lock:
            self._pending = [s for s in self._pending if not (s.requested or s.dropped)]
            self._pending.append(guarded)
        return True

    def _evict(self, address: str | None) -> bool:
        key = address_key(address) if address is not None else None
        with self._pending_lock:
            self._pending = [s for s in self._pending if not (s.requested or s.dropped)]
            for candidate in self._pending:  # oldest first
                if key is None or address_key(candidate.address) == key:
                    self._pending.remove(candidate)
                    break
            else:
                return False
        candidate.evict()
        return True


# -- chunked C-STORE receive ----------------------------------------------------------------------

_RESOURCE_ERRNOS = {errno.ENOSPC, errno.EDQUOT, errno.EIO, errno.EROFS, errno.EMFILE, errno.ENFILE}
_META_GROUP_LENGTH = b"\x02\x00\x00\x00UL\x04\x00"
_open_files: dict[str, ReceivedFile] = {}
_open_lock = threading.Lock()
_pynetdicom_temporary_file = dimse_messages.NamedTemporaryFile  # type: ignore[attr-defined]
_pynetdicom_create_file_meta = dimse_messages.create_file_meta  # type: ignore[attr-defined]
_pydicom_write_file_meta_info = dimse_messages.write_file_meta_info  # type: ignore[attr-defined]


def _nothing() -> None:
    pass


_META_UID_NAMES = ("Affected SOP Class UID", "Affected SOP Instance UID", "Transfer Syntax UID")


class ReceivedFile:
    """A C-STORE data set written to the spool's incoming folder while its PDUs arrive (or a
    STOW-RS part while its bytes arrive, see :mod:`pacs_node.ingest.stow`).

    pynetdicom writes a preamble and its own File Meta Information, then each data set fragment,
    and calls ``file.flush()`` after each. The meta pynetdicom writes is replaced by ours (the
    same bytes as :func:`~pacs_node.ingest.part10.file_meta`, Source AE included), so the file
    is the spool file as it will be linked. Beyond ``max_bytes`` of data set nothing more is
    written. The SHA-256 of the data set (without the Part 10 header, which names the calling
    AE) is computed as it is written, as :class:`~pacs_node.ingest.spool.DataSetDigest` does.
    """

    def __init__(self, directory: Path, max_bytes: int, source_ae: str) -> None:
        fd, name = temporary_part(directory)
        self.name = name
        self.path = Path(name)
        self.max_bytes = max_bytes
        self.source_ae = source_ae
        self._handle = os.fdopen(fd, "wb", buffering=2**20)
        self._prefix = bytearray()
        self.dataset_offset: int | None = None  # where the data set starts in the file
        # (SOP Class, SOP Instance, Transfer Syntax) UIDs of the File Meta Information received
        self.meta_uids: tuple[str, str, str] | None = None
        self.dataset_bytes = 0  # received, including any not kept
        self.size = 0  # bytes in the file
        self.oversized = False
        self.error: IngestError | None = None
        self._digest = hashlib.sha256()
        self._lock = threading.Lock()
        self._state = "receiving"  # -> claimed (by the C-STORE handler) | discarded
        self.unhook: Callable[[], None] = _nothing  # forgets the connection's close callback

    @property
    def file(self) -> ReceivedFile:
        return self  # pynetdicom calls ``.file.flush()``

    def flush(self) -> None:
        """Kept buffered: the handler flushes and the spool fsyncs once the data set is whole."""

    def write(self, data: bytes | bytearray | memoryview) -> int:
        length = len(data)
        if self.error is not None or self._state == "discarded":
            return length
        try:
            if self.dataset_offset is None:
                self._prefix += data
                self._start_dataset()
            else:
                self._write_dataset(data)
        except OSError as exc:
            self._fail(exc)
        return length

    def start(
        self,
        sop_class_uid: str | None,
        sop_instance_uid: str | None,
        transfer_syntax_uid: str | None,
    ) -> None:
        """The File Meta Information pynetdicom would write next, given as its UIDs (from the
        C-STORE request and the presentation context): our header is written from them
        directly, after the preamble and prefix pynetdicom wrote. A missing or empty one
        (an Affected SOP Class UID left out of the request) refuses the data set."""
        if self.error is not None or self._state == "discarded":
            return
        if self.dataset_offset is not None or bytes(self._prefix) != PREAMBLE:
            self.error = UnreadableDataset("unexpected file meta from the network layer")
            return
        try:
            self._header((sop_class_uid, sop_instance_uid, transfer_syntax_uid), b"")
        except OSError as exc:
            self._fail(exc)

    def _header(self, given: tuple[Any, Any, Any], rest: bytes) -> None:
        """Write our Part 10 header for the ``given`` UIDs, then ``rest`` (data set bytes
        already read); a missing or empty UID (never written as "None" or "") refuses it."""
        for name, uid in zip(_META_UID_NAMES, given, strict=True):
            if uid is None or not str(uid).strip("\0 "):
                self.error = UnreadableDataset(f"the request has no {name}")
                return
        uids = (str(given[0]), str(given[1]), str(given[2]))
        try:
            ours = file_meta(*uids, self.source_ae)
        except Exception as exc:  # hostile UIDs from the command set
            self.error = UnreadableDataset(f"file meta cannot be written: {type(exc).__name__}")
            return
        self.meta_uids = uids
        self._handle.write(ours)
        self.size = len(ours)
        self.dataset_offset = len(ours)
        self._prefix = bytearray()
        if rest:
            self._write_dataset(rest)

    def _start_dataset(self) -> None:
        prefix = self._prefix
        if len(prefix) < len(PREAMBLE) + 12:
            return
        if bytes(prefix[len(PREAMBLE) : len(PREAMBLE) + 8]) != _META_GROUP_LENGTH:
            self.error = UnreadableDataset("unexpected file meta from the network layer")
            return
        (group_length,) = struct.unpack("<I", prefix[len(PREAMBLE) + 8 : len(PREAMBLE) + 12])
        end = len(PREAMBLE) + 12 + group_length
        if len(prefix) < end:
            return
        try:
            meta = read_dataset(BytesIO(bytes(prefix[len(PREAMBLE) : end])), False, True)
            uids = (
                meta.get("MediaStorageSOPClassUID"),
                meta.get("MediaStorageSOPInstanceUID"),
                meta.get("TransferSyntaxUID"),
            )
        except Exception as exc:  # hostile UIDs from the command set
            self.error = UnreadableDataset(f"file meta cannot be written: {type(exc).__name__}")
            return
        self._header(uids, bytes(prefix[end:]))

    def _write_dataset(self, data: bytes | bytearray | memoryview) -> None:
        self.dataset_bytes += len(data)
        if self.oversized:
            return
        if self.dataset_bytes > self.max_bytes:
            self.oversized = True  # keep nothing: the file is refused whole
            self._handle.seek(0)
            self._handle.truncate()
            self.size = 0
            return
        self._handle.write(data)
        self._digest.update(data)
        self.size += len(data)

    def _fail(self, exc: OSError) -> None:
        if exc.errno in _RESOURCE_ERRNOS:
            self.error = OutOfResources(f"spool write failed: {os.strerror(exc.errno or 0)}")
        else:
            self.error = OutOfResources(f"spool write failed: {type(exc).__name__}")

    @property
    def sha256(self) -> str:
        """Hex SHA-256 of the data set as received (the Part 10 header left out)."""
        return self._digest.hexdigest()

    def claim(self) -> bool:
        """The C-STORE handler takes the file (False: the association ended first)."""
        with self._lock:
            if self._state != "receiving":
                return False
            self._state = "claimed"
        with _open_lock:
            _open_files.pop(self.name, None)
        self.unhook()
        return True

    def finish(self) -> None:
        """Flush what is buffered and close; raise the error met while writing, if any."""
        try:
            self._handle.close()
        except OSError as exc:
            self._fail(exc)
        if self.error is not None:
            raise self.error
        if self.dataset_offset is None:
            raise UnreadableDataset("no data set received")

    def close(self) -> None:
        with contextlib.suppress(OSError):
            self._handle.close()

    def remove(self) -> None:
        """Close and delete the temporary name (the spool's link, if made, stays)."""
        self.close()
        self.path.unlink(missing_ok=True)

    def discard(self) -> None:
        """Close and delete unless the handler claimed it (a data set never answered)."""
        with self._lock:
            if self._state == "claimed":
                return
            self._state = "discarded"
        with _open_lock:
            _open_files.pop(self.name, None)
        self.unhook()
        self.close()
        self.path.unlink(missing_ok=True)


def received_file(path: str | os.PathLike[str]) -> ReceivedFile | None:
    """The :class:`ReceivedFile` pynetdicom names by ``event.dataset_path``."""
    with _open_lock:
        return _open_files.get(os.fspath(path))


def _temporary_file(*args: Any, **kwargs: Any) -> Any:
    """Stands in for ``NamedTemporaryFile`` in pynetdicom's chunked C-STORE receive."""
    dul = threading.current_thread()  # the DUL reactor decodes P-DATA on its own thread
    assoc = getattr(dul, "assoc", None)
    dul_socket = getattr(getattr(assoc, "dul", None), "socket", None)
    raw = getattr(dul_socket, "socket", None)
    if not isinstance(raw, GuardedSocket) or assoc is None:
        return _pynetdicom_temporary_file(*args, **kwargs)
    guard = raw.guard
    source_ae = str(assoc.requestor.ae_title).strip()
    received = ReceivedFile(guard.incoming, guard.max_instance_bytes, source_ae)
    with _open_lock:
        _open_files[received.name] = received
    raw.on_close(received.discard)
    received.unhook = functools.partial(raw.forget_on_close, received.discard)
    return received


class _MetaUIDs:
    """What ``dimse_messages.create_file_meta`` is asked for, kept as the three UIDs as given
    (a missing one stays None): for a :class:`ReceivedFile` they go straight into our own
    header (nothing encoded by pydicom and read back), which refuses a missing or empty one;
    for any other file the real File Meta Information is built from them."""

    __slots__ = ("uids",)

    def __init__(self, sop_class_uid: Any, sop_instance_uid: Any, transfer_syntax: Any) -> None:
        self.uids: tuple[Any, Any, Any] = (sop_class_uid, sop_instance_uid, transfer_syntax)


def _create_file_meta(*, sop_class_uid: Any, sop_instance_uid: Any, transfer_syntax: Any) -> Any:
    """Stands in for ``create_file_meta`` in pynetdicom's chunked C-STORE receive."""
    return _MetaUIDs(sop_class_uid, sop_instance_uid, transfer_syntax)


def _write_file_meta_info(fp: Any, file_meta: Any, enforce_standard: bool = True) -> None:
    """Stands in for ``write_file_meta_info`` in pynetdicom's chunked C-STORE receive."""
    if not isinstance(file_meta, _MetaUIDs):
        _pydicom_write_file_meta_info(fp, file_meta, enforce_standard)
        return
    if isinstance(fp, ReceivedFile):
        fp.start(*file_meta.uids)
        return
    sop_class, sop_instance, syntax = file_meta.uids
    meta = _pynetdicom_create_file_meta(
        sop_class_uid=sop_class, sop_instance_uid=sop_instance, transfer_syntax=syntax
    )
    _pydicom_write_file_meta_info(fp, meta, enforce_standard)


# pynetdicom's DIMSEServiceProvider.receive_primitive keeps a request whose command set announces a
# data set ((0000,0800) other than 0x0101) open until that data set's last fragment: when the next
# PDV is a command instead (a client that sent an empty data set as nothing), the next request's
# command set is appended to the open one, the first request is never answered and its received
# file is kept until the connection closes. It also stops reading a P-DATA at the PDV that
# completes a message, losing any PDV after it in the same PDU. Here each PDV is decoded on its
# own, and a command PDV that finds a request waiting for its data set first ends that request:
# answered with a failure status (Cannot understand for a C-STORE, Processing failure otherwise),
# its file discarded.
_pynetdicom_receive_primitive = pynetdicom_dimse.DIMSEServiceProvider.receive_primitive
MISSING_DATA_SET_COUNTER = "requests_without_data_set"
_MISSING_DATA_SET = "data set announced, the next request came instead"  # at most 64


def _receive_primitive(self: pynetdicom_dimse.DIMSEServiceProvider, primitive: Any) -> None:
    """Stands in for ``DIMSEServiceProvider.receive_primitive`` (see above)."""
    values = getattr(primitive, "presentation_data_value_list", None)
    if not isinstance(primitive, P_DATA) or not values:
        _pynetdicom_receive_primitive(self, primitive)
        return
    self._pacs_node_last_pdv = time.monotonic()  # type: ignore[attr-defined]
    if len(values) == 1:
        _end_if_data_set_missing(self, values[0][1])
        _pynetdicom_receive_primitive(self, primitive)
        return
    for context_id, data in list(values):
        _end_if_data_set_missing(self, data)
        single = P_DATA()
        single.presentation_data_value_list = []  # filled as pynetdicom's P_DATA_TF does
        single.presentation_data_value_list.append((context_id, data))
        _pynetdicom_receive_primitive(self, single)


def _awaiting_data_set(dimse: Any) -> Any:
    """The request whose command set is decoded and whose data set is still to come, if any
    (pynetdicom changes a message's class once its command set is whole)."""
    message = getattr(dimse, "message", None)
    if message is None or type(message) is dimse_messages.DIMSEMessage:
        return None
    return message


def _end_if_data_set_missing(dimse: Any, pdv: bytes) -> None:
    """When ``pdv`` starts a command while a decoded command waits for its data set, answer
    that request with a failure and clear it."""
    if pdv and pdv[0] & 1 and _awaiting_data_set(dimse) is not None:
        _end_open_request(dimse)


def _end_open_request(dimse: Any) -> None:
    """Answer the request waiting for its data set with a failure and clear it."""
    message = dimse.message
    dimse.message = None
    received = getattr(message, "_data_set_file", None)
    if isinstance(received, ReceivedFile):
        received.discard()
    elif received is not None:  # pynetdicom's own temporary file (an unguarded connection)
        with contextlib.suppress(OSError):
            received.close()
            Path(received.name).unlink(missing_ok=True)
    answer = _failure_answer(message)
    raw = getattr(getattr(getattr(dimse, "dul", None), "socket", None), "socket", None)
    if isinstance(raw, GuardedSocket) and raw._guarded:
        raw.guard.count(MISSING_DATA_SET_COUNTER)
        raw.guard.throttle.warning(
            MISSING_DATA_SET_COUNTER,
            "request without its data set refused",
            {"address": raw.address, "request": type(message).__name__},
        )
    if answer is not None:
        dimse.send_msg(answer, message.context_id)


def _failure_answer(message: Any) -> Any:
    """The failure response to a request ``message`` whose data set never came (None when it
    is no request, or names no Message ID to answer)."""
    name = type(message).__name__
    if not name.endswith("_RQ"):
        return None
    try:
        command = message.command_set
        message_id = command.get("MessageID")
        if message_id is None:
            return None
        answer: Any = dimse_messages._MSG_TO_PRIMITVE[name[:-3]]()
        answer.MessageIDBeingRespondedTo = message_id
        for keyword in ("AffectedSOPClassUID", "AffectedSOPInstanceUID"):
            if hasattr(answer, keyword) and command.get(keyword):
                setattr(answer, keyword, command.get(keyword))
        is_store = name == "C_STORE_RQ"
        answer.Status = CANNOT_UNDERSTAND_UNREADABLE if is_store else PROCESSING_FAILURE
        if hasattr(answer, "ErrorComment"):
            answer.ErrorComment = _MISSING_DATA_SET
        return answer
    except Exception as exc:  # hostile values in the command set: leave it unanswered
        log.warning(
            "request without its data set not answered", extra={"error": type(exc).__name__}
        )
        return None


# pynetdicom's AssociationSocket.recv reads a PDU body 4096 bytes at a time: a 256 KiB PDU is 64
# calls through GuardedSocket.recv. A guarded connection is read in larger steps instead (each
# step still goes through GuardedSocket.recv, which never reads past the PDU it is in).
_RECV_STEP = 256 * 2**10  # CPython reserves a recv's whole buffer before it blocks
_pynetdicom_recv = transport.AssociationSocket.recv


def _association_recv(self: transport.AssociationSocket, nr_bytes: int) -> bytearray:
    """Stands in for ``AssociationSocket.recv``: the same loop (a short read returns what was
    read), in steps of up to ``_RECV_STEP`` on a guarded connection."""
    raw = self.socket
    if not isinstance(raw, GuardedSocket) or not raw._guarded:
        return _pynetdicom_recv(self, nr_bytes)
    data = raw.recv(min(nr_bytes, _RECV_STEP))
    if len(data) == nr_bytes or not data:
        return bytearray(data)
    bytestream = bytearray(data)
    while len(bytestream) < nr_bytes:
        data = raw.recv(min(nr_bytes - len(bytestream), _RECV_STEP))
        if not data:
            break
        bytestream += data
    return bytestream


# pynetdicom's reactors poll: the DUL thread sleeps ``_run_loop_delay`` (1 ms) whenever it found
# nothing to do, and the acceptor's Association thread sleeps 1 ms before each look for a decoded
# DIMSE message. On one association that is up to a millisecond before the next request's PDUs
# are read and another before its handler runs, per C-STORE. Their ``time`` module is replaced
# by one whose ``sleep`` ends those two pauses early, when what they wait for is there: data on a
# guarded connection (the DUL thread), a decoded message (the Association thread). Every other
# sleep, and every pause on any other connection, is ``time.sleep`` as before; no pause is longer.
_REACTOR_PAUSE_S = 0.001


# A request waiting for its data set with no PDV for this share of the read timeout (so before
# the association's own idle timeout aborts it) is answered with a failure and cleared: a client
# that sent an empty data set as nothing and waits for the answer gets one, and goes on.
DATA_SET_WAIT_SHARE = 0.5


def _end_stalled_request(reactor: Any, wait_s: float) -> None:
    """On the DUL reactor's thread (where P-DATA is decoded), between reads."""
    dimse = getattr(getattr(reactor, "assoc", None), "dimse", None)
    if _awaiting_data_set(dimse) is None:
        return
    last = getattr(dimse, "_pacs_node_last_pdv", None)
    if last is not None and time.monotonic() - last > wait_s:
        _end_open_request(dimse)


def _dul_sleep(seconds: float) -> None:
    """The DUL reactor's idle pause: until data arrives on its guarded connection."""
    reactor = threading.current_thread()
    if not isinstance(reactor, pynetdicom_dul.DULServiceProvider):
        time.sleep(seconds)
        return
    raw = getattr(reactor.socket, "socket", None)
    if isinstance(raw, GuardedSocket) and raw._guarded and not raw.dropped:
        _end_stalled_request(reactor, raw.guard.read_timeout_s * DATA_SET_WAIT_SHARE)
        try:
            select.select([raw], [], [], seconds)
            return
        except (OSError, ValueError):  # closed meanwhile: the reactor sees it next
            pass
    time.sleep(seconds)


def _association_sleep(seconds: float) -> None:
    """The acceptor reactor's 1 ms pause: until a decoded DIMSE message is queued for it."""
    reactor = threading.current_thread()
    if seconds != _REACTOR_PAUSE_S or not isinstance(reactor, pynetdicom_association.Association):
        time.sleep(seconds)
        return
    messages = getattr(reactor.dimse, "msg_queue", None)
    if isinstance(messages, queue.Queue):
        with messages.not_empty:
            if not messages.queue:
                messages.not_empty.wait(seconds)
        return
    time.sleep(seconds)


def _clock(sleep: Callable[[float], None]) -> types.ModuleType:
    """A stand-in for the ``time`` module: the same functions, ``sleep`` replaced."""
    clock = types.ModuleType("time")
    clock.__dict__.update({k: v for k, v in vars(time).items() if not k.startswith("__")})
    clock.sleep = sleep  # type: ignore[attr-defined]
    return clock


def install_received_files() -> None:
    """Route pynetdicom's chunked C-STORE receive into :class:`ReceivedFile`, read guarded
    connections in large steps, answer a request whose data set never came, and end the
    reactors' idle pauses early (idempotent)."""
    dimse_messages.NamedTemporaryFile = _temporary_file  # type: ignore[attr-defined]
    dimse_messages.create_file_meta = _create_file_meta  # type: ignore[attr-defined,assignment]
    dimse_messages.write_file_meta_info = _write_file_meta_info  # type: ignore[attr-defined]
    transport.AssociationSocket.recv = _association_recv  # type: ignore[method-assign]
    provider = pynetdicom_dimse.DIMSEServiceProvider
    provider.receive_primitive = _receive_primitive  # type: ignore[method-assign]
    if getattr(pynetdicom_dul.time, "sleep", None) is not _dul_sleep:  # type: ignore[attr-defined]
        pynetdicom_dul.time = _clock(_dul_sleep)  # type: ignore[attr-defined]
    clock = pynetdicom_association.time  # type: ignore[attr-defined]
    if getattr(clock, "sleep", None) is not _association_sleep:
        pynetdicom_association.time = _clock(_association_sleep)  # type: ignore[attr-defined]
