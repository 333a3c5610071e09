"""The Storage SCP: C-ECHO and C-STORE over pynetdicom, with a deliberately tiny store handler.

The handler parses only the identifying attributes, writes the bytes exactly as received to the
spool (durably), hands a row to the catalog recorder and answers. Pixel data is never decoded
here and nothing is converted: every transfer syntax is accepted as proposed.

It also takes the Storage Commitment reports a PACS sends on an association of its own (the PACS
in the Push Model's SCP role, sending N-EVENT-REPORT): the recorder settles those deliveries.
"""

from __future__ import annotations

import logging
import socket
import socketserver
from io import BytesIO
from typing import Any, cast

from pydicom import config as pydicom_config
from pydicom.dataset import Dataset
from pynetdicom import AE, _config, evt
from pynetdicom.sop_class import (  # type: ignore[attr-defined]
    StorageCommitmentPushModel,
    Verification,
)
from pynetdicom.transport import ThreadedAssociationServer

from pacs_node.catalog.db import Catalog
from pacs_node.catalog.models import utcnow
from pacs_node.config import Settings
from pacs_node.dispatch.commitment import (
    COMMITTED_ALL,
    FAILURES_EXIST,
    STORAGE_COMMITMENT_PUSH_MODEL,
    parse_report,
)
from pacs_node.errors import DataSetMismatch, IngestError
from pacs_node.ingest.access import AccessPolicy
from pacs_node.ingest.header import parse_identifiers, read_header
from pacs_node.ingest.identity import IdentityGate
from pacs_node.ingest.part10 import file_meta
from pacs_node.ingest.recorder import RecordSink
from pacs_node.ingest.spool import Spool
from pacs_node.ingest.statuses import SUCCESS, status_for
from pacs_node.refs import InstanceRef
from pacs_node.uids import is_valid_uid

log = logging.getLogger(__name__)

# Accept every storage SOP class, private and retired ones included, with the transfer syntax the
# sender proposed first: a node must never refuse what a scanner sends (pynetdicom >= 2.0).
_config.UNRESTRICTED_STORAGE_SERVICE = True

# The catalog's attributes are read for the catalog, not judged: UIDs are checked by our own
# rules and pydicom's per-value validation warnings cost a third of the handler's time.
pydicom_config.settings.reading_validation_mode = pydicom_config.IGNORE
REJECTED_COUNTER = "rejected_associations"
FAILED_COUNTER = "failed_instances"
# N-EVENT-REPORT failure statuses (PS3.7 10.1.1.1.8)
_PROCESSING_FAILURE, _NO_SUCH_EVENT_TYPE, _NO_SUCH_SOP_CLASS = 0x0110, 0x0113, 0x0118


def _failure(status: int, comment: str) -> Dataset:
    reply = Dataset()
    reply.Status = status
    reply.ErrorComment = comment[:64]
    return reply


