"""The one receive path behind every transport: parse, check, spool, record.

A transport (the C-STORE handler, STOW-RS) streams a data set into a :class:`ReceivedFile` in the
spool's incoming folder, the node's own Part 10 header in front; :meth:`Receiver.receive` then
reads its identifying header, checks it against what the transport announced, screens its
identity, makes the file the spool file (fsync'd) and hands the row to the recorder. The status it
returns (or the :class:`~pacs_node.errors.IngestError` it raises) is a DICOM status, which C-STORE
answers as it is and STOW-RS puts in its response's Referenced or Failed SOP Sequence. Pixel data
is never decoded here.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime

from pacs_node.catalog.db import Catalog
from pacs_node.catalog.models import utcnow
from pacs_node.config import Settings
from pacs_node.errors import DataSetMismatch, OutOfResources
from pacs_node.ingest.header import parse_received, read_header
from pacs_node.ingest.identity import IdentityGate
from pacs_node.ingest.recorder import RecordSink
from pacs_node.ingest.routing_header import read_routing_header
from pacs_node.ingest.spool import Spool
from pacs_node.ingest.transport import ReceivedFile
from pacs_node.refs import InstanceHeader, InstanceRef


@dataclass(frozen=True, slots=True)
class Announced:
    """What the transport said the data set is, before it was read: the C-STORE request and
    its presentation context, or a STOW-RS part's File Meta Information."""

    sop_class_uids: tuple[str, ...]  # every one must equal the data set's SOP Class UID
    sop_instance_uid: str
    transfer_syntax_uid: str
    # STOW-RS to /studies/{study}: the data set must belong to this study (None: any study).
    study_uid: str | None = None


@dataclass(frozen=True, slots=True)
class Receipt:
    """The answer for one received data set and the header it was kept under."""

    status: int
    header: InstanceHeader


class Receiver:
    """Parse, check, spool and record one received data set, whatever carried it."""

    def __init__(
        self,
        settings: Settings,
        spool: Spool,
        recorder: RecordSink,
        catalog: Catalog | None = None,
        open_catalog: Callable[[], Catalog] | None = None,
    ) -> None:
        """``catalog``: a read-only handle for the identity screen (or ``open_catalog`` to open
        one when first needed)."""
        self.settings = settings
        self.spool = spool
        self.recorder = recorder
        self.max_instance_bytes = settings.node.max_instance_mb * 2**20
        self.identity = IdentityGate(
            spool,
            recorder,
            catalog,
            identity_conflict=settings.node.identity_conflict,
            resend_policy=settings.node.resend_policy,
            open_catalog=open_catalog,
        )

    def incoming(self, source_ae: str) -> ReceivedFile:
        """A new file in the spool's incoming folder for a transport to stream a Part 10
        data set into (``source_ae`` goes into its header; empty for none)."""
        return ReceivedFile(self.spool.incoming, self.max_instance_bytes, source_ae)

    def receive(
        self,
        received: ReceivedFile,
        announced: Announced,
        calling_ae: str | None,
        received_at: datetime | None = None,
    ) -> int:
        """Keep ``received`` as its instance's spool file and answer with a DICOM status, or
        raise an :class:`~pacs_node.errors.IngestError`. The temporary name is gone afterwards
        either way (the spool's link, if made, stays)."""
        return self.receive_instance(received, announced, calling_ae, received_at).status

    def receive_instance(
        self,
        received: ReceivedFile,
        announced: Announced,
        calling_ae: str | None,
        received_at: datetime | None = None,
        sender: str | None = None,
    ) -> Receipt:
        """As :meth:`receive`, with the header read (STOW-RS names the study and series of
        each stored instance in its response); ``sender``: the user, where no AE title names
        who sent it (recorded in the study's events)."""
        received_at = received_at or utcnow()
        try:
            return self._receive(received, announced, calling_ae, received_at, sender)
        finally:
            received.remove()

    def _receive(
        self,
        received: ReceivedFile,
        announced: Announced,
        calling_ae: str | None,
        received_at: datetime,
        sender: str | None = None,
    ) -> Receipt:
        if received.oversized:
            raise OutOfResources(
                f"data set of {received.dataset_bytes // 2**20} MiB is over max_instance_mb "
                f"({self.settings.node.max_instance_mb})"
            )
        received.finish()
        # The file's fsync runs while its header is read and screened (none of which needs
        # it); adopt() waits for it before the file takes its name. Every
        # refusal before that settles it (a job not yet started is cancelled), so a peer sending
        # instances that are refused holds no descriptor or pool slot beyond its own request.
        synced = self.spool.start_sync(received.path)
        try:
            transfer_syntax = announced.transfer_syntax_uid
            with received.path.open("rb") as stream:
                stream.seek(received.dataset_offset or 0)
                ds = parse_received(stream, transfer_syntax)
            header = read_header(ds)
            if any(header.sop_class_uid != uid for uid in announced.sop_class_uids):
                raise DataSetMismatch(
                    "SOP Class UID differs from the request or presentation context"
                )
            if header.sop_instance_uid != announced.sop_instance_uid:
                raise DataSetMismatch("SOP Instance UID differs from the request")
            if announced.study_uid is not None and header.study_uid != announced.study_uid:
                raise DataSetMismatch("Study Instance UID differs from the study of the request")

            screening = self.identity.screen(header)  # may refuse before anything is kept
            # Read before the file is kept: nothing may fail between keeping it and recording it
            # (read_routing_header never raises; it leaves out what it cannot decode).
            routing = read_routing_header(ds)

            # The file's Part 10 header was written from the announced UIDs, just checked equal to
            # the data set's; its data set's SHA-256 was computed as it arrived.
            stored = self.spool.adopt(
                received.path,
                header.study_uid,
                header.series_uid,
                header.sop_instance_uid,
                received.sha256,
                synced,
            )
            status = self.identity.admit(
                screening,
                stored,
                InstanceRef(
                    header=header,
                    transfer_syntax_uid=transfer_syntax,
                    path=stored.relpath,
                    size_bytes=stored.size_bytes,
                    received_at=received_at,
                    calling_ae=calling_ae,
                    routing=routing,
                    sender=sender,
                ),
            )
            return Receipt(status, header)
        finally:
            if synced is not None:
                synced.settle()
