"""Forwarding the audit trail to a syslog collector: RFC 5424 messages over TLS (RFC 5425).

The standard library's ``logging.handlers.SysLogHandler`` writes neither RFC 5424 headers nor
TLS, nor the octet-counting framing RFC 5425 requires, hence this small writer. Per IHE ATNA
(ITI TF-2, Record Audit Event, which PS3.15 A.6 follows): facility 10 (security/authorization),
severity notice (PRI 85), APP-NAME the application, MSGID ``IHE+RFC-3881``, no structured data,
the message the AuditMessage XML in UTF-8 after a byte-order mark.

:class:`SyslogForwarder` sends what the catalog holds unsent, oldest first, and marks each
forwarded only after the collector's connection took it; while the collector is away it waits
with a growing delay (``BACKOFF_S``), and the events keep in the catalog, so a restart loses
none. A message may be sent twice (a connection lost after the write, before the mark). RFC 5425
has no acknowledgement: an idle connection is checked for the collector's EOF before each batch,
but a message written in the moment the collector dies can die with it.
"""

from __future__ import annotations

import contextlib
import logging
import os
import select
import socket
import ssl
import threading
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

from pacs_node.catalog.audit import mark_forwarded, unsent
from pacs_node.catalog.db import Catalog
from pacs_node.tls import TLSFileError

log = logging.getLogger(__name__)

FACILITY_AUTHPRIV = 10
SEVERITY_NOTICE = 5
APP_NAME = "pacs-node"
MSGID = "IHE+RFC-3881"
BOM = b"\xef\xbb\xbf"
BACKOFF_S = (0.5, 1.0, 2.0, 5.0, 10.0)  # a connection attempt every 10 s at most: cheap
POLL_S = 1.0
CONNECT_TIMEOUT_S = 10.0
STOP_GRACE_S = 2.0


def format_message(
    xml: str | bytes,
    *,
    hostname: str | None = None,
    at: datetime | None = None,
    procid: str | None = None,
) -> bytes:
    """One RFC 5424 SYSLOG-MSG carrying an audit message; TIMESTAMP ``at``: the event's time
    (the forwarder passes it), not the time of sending."""
    stamp = (at or datetime.now(UTC)).isoformat(timespec="milliseconds")
    host = (hostname or socket.gethostname() or "-").replace(" ", "")[:255]
    header = (
        f"<{FACILITY_AUTHPRIV * 8 + SEVERITY_NOTICE}>1 {stamp} {host} {APP_NAME} "
        f"{procid or '-'} {MSGID} - "
    )
    body = xml.encode("utf-8") if isinstance(xml, str) else xml
    return header.encode("ascii", "replace") + BOM + body


def frame(message: bytes) -> bytes:
    """RFC 5425 octet-counting: ``MSG-LEN SP SYSLOG-MSG``."""
    return str(len(message)).encode("ascii") + b" " + message


@dataclass(frozen=True)
class Collector:
    host: str
    port: int
    ca_file: Path | None = None
    cert_file: Path | None = None
    key_file: Path | None = None

    def context(self) -> ssl.SSLContext:
        """Verifies the collector's certificate (against ``ca_file`` or the system's CAs) and
        its name; offers a client certificate when one is configured (mutual authentication).
        A file that is missing or does not load raises :class:`~pacs_node.tls.TLSFileError`
        naming its setting."""
        try:
            context = ssl.create_default_context(
                ssl.Purpose.SERVER_AUTH, cafile=str(self.ca_file) if self.ca_file else None
            )
        except (OSError, ssl.SSLError) as exc:
            raise TLSFileError("audit_syslog_ca_file", _why(exc)) from exc
        context.minimum_version = ssl.TLSVersion.TLSv1_2
        if self.cert_file is not None:
            try:
                context.load_cert_chain(
                    str(self.cert_file), str(self.key_file) if self.key_file else None
                )
            except (OSError, ssl.SSLError) as exc:
                raise TLSFileError(
                    "audit_syslog_cert_file" if self.key_file is None else "audit_syslog_key_file",
                    f"the certificate or its key does not load: {_why(exc)}",
                ) from exc
        return context


def _why(exc: BaseException) -> str:
    if isinstance(exc, FileNotFoundError):
        return f"no such file: {exc.filename}"
    return getattr(exc, "reason", None) or getattr(exc, "strerror", None) or type(exc).__name__


