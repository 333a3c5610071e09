"""The Storage SCP: C-ECHO and C-STORE over pynetdicom, with a deliberately tiny store handler.

The handler parses only the identifying attributes, writes the bytes exactly as received to the
spool (durably), hands a row to the catalog recorder and answers. Pixel data is never decoded
here and nothing is converted: every transfer syntax is accepted as proposed.

It serves the plain DICOM port, the DICOM TLS port, or both (``dicom_port``, ``dicom_tls_port``);
over TLS the handshake and the peer's certificate are :mod:`~pacs_node.ingest.transport`'s, and
a peer bound to a certificate subject in peers.yaml is accepted only with it.

It is the Modality Performed Procedure Step SCP too (N-CREATE / N-SET, see
:mod:`~pacs_node.ingest.mpps`): the steps are written to the catalog at once, since the answer
depends on them, and assembly is told which study to look at again.

It also takes the Storage Commitment reports a PACS sends on an association of its own (the PACS
in the Push Model's SCP role, sending N-EVENT-REPORT): the recorder settles those deliveries.
"""

from __future__ import annotations

import io
import logging
import socket
import socketserver
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

from pydicom.dataset import Dataset
from pynetdicom import AE, _config, evt
from pynetdicom.sop_class import (  # type: ignore[attr-defined]
    ModalityPerformedProcedureStep,
    StorageCommitmentPushModel,
    Verification,
)

from pacs_node.audit import events as audit_events
from pacs_node.audit.events import Alert, AuditEvent
from pacs_node.catalog.db import Catalog
from pacs_node.catalog.models import utcnow
from pacs_node.commitment import (
    COMMITTED_ALL,
    FAILURES_EXIST,
    STORAGE_COMMITMENT_PUSH_MODEL,
    parse_report,
)
from pacs_node.config import NODE_FILE, Settings
from pacs_node.errors import ConfigError, IngestError, UnreadableDataset
from pacs_node.ingest.access import AccessPolicy
from pacs_node.ingest.header import skip_value_validation
from pacs_node.ingest.limits import Caps, SharedLimits
from pacs_node.ingest.mpps import Notify, PerformedSteps
from pacs_node.ingest.receive import Announced, Receiver
from pacs_node.ingest.recorder import RecordSink
from pacs_node.ingest.spool import Spool
from pacs_node.ingest.statuses import status_for
from pacs_node.ingest.transport import (
    LOCAL_LIMIT_COUNTER,
    LOCAL_LIMIT_EXCEEDED,
    OVERSIZED_MESSAGE_COUNTER,
    OVERSIZED_PDU_COUNTER,
    REJECT_TRANSIENT,
    SOURCE_PRESENTATION,
    UNLIMITED_PDU_BYTES,
    Guard,
    GuardedServer,
    GuardedSocket,
    Throttle,
    install_received_files,
    log_security_alert,
    received_file,
    tls_subject,
)
from pacs_node.statuses import NO_SUCH_EVENT_TYPE, NO_SUCH_SOP_CLASS, PROCESSING_FAILURE, SUCCESS
from pacs_node.tls import ReloadingContext, TLSFileError, TLSFiles, reloading_server_context
from pacs_node.uids import is_valid_uid

log = logging.getLogger(__name__)

# Our own limits (ingest/limits.py) decide; pynetdicom's per-process count of accepted threads,
# idle connections included, must never refuse first.
_PYNETDICOM_MAX_ASSOCIATIONS = 100_000

REJECTED_COUNTER = "rejected_associations"
# Guard counters that are security alerts too (audited, rate-limited by the audit trail).
_ALERT_COUNTERS = {
    OVERSIZED_PDU_COUNTER: "hostile-pdu",
    OVERSIZED_MESSAGE_COUNTER: "hostile-pdu",
    LOCAL_LIMIT_COUNTER: "limit-reached",
}
FAILED_COUNTER = "failed_instances"


def _failure(status: int, comment: str) -> Dataset:
    reply = Dataset()
    reply.Status = status
    reply.ErrorComment = comment[:64]
    return reply


def limits_for(settings: Settings) -> Caps:
    options = settings.node
    return Caps(
        pending_total=options.max_pending_connections,
        pending_per_address=options.max_pending_per_address,
        established_total=options.max_associations,
        established_per_peer=options.max_associations_per_peer,
    )


