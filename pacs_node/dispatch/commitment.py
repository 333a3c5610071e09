"""Storage Commitment Push Model as SCU (PS3.4 Annex J): asking a PACS to take responsibility
for the results it accepted, so the node may forget them.

The C-STORE association also proposes the Storage Commitment Push Model SOP class
(1.2.840.10008.1.20.1). When the destination accepts it, an N-ACTION (Action Type 1) names
every instance it stored, under a new Transaction UID, and the N-EVENT-REPORT is awaited on the
same association for a short while:

- Event Type 1: every instance ``committed``;
- Event Type 2: those in the Failed SOP Sequence are not; the outbox sends them again;
- no report in time: ``requested``, asked again later (housekeeping) on a new association;
  nothing of the study is removed meanwhile.

A PACS may instead send the report later on an association of its own, as the association
requestor (Orthanc does): the node's Storage SCP accepts the Push Model SOP class with the PACS
in the SCP role and hands the report to the catalog writer, which settles the deliveries of that
Transaction UID (:func:`pacs_node.catalog.deliveries.record_commitment_report`) if it comes
from the destination that was asked: its AE title, from one of its host's addresses (noted on
each delivery when it is asked, :func:`peer_addresses`). A report from any other allowed AE or
host settles nothing; it is kept, marked refused, logged and counted.

A destination that refuses the SOP class, or answers the N-ACTION with a failure status, does
not offer commitment to this node: ``unsupported``, and the C-STORE success is the
confirmation.
"""

from __future__ import annotations

import ipaddress
import logging
import socket
import threading
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from pydicom import Dataset
from pydicom.uid import generate_uid
from pynetdicom.association import Association

from pacs_node.catalog.deliveries import commitment_refusal
from pacs_node.catalog.models import Commitment
from pacs_node.commitment import (
    REQUEST_COMMITMENT,
    STORAGE_COMMITMENT_INSTANCE,
    STORAGE_COMMITMENT_PUSH_MODEL,
    parse_report,
)
from pacs_node.dimse_client import parked
from pacs_node.statuses import PROCESSING_FAILURE, SUCCESS

log = logging.getLogger(__name__)


CONFIRMED = frozenset({None, Commitment.UNSUPPORTED.value, Commitment.COMMITTED.value})
"""Commitment values of a delivered row that count as confirmed (None: not asked)."""


@dataclass(frozen=True)
class Reference:
    sop_class_uid: str
    sop_instance_uid: str


@dataclass
class Reports:
    """N-EVENT-REPORTs received on an association, by Transaction UID (the handler target)."""

    _received: dict[str, Dataset] = field(default_factory=dict)
    _changed: threading.Condition = field(default_factory=threading.Condition)

    def on_report(self, event: Any) -> tuple[int, None]:
        """``evt.EVT_N_EVENT_REPORT`` handler: keep the report, answer success."""
        try:
            info = event.event_information
            uid = str(info.get("TransactionUID", ""))
        except (AttributeError, ValueError) as exc:  # an unreadable report: say so, keep nothing
            log.warning("unreadable N-EVENT-REPORT", extra={"reason": str(exc)})
            return PROCESSING_FAILURE, None
        info.EventTypeID = int(event.request.EventTypeID)
        with self._changed:
            self._received[uid] = info
            self._changed.notify_all()
        return SUCCESS, None

    def wait(self, transaction_uid: str, timeout_s: float) -> Dataset | None:
        with self._changed:
            self._changed.wait_for(lambda: transaction_uid in self._received, timeout_s)
            return self._received.pop(transaction_uid, None)


@dataclass(frozen=True)
class CommitmentAnswer:
    transaction_uid: str
    states: dict[str, Commitment]  # SOP Instance UID -> state
    reasons: dict[str, str] = field(default_factory=dict)  # failed ones: why


def offered(assoc: Association) -> bool:
    """Whether the destination accepted the Storage Commitment Push Model SOP class."""
    return any(
        str(cx.abstract_syntax) == STORAGE_COMMITMENT_PUSH_MODEL for cx in assoc.accepted_contexts
    )


def _action_information(transaction_uid: str, references: Sequence[Reference]) -> Dataset:
    ds = Dataset()
    ds.TransactionUID = transaction_uid
    items = []
    for ref in references:
        item = Dataset()
        item.ReferencedSOPClassUID = ref.sop_class_uid
        item.ReferencedSOPInstanceUID = ref.sop_instance_uid
        items.append(item)
    ds.ReferencedSOPSequence = items
    return ds


def request_commitment(
    assoc: Association, references: Sequence[Reference], reports: Reports, wait_s: float
) -> CommitmentAnswer:
    """N-ACTION on ``assoc`` (which offered the SOP class), then wait for its report."""
    uids = [ref.sop_instance_uid for ref in references]
    if not offered(assoc):
        return CommitmentAnswer("", dict.fromkeys(uids, Commitment.UNSUPPORTED))
    transaction_uid = generate_uid()
    requested = CommitmentAnswer(transaction_uid, dict.fromkeys(uids, Commitment.REQUESTED))
    try:
        status, _reply = parked(assoc).send_n_action(
            _action_information(transaction_uid, references),
            REQUEST_COMMITMENT,
            STORAGE_COMMITMENT_PUSH_MODEL,
            STORAGE_COMMITMENT_INSTANCE,
        )
    except (OSError, ValueError, RuntimeError) as exc:
        log.warning("storage commitment request failed", extra={"reason": str(exc)})
        return CommitmentAnswer("", dict.fromkeys(uids, Commitment.REQUESTED))
    code = int(getattr(status, "Status", -1)) if status else -1
    if code != SUCCESS:
        # The peer has the SOP class but will not commit for us (an AE it does not know, say):
        # it does not offer commitment to this node, and the C-STORE success is what we have.
        log.warning("storage commitment refused", extra={"status": f"0x{code:04X}"})
        return CommitmentAnswer("", dict.fromkeys(uids, Commitment.UNSUPPORTED))
    report = reports.wait(transaction_uid, wait_s)
    if report is None:
        return requested
    return _read_report(transaction_uid, uids, report)


def _read_report(transaction_uid: str, uids: list[str], report: Dataset) -> CommitmentAnswer:
    states = dict.fromkeys(uids, Commitment.REQUESTED)
    reasons: dict[str, str] = {}
    parsed = parse_report(transaction_uid, "", report)
    for uid in parsed.committed:
        if uid in states:
            states[uid] = Commitment.COMMITTED
    for uid, reason in parsed.failed:
        if uid in states:
            states[uid] = Commitment.FAILED
            reasons[uid] = commitment_refusal(reason)
    return CommitmentAnswer(transaction_uid, states, reasons)


def peer_addresses(host: str) -> tuple[str, ...]:
    """The addresses a destination's host stands for (an IP literal, or every address of a
    name); the name itself when it cannot be resolved now."""
    try:
        return (str(ipaddress.ip_address(host)),)
    except ValueError:
        pass
    try:
        infos = socket.getaddrinfo(host, None)
    except OSError:
        log.warning("destination host cannot be resolved now", extra={"host": host})
        return (host,)
    return tuple(sorted({str(info[4][0]) for info in infos}))