class SyslogForwarder:
    """A thread sending the catalog's unsent audit messages to one collector, in order."""

    def __init__(self, catalog: Catalog, collector: Collector) -> None:
        self.catalog = catalog
        self.collector = collector
        self._context = collector.context()
        self._stop = threading.Event()
        self._wake = threading.Event()
        self._thread: threading.Thread | None = None
        self._connection: ssl.SSLSocket | None = None
        self._hostname = socket.gethostname()
        self._procid = str(os.getpid())

    def start(self) -> None:
        self._thread = threading.Thread(target=self._run, name="audit-syslog", daemon=True)
        self._thread.start()

    def wake(self) -> None:
        self._wake.set()

    def alive(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    def stop(self, timeout: float = 5.0) -> None:
        """Send what is ready (for up to ``timeout``), then close the connection. The sender
        is joined before its connection is closed (and before the node closes the catalog):
        one stuck in a send has its connection shut under it, and is waited for again."""
        self._stop.set()
        self._wake.set()
        thread = self._thread
        if thread is not None:
            thread.join(timeout)
            connection = self._connection
            if thread.is_alive() and connection is not None:
                with contextlib.suppress(OSError):
                    connection.shutdown(socket.SHUT_RDWR)
                thread.join(STOP_GRACE_S)
            if thread.is_alive():
                log.error("audit syslog sender did not stop")
                return
        self._close()

    def _connect(self) -> ssl.SSLSocket:
        if self._connection is not None and _closed_by_peer(self._connection):
            self._close()  # the collector went away while idle: do not write into the void
        if self._connection is None:
            raw = socket.create_connection(
                (self.collector.host, self.collector.port), timeout=CONNECT_TIMEOUT_S
            )
            try:
                self._connection = self._context.wrap_socket(
                    raw, server_hostname=self.collector.host
                )
            except BaseException:
                raw.close()
                raise
            log.info(
                "audit collector connected",
                extra={"host": self.collector.host, "port": self.collector.port},
            )
        return self._connection

    def _close(self) -> None:
        if self._connection is not None:
            with contextlib.suppress(OSError):
                self._connection.close()
            self._connection = None

    def send_pending(self) -> int:
        """Send every unsent message now; how many were sent. Raises OSError (collector
        away) or SQLAlchemyError (catalog away), with what was sent before marked."""
        sent = 0
        while True:
            with self.catalog.sessions.begin() as session:
                batch = unsent(session)
            if not batch:
                return sent
            connection = self._connect()
            done: list[int] = []
            try:
                for row_id, xml, at in batch:
                    connection.sendall(
                        frame(
                            format_message(xml, hostname=self._hostname, at=at, procid=self._procid)
                        )
                    )
                    done.append(row_id)
            except OSError:
                self._close()
                raise
            finally:
                if done:
                    with self.catalog.sessions.begin() as session:
                        mark_forwarded(session, done)
                    sent += len(done)

    def _run(self) -> None:
        failures = 0
        while True:
            try:
                self.send_pending()
                failures = 0
                delay = POLL_S
            except Exception as exc:  # any: the forwarder never ends but at stop
                delay = BACKOFF_S[min(failures, len(BACKOFF_S) - 1)]
                if failures == 0:
                    log.warning(
                        "audit collector unreachable; events kept in the catalog",
                        extra={
                            "host": self.collector.host,
                            "port": self.collector.port,
                            # a database error's text may quote rows: its class only
                            "error": f"{type(exc).__name__}: {exc}"
                            if isinstance(exc, OSError)
                            else type(exc).__name__,
                            "retry_s": delay,
                        },
                    )
                failures += 1
            if self._stop.is_set():
                return
            if failures:  # new events do not cut a backoff short
                self._stop.wait(delay)
                if self._stop.is_set():
                    return
            else:
                self._wake.wait(delay)
                self._wake.clear()


def _closed_by_peer(connection: ssl.SSLSocket) -> bool:
    """Whether an idle connection was closed by the collector. A collector sends nothing but
    TLS records of its own (session tickets) and, at the end, its EOF; never waits."""
    try:
        readable, _, _ = select.select([connection], [], [], 0)
    except (OSError, ValueError):
        return True
    if not readable:
        return False
    connection.settimeout(0)
    try:
        return connection.recv(1) == b""
    except (ssl.SSLWantReadError, BlockingIOError):
        return False  # only TLS housekeeping was waiting
    except OSError:
        return True
    finally:
        connection.settimeout(CONNECT_TIMEOUT_S)


def collector_from(
    host: str,
    port: int,
    ca_file: Path | None,
    cert_file: Path | None,
    key_file: Path | None,
) -> Collector | None:
    """The configured collector, or None when ``host`` is empty (forwarding off)."""
    if not host:
        return None
    return Collector(host, port, ca_file, cert_file, key_file)