class StorageSCP:
    def __init__(
        self,
        settings: Settings,
        spool: Spool,
        recorder: RecordSink,
        catalog: Catalog | None = None,
    ) -> None:
        self.settings = settings
        self.spool = spool
        self.recorder = recorder
        self.identity = IdentityGate(
            spool,
            recorder,
            catalog,
            identity_conflict=settings.node.identity_conflict,
            resend_policy=settings.node.resend_policy,
        )
        self.policy = AccessPolicy(settings)
        self._server: ThreadedAssociationServer | None = None
        options = settings.node
        ae = AE(ae_title=options.ae_title)
        ae.add_supported_context(Verification)
        # A PACS reporting Storage Commitment on its own association proposes the Push Model,
        # perhaps with itself as SCP by role selection. The roles are declared for that, but in
        # unrestricted storage mode pynetdicom 3.0 replies to role selection for storage classes
        # only; the report is handled either way.
        ae.add_supported_context(StorageCommitmentPushModel, scu_role=False, scp_role=True)
        # Checked (with a log line and a counter) by the EVT_REQUESTED handler instead.
        ae.require_called_aet = False
        ae.require_calling_aet = []
        ae.maximum_associations = options.max_associations
        ae.maximum_pdu_size = options.max_pdu_bytes
        ae.acse_timeout = options.acse_timeout_s
        ae.dimse_timeout = options.dimse_timeout_s
        ae.network_timeout = options.network_timeout_s
        self.ae = ae

    @property
    def port(self) -> int:
        if self._server is None:
            raise RuntimeError("the SCP is not running")
        return int(self._server.server_address[1])

    def _handlers(self) -> list[Any]:
        return [
            (evt.EVT_REQUESTED, self._on_requested),
            (evt.EVT_C_ECHO, self._on_echo),
            (evt.EVT_C_STORE, self._on_store),
            (evt.EVT_N_EVENT_REPORT, self._on_commitment_report),
            (evt.EVT_N_ACTION, self._on_commitment_request),
        ]

    def start(self) -> None:
        """Bind the DICOM port and serve associations on background threads."""
        options = self.settings.node
        self._server = self.ae.start_server(
            (options.dicom_host, options.dicom_port), block=False, evt_handlers=self._handlers()
        )
        log.info(
            "storage SCP listening",
            extra={"ae_title": options.ae_title, "host": options.dicom_host, "port": self.port},
        )

    def serve(self, listening: socket.socket) -> None:
        """Serve associations accepted on an already listening socket until :meth:`stop`."""

        listening.settimeout(self.settings.node.network_timeout_s)  # as pynetdicom's own bind

        class _Inherited(ThreadedAssociationServer):
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

        self._server = self.ae.make_server(
            listening.getsockname(), evt_handlers=self._handlers(), server_class=_Inherited
        )
        self._server.serve_forever()

    def stop(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server = None

    def _on_requested(self, event: evt.Event) -> None:
        assoc = event.assoc
        primitive: Any = assoc.requestor.primitive
        calling = str(primitive.calling_ae_title).strip()
        called = str(primitive.called_ae_title).strip()
        address = str(assoc.requestor.address)
        rejection = self.policy.check(calling, called, address)
        if rejection is None:
            return
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
        assoc.acse.send_reject(0x01, 0x01, int(rejection.reason))
        assoc.kill()

    def _on_echo(self, event: evt.Event) -> int:
        return SUCCESS

    def _on_commitment_report(self, event: evt.Event) -> tuple[int, Dataset | None]:
        calling_ae = str(event.assoc.requestor.ae_title).strip()
        request: Any = event.request
        if str(request.AffectedSOPClassUID) != STORAGE_COMMITMENT_PUSH_MODEL:
            return _NO_SUCH_SOP_CLASS, None
        if int(request.EventTypeID) not in (COMMITTED_ALL, FAILURES_EXIST):
            return _NO_SUCH_EVENT_TYPE, None
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
            return _PROCESSING_FAILURE, None
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
        return _PROCESSING_FAILURE, None

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
        received_at = utcnow()
        request: Any = event.request
        stream = cast(BytesIO, request.DataSet)
        transfer_syntax = str(event.context.transfer_syntax)
        ds = parse_identifiers(stream, transfer_syntax)
        header = read_header(ds)
        if header.sop_class_uid != str(request.AffectedSOPClassUID) or header.sop_class_uid != str(
            event.context.abstract_syntax
        ):
            raise DataSetMismatch("SOP Class UID differs from the request or presentation context")
        if header.sop_instance_uid != str(request.AffectedSOPInstanceUID):
            raise DataSetMismatch("SOP Instance UID differs from the request")

        screening = self.identity.screen(header)  # may refuse before anything is written

        meta = file_meta(header.sop_class_uid, header.sop_instance_uid, transfer_syntax, calling_ae)
        stored = self.spool.store(
            header.study_uid,
            header.series_uid,
            header.sop_instance_uid,
            (meta, stream.getbuffer()),
        )
        return self.identity.admit(
            screening,
            stored,
            InstanceRef(
                header=header,
                transfer_syntax_uid=transfer_syntax,
                path=stored.relpath,
                size_bytes=stored.size_bytes,
                received_at=received_at,
                calling_ae=calling_ae,
            ),
        )