def server_tls(settings: Settings) -> ReloadingContext | None:
    """The TLS port's context (None when there is no TLS port); a certificate, key or CA file
    that is missing or does not load is a :class:`ConfigError` naming its key."""
    options = settings.node
    if not options.dicom_tls_port:
        return None
    files = TLSFiles(
        options.tls_cert_file, options.tls_key_file, options.tls_ca_file, options.tls_crl_file
    )
    try:
        return reloading_server_context(files, options.tls_require_client_cert)
    except TLSFileError as exc:
        source = str((settings.config_dir or Path(".")) / NODE_FILE)
        raise ConfigError(source, exc.key, exc.reason) from exc


def bind_listening(host: str, port: int) -> socket.socket:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    listening = socket.socket(family, socket.SOCK_STREAM)
    listening.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    listening.bind((host, port))
    listening.listen(128)
    return listening


class StorageSCP:
    def __init__(
        self,
        settings: Settings,
        spool: Spool,
        recorder: RecordSink,
        catalog: Catalog | None = None,
        limits: SharedLimits | None = None,
        open_catalog: Callable[[], Catalog] | None = None,
        auditor: Callable[[AuditEvent | Alert], None] | None = None,
        steps_catalog: Callable[[], Catalog] | None = None,
        on_step: Notify | None = None,
    ) -> None:
        """``catalog``: a read-only handle for the identity screen (or ``open_catalog`` to open
        one when first needed); ``limits``: the node-wide table this process counts in (one of
        its own if None); ``auditor``: where association events and security alerts go (the
        node's audit trail, or the pipe to it from a worker process); ``steps_catalog``: opens
        the writable catalog Performed Procedure Steps go to (default: ``catalog``; with
        neither, the MPPS SOP class is not offered); ``on_step``: told the Study Instance UID
        of each step that changed (assembly, or the pipe to it)."""
        self.settings = settings
        self.auditor = auditor
        self.spool = spool
        self.recorder = recorder
        self.receiver = Receiver(settings, spool, recorder, catalog, open_catalog)
        self.policy = AccessPolicy(settings)
        if steps_catalog is None and catalog is not None:
            writable = catalog
            steps_catalog = lambda: writable  # noqa: E731
        self.steps = (
            PerformedSteps(settings, steps_catalog, on_step, alert=self._step_alert)
            if steps_catalog is not None and settings.mpps_offered()
            else None
        )
        self.tls = server_tls(settings)
        self._servers: list[GuardedServer] = []
        self._servers_lock = threading.Lock()
        self._threads: list[threading.Thread] = []
        options = settings.node
        self.limits = limits or SharedLimits.create(limits_for(settings), rows=1)
        self.throttle = Throttle()
        max_pdu = options.max_pdu_bytes or UNLIMITED_PDU_BYTES
        self.guard = Guard(
            limits=self.limits,
            pending=SharedLimits.create(limits_for(settings), rows=1),
            count=self._guard_count,
            request_bytes=options.max_assoc_request_bytes,
            data_bytes=max_pdu + 6,
            request_timeout_s=options.assoc_request_timeout_s,
            read_timeout_s=options.network_timeout_s,
            incoming=spool.incoming,
            max_instance_bytes=options.max_instance_mb * 2**20,
            throttle=self.throttle,
            alert=self._tls_alert,
        )
        # Data sets stream to a file in the spool's incoming folder as their PDUs arrive (see
        # ingest/transport.py), never whole in memory; the handler never touches
        # ``event.dataset``, which would parse (and inflate) the whole file.
        _config.STORE_RECV_CHUNKED_DATASET = True
        # Accept every storage SOP class, private and retired ones included, with the transfer
        # syntax the sender proposed first: a node must never refuse what a scanner sends. Both
        # settings are pynetdicom's process-wide ones: set by the process that runs the SCP,
        # never by importing this module.
        _config.UNRESTRICTED_STORAGE_SERVICE = True
        skip_value_validation()
        install_received_files()
        ae = AE(ae_title=options.ae_title)
        ae.add_supported_context(Verification)
        # A PACS reporting Storage Commitment on its own association proposes the Push Model,
        # perhaps with itself as SCP by role selection. The roles are declared for that, but in
        # unrestricted storage mode pynetdicom 3.0 replies to role selection for storage classes
        # only; the report is handled either way.
        ae.add_supported_context(StorageCommitmentPushModel, scu_role=False, scp_role=True)
        if self.steps is not None:
            ae.add_supported_context(ModalityPerformedProcedureStep)
        # Checked (with a log line and a counter) by the EVT_REQUESTED handler instead.
        ae.require_called_aet = False
        ae.require_calling_aet = []
        ae.maximum_associations = _PYNETDICOM_MAX_ASSOCIATIONS
        ae.maximum_pdu_size = options.max_pdu_bytes
        ae.acse_timeout = options.acse_timeout_s
        ae.dimse_timeout = options.dimse_timeout_s
        ae.network_timeout = options.network_timeout_s
        self.ae = ae

    def _server(self, tls: bool) -> GuardedServer:
        with self._servers_lock:
            for server in self._servers:
                if (server.tls is not None) == tls:
                    return server
        raise RuntimeError(f"the SCP is not serving a {'TLS' if tls else 'plain'} DICOM port")

    def _audit(self, item: AuditEvent | Alert) -> None:
        if self.auditor is None:
            return
        try:
            self.auditor(item)
        except Exception as exc:  # auditing never breaks the association it audits
            log.error("audit event not handed over", extra={"error": type(exc).__name__})

    def security_alert(
        self,
        kind: str,
        address: str | None,
        detail: str,
        ae_title: str | None = None,
        tls_subject: str | None = None,
    ) -> None:
        """Audit a security alert (110113; "node-authentication" for a refused certificate or
        failed TLS handshake). Rate-limited by the node's audit trail; never raises."""
        self._audit(Alert(kind, address, detail, ae_title, tls_subject))

    def _tls_alert(self, kind: str, address: str, detail: str) -> None:
        """A refused TLS handshake or certificate (``kind`` as in
        :func:`~pacs_node.ingest.transport.log_security_alert`): logged, and audited as Node
        Authentication (110126)."""
        log_security_alert(kind, address, detail)
        self.security_alert("node-authentication", address, f"{kind}: {detail}"[:300])

    def _guard_count(self, name: str, by: int = 1) -> None:
        self.recorder.count(name, by)
        kind = _ALERT_COUNTERS.get(name)
        if kind is not None:
            self.security_alert(kind, None, name)

    @property
    def port(self) -> int:
        """The plain DICOM port being served."""
        return int(self._server(tls=False).server_address[1])

    @property
    def tls_port(self) -> int:
        """The DICOM TLS port being served."""
        return int(self._server(tls=True).server_address[1])

    def _handlers(self) -> list[Any]:
        return [
            (evt.EVT_CONN_OPEN, self._on_connection),
            (evt.EVT_REQUESTED, self._on_requested),
            (evt.EVT_C_ECHO, self._on_echo),
            (evt.EVT_C_STORE, self._on_store),
            (evt.EVT_N_EVENT_REPORT, self._on_commitment_report),
            (evt.EVT_N_ACTION, self._on_commitment_request),
            (evt.EVT_N_CREATE, self._on_step_create),
            (evt.EVT_N_SET, self._on_step_set),
        ]

    def start(self) -> None:
        """Bind the DICOM port and the TLS port (those not 0) and serve associations on
        background threads."""
        options = self.settings.node
        for port, tls in ((options.dicom_port, False), (options.dicom_tls_port, True)):
            if not port:
                continue
            listening = bind_listening(options.dicom_host, port)
            ready = threading.Event()
            thread = threading.Thread(
                target=self.serve,
                args=(listening, ready, tls),
                name="scp-tls" if tls else "scp",
                daemon=True,
            )
            thread.start()
            self._threads.append(thread)
            ready.wait(10)
            log.info(
                "storage SCP listening",
                extra={
                    "ae_title": options.ae_title,
                    "host": options.dicom_host,
                    "port": self.tls_port if tls else self.port,
                    "tls": tls,
                },
            )

    def serve(
        self, listening: socket.socket, ready: threading.Event | None = None, tls: bool = False
    ) -> None:
        """Serve associations accepted on an already listening socket until :meth:`stop`
        (``tls``: the DICOM TLS port)."""

        listening.settimeout(self.settings.node.network_timeout_s)  # as pynetdicom's own bind

        class _Inherited(GuardedServer):
            def server_bind(self) -> None:
                if self.socket is not None:
                    self.socket.close()
                self.socket = listening
                self.server_address = listening.getsockname()

            def server_activate(self) -> None:
                """The socket is listening already (bound by the parent process)."""

            def shutdown(self) -> None:
                # Not registered with the AE (make_server does not), so skip its bookkeeping.
                socketserver.TCPServer.shutdown(self)
                self.server_close()

            def server_close(self) -> None:
                """Close this process's descriptor only: pynetdicom's shutdown(SHUT_RDWR) would
                stop the socket listening for every process that shares it."""
                listening.close()

        if tls and self.tls is None:
            raise RuntimeError("a TLS port without dicom_tls_port")
        server = self.ae.make_server(
            listening.getsockname(),
            evt_handlers=self._handlers(),
            server_class=_Inherited,
            guard=self.guard,
            tls=self.tls if tls else None,
        )
        assert isinstance(server, GuardedServer)
        with self._servers_lock:
            self._servers.append(server)
        if ready is not None:
            ready.set()
        try:
            server.serve_forever()
        except Exception:  # the port is no longer served: alive() says so (see workers.py)
            log.exception("the DICOM port stopped serving", extra={"tls": tls})

    def alive(self) -> bool:
        """Whether the threads serving the DICOM ports run."""
        return bool(self._threads) and all(thread.is_alive() for thread in self._threads)

    def stop(self) -> None:
        with self._servers_lock:
            servers, self._servers = self._servers, []
        for server in servers:
            server.shutdown()

    def _on_connection(self, event: evt.Event) -> None:
        """A new connection gets ``assoc_request_timeout_s`` (not the ACSE timeout) for its
        A-ASSOCIATE-RQ: pynetdicom's ARTIM timer and its wait for the request both use it."""
        event.assoc.acse_timeout = self.settings.node.assoc_request_timeout_s
        connection = getattr(event.assoc.dul.socket, "socket", None)
        if isinstance(connection, GuardedSocket):
            connection.attach(event.assoc)

    def _on_requested(self, event: evt.Event) -> None:
        assoc = event.assoc
        assoc.acse_timeout = self.settings.node.acse_timeout_s
        primitive: Any = assoc.requestor.primitive
        calling = str(primitive.calling_ae_title).strip()
        called = str(primitive.called_ae_title).strip()
        address = str(assoc.requestor.address)
        subject = tls_subject(assoc)
        rejection = self.policy.check(calling, called, address, subject)
        if rejection is None:
            self._admit(assoc, calling, address)
            return
        if rejection.certificate:
            detail = f"calling AE {calling}: certificate subject {subject or '(none)'}"
            self._tls_alert("tls-certificate-not-bound", address, detail[:300])
        log.warning(
            "association rejected",
            extra={
                "calling_ae": calling,
                "called_ae": called,
                "address": address,
                "reason": rejection.detail,
            },
        )
        self.recorder.count(REJECTED_COUNTER)
        self.security_alert(
            "node-authentication",
            address,
            f"association rejected: {rejection.detail}",
            ae_title=calling,
            tls_subject=tls_subject(assoc),
        )
        assoc.acse.send_reject(0x01, 0x01, int(rejection.reason))
        assoc.kill()

    def _admit(self, assoc: Any, calling: str, address: str) -> None:
        """Count the association against the node-wide limits, or refuse it: A-ASSOCIATE-RJ
        transient, service provider (presentation), local-limit-exceeded."""
        lease, which = self.limits.take_association(calling, address)
        connection = getattr(assoc.dul.socket, "socket", None)
        if lease is not None:
            if isinstance(connection, GuardedSocket):
                connection.hold_association(lease)
            else:  # not accepted by our server (never in the node); nothing to hold it
                lease.release()
            self._audit(
                audit_events.association(
                    self.settings.node.ae_title,
                    calling,
                    address,
                    accepted=True,
                    tls_subject=tls_subject(assoc),
                )
            )
            return
        caps = self.limits.caps
        log.warning(
            "association refused: local limit reached",
            extra={
                "calling_ae": calling,
                "address": address,
                "limit": which,
                "max_associations": caps.established_total,
                "max_associations_per_peer": caps.established_per_peer,
            },
        )
        self.recorder.count(LOCAL_LIMIT_COUNTER)
        self.security_alert(
            "limit-reached", address, f"association refused: {which} limit", ae_title=calling
        )
        assoc.acse.send_reject(REJECT_TRANSIENT, SOURCE_PRESENTATION, LOCAL_LIMIT_EXCEEDED)
        assoc.kill()

    def _on_echo(self, event: evt.Event) -> int:
        return SUCCESS

    def _on_commitment_report(self, event: evt.Event) -> tuple[int, Dataset | None]:
        calling_ae = str(event.assoc.requestor.ae_title).strip()
        request: Any = event.request
        if str(request.AffectedSOPClassUID) != STORAGE_COMMITMENT_PUSH_MODEL:
            return NO_SUCH_SOP_CLASS, None
        if int(request.EventTypeID) not in (COMMITTED_ALL, FAILURES_EXIST):
            return NO_SUCH_EVENT_TYPE, None
        try:
            info: Any = event.event_information
            transaction_uid = str(info.TransactionUID)
            if not is_valid_uid(transaction_uid):
                raise ValueError(f"invalid Transaction UID {transaction_uid[:70]!r}")
            address = str(event.assoc.requestor.address)
            report = parse_report(transaction_uid, calling_ae, info, address)
        except (AttributeError, ValueError, TypeError, KeyError) as exc:
            log.warning(
                "unreadable storage commitment report",
                extra={"calling_ae": calling_ae, "reason": str(exc)},
            )
            return PROCESSING_FAILURE, None
        self.recorder.commitment_report(report)
        log.info(
            "storage commitment report received",
            extra={
                "calling_ae": calling_ae,
                "transaction_uid": transaction_uid,
                "committed": len(report.committed),
                "failed": len(report.failed),
            },
        )
        return SUCCESS, None

    def _on_commitment_request(self, event: evt.Event) -> tuple[int, None]:
        """The node takes reports, it does not commit: an N-ACTION gets a processing failure."""
        log.warning(
            "storage commitment request refused: the node is not a Storage Commitment SCP",
            extra={"calling_ae": str(event.assoc.requestor.ae_title).strip()},
        )
        return PROCESSING_FAILURE, None

    def _on_step_create(self, event: evt.Event) -> tuple[int | Dataset, None]:
        """MPPS N-CREATE (PS3.4 F.7.2.1), on an association admitted like any other."""
        request: Any = event.request
        if self.steps is None:
            return NO_SUCH_SOP_CLASS, None
        return self.steps.create(
            str(request.AffectedSOPClassUID),
            request.AffectedSOPInstanceUID,
            str(event.assoc.requestor.ae_title).strip(),
            lambda: event.attribute_list,
            size=_encoded_size(request.AttributeList),
        )

    def _on_step_set(self, event: evt.Event) -> tuple[int | Dataset, None]:
        """MPPS N-SET (PS3.4 F.7.2.2)."""
        request: Any = event.request
        if self.steps is None:
            return NO_SUCH_SOP_CLASS, None
        return self.steps.update(
            str(request.RequestedSOPClassUID),
            request.RequestedSOPInstanceUID,
            str(event.assoc.requestor.ae_title).strip(),
            lambda: event.modification_list,
            size=_encoded_size(request.ModificationList),
        )

    def _step_alert(self, kind: str, calling_ae: str, detail: str) -> None:
        self.security_alert(kind, None, detail, ae_title=calling_ae)

    def _on_store(self, event: evt.Event) -> int | Dataset:
        calling_ae = str(event.assoc.requestor.ae_title).strip()
        try:
            return self._store(event, calling_ae)
        except IngestError as exc:
            status = status_for(exc)
            log.warning(
                "instance refused",
                extra={"calling_ae": calling_ae, "status": f"0x{status:04X}", "reason": str(exc)},
            )
            self.recorder.count(FAILED_COUNTER)
            return _failure(status, str(exc))
        except Exception as exc:
            status = status_for(exc)
            log.exception("instance failed", extra={"calling_ae": calling_ae})
            self.recorder.count(FAILED_COUNTER)
            return _failure(status, f"internal error: {type(exc).__name__}")

    def _store(self, event: evt.Event, calling_ae: str) -> int:
        """The data set is the file pynetdicom streamed into the spool's incoming folder (a
        :class:`~pacs_node.ingest.transport.ReceivedFile`); the receive path does the rest."""
        received_at = utcnow()
        request: Any = event.request
        path = event.dataset_path
        if path is None:
            raise UnreadableDataset("the C-STORE request carries no data set")
        received = received_file(path)
        if received is None or not received.claim():
            raise RuntimeError("the received data set is not in the spool's incoming folder")
        announced = Announced(
            sop_class_uids=(str(request.AffectedSOPClassUID), str(event.context.abstract_syntax)),
            sop_instance_uid=str(request.AffectedSOPInstanceUID),
            transfer_syntax_uid=str(event.context.transfer_syntax),
        )
        return self.receiver.receive(received, announced, calling_ae, received_at)


def _encoded_size(payload: object) -> int | None:
    """The length of an encoded data set as pynetdicom holds it (a BytesIO), before decoding."""
    if isinstance(payload, io.BytesIO):
        return payload.getbuffer().nbytes
    if isinstance(payload, bytes | bytearray):
        return len(payload)
    return None
