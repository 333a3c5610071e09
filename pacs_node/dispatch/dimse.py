"""C-STORE SCU: results to a DICOM AE, as the stored bytes of an encoding it accepted.

One association per batch (:mod:`pacs_node.cstore`). Every (SOP class, stored transfer syntax)
pair of the batch is proposed as its own presentation context; each parcel then goes out in
the first of its encodings (in stored order: uncompressed first) whose context was accepted.
A SOP class refused in every encoding is a permanent failure for that parcel. Where the
destination offers Storage Commitment, what it stored is committed on the same association
(:mod:`.commitment`).
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from typing import Any

from pydicom.uid import UID, ExplicitVRLittleEndian, ImplicitVRLittleEndian
from pynetdicom import evt
from pynetdicom.association import Association
from pynetdicom.presentation import build_context

from pacs_node.catalog.models import Commitment
from pacs_node.commitment import STORAGE_COMMITMENT_PUSH_MODEL
from pacs_node.cstore import (
    MAX_CONTEXTS,
    accepted_pairs,
    associate,
    pair_contexts,
    store,
    tls_failure,
)
from pacs_node.destinations import AnyDestination, DimseDestination
from pacs_node.dispatch.commitment import (
    CommitmentAnswer,
    Reference,
    Reports,
    request_commitment,
)
from pacs_node.dispatch.handler import Delivered, Outcome, Parcel, Permanent, Transient
from pacs_node.errors import PermanentDelivery, TransientDelivery
from pacs_node.statuses import is_refused_for_good, is_stored
from pacs_node.tls import TLSFileError, shared_client_context

log = logging.getLogger(__name__)


def classify_status(code: int, comment: str = "") -> Outcome:
    """A C-STORE response status as an outcome (PS3.4 Annex B.2.3)."""
    if is_stored(code):
        return Delivered()
    what = f"C-STORE status 0x{code:04X}" + (f" {comment}" if comment else "")
    if is_refused_for_good(code):
        return Permanent(what)  # SOP class refused, data set does not match, cannot understand
    return Transient(what)  # out of resources (0xA7xx), busy, anything else the peer may fix


def contexts_for(parcels: Sequence[Parcel]) -> list[tuple[str, str]]:
    """(SOP class, transfer syntax) pairs to propose, in first-seen order."""
    pairs: dict[tuple[str, str], None] = {}
    for parcel in parcels:
        if parcel.sop_class_uid is None:
            continue
        for syntax in parcel.encodings:
            pairs[(parcel.sop_class_uid, syntax)] = None
    return list(pairs)


class CStoreHandler:
    """Handler for ``dimse`` destinations."""

    batch_size = 64

    def __init__(self, calling_ae: str) -> None:
        self.calling_ae = calling_ae

    def send(self, destination: AnyDestination, parcels: Sequence[Parcel]) -> list[Outcome]:
        if not isinstance(destination, DimseDestination):
            raise PermanentDelivery(f"a {destination.type} destination given to the C-STORE SCU")
        pairs = contexts_for(parcels)
        if len(pairs) > MAX_CONTEXTS - 1:
            raise PermanentDelivery(f"{len(pairs)} presentation contexts needed, at most 127")
        reports = Reports()
        assoc = self._associate(destination, pair_contexts(pairs), reports)
        try:
            accepted = accepted_pairs(assoc)
            outcomes = [self._send_one(assoc, parcel, accepted) for parcel in parcels]
            if destination.storage_commitment and assoc.is_established:
                outcomes = self._commit(assoc, destination, parcels, outcomes, reports)
            return outcomes
        finally:
            if assoc.is_established:
                assoc.release()

    def commit(
        self, destination: DimseDestination, references: Sequence[Reference]
    ) -> CommitmentAnswer:
        """Ask again, on a new association, for commitment of instances already stored."""
        reports = Reports()
        assoc = self._associate(destination, [], reports)
        try:
            return request_commitment(assoc, references, reports, destination.commitment_wait_s)
        finally:
            if assoc.is_established:
                assoc.release()

    def _associate(
        self, destination: DimseDestination, contexts: list[Any], reports: Reports
    ) -> Association:
        if destination.host is None or destination.port is None or destination.ae_title is None:
            raise PermanentDelivery("the destination has no address")
        if destination.storage_commitment:
            syntaxes: list[str | UID] = [ExplicitVRLittleEndian, ImplicitVRLittleEndian]
            contexts = [*contexts, build_context(STORAGE_COMMITMENT_PUSH_MODEL, syntaxes)]
        where = f"{destination.ae_title}@{destination.host}:{destination.port}"
        tls = None
        if destination.tls:
            try:
                tls = shared_client_context(destination.tls_files())
            except TLSFileError as exc:
                raise TransientDelivery(f"{where}: TLS {exc}") from exc
        assoc = associate(
            self.calling_ae,
            destination.ae_title,
            destination.host,
            destination.port,
            contexts,
            timeout_s=destination.timeout_s,
            evt_handlers=[(evt.EVT_N_EVENT_REPORT, reports.on_report)],
            tls=tls,
        )
        if not assoc.is_established:
            reason = "association rejected" if assoc.is_rejected else "no association"
            raise TransientDelivery(f"{where}: {tls_failure(assoc) or reason}")
        return assoc

    @staticmethod
    def _commit(
        assoc: Association,
        destination: DimseDestination,
        parcels: Sequence[Parcel],
        outcomes: list[Outcome],
        reports: Reports,
    ) -> list[Outcome]:
        """Storage Commitment for what was stored: the state rides on each Delivered; an
        instance the destination will not commit to keep goes out again (Transient)."""
        stored = [
            Reference(parcel.sop_class_uid, parcel.sop_instance_uid)
            for parcel, outcome in zip(parcels, outcomes, strict=True)
            if isinstance(outcome, Delivered)
            and parcel.sop_class_uid is not None
            and parcel.sop_instance_uid is not None
        ]
        if not stored:
            return outcomes
        answer = request_commitment(assoc, stored, reports, destination.commitment_wait_s)
        settled: list[Outcome] = []
        for parcel, outcome in zip(parcels, outcomes, strict=True):
            state = answer.states.get(parcel.sop_instance_uid or "")
            if not isinstance(outcome, Delivered) or state is None:
                settled.append(outcome)
            elif state is Commitment.FAILED:
                reason = answer.reasons.get(parcel.sop_instance_uid or "", "commitment failed")
                settled.append(Transient(reason))
            else:
                uid = answer.transaction_uid or None
                settled.append(Delivered(outcome.transfer_syntax_uid, state.value, uid))
        return settled

    @staticmethod
    def _send_one(assoc: Association, parcel: Parcel, accepted: set[tuple[str, str]]) -> Outcome:
        result = store(assoc, parcel.sop_class_uid or "", parcel.encodings, accepted)
        if result.refused:
            return Permanent(result.problem)
        if result.status is None:
            return Transient(result.problem)
        outcome = classify_status(result.status, result.comment)
        return Delivered(result.transfer_syntax_uid) if isinstance(outcome, Delivered) else outcome


def recommitter(
    calling_ae: str, resolve: Callable[[str], object]
) -> Callable[[str, list[Reference]], CommitmentAnswer]:
    """For housekeeping: ask a named destination again for commitment of stored instances
    (all ``requested``, with no transaction, when it cannot be asked now)."""
    handler = CStoreHandler(calling_ae)

    def ask(name: str, references: list[Reference]) -> CommitmentAnswer:
        waiting = CommitmentAnswer(
            "", {ref.sop_instance_uid: Commitment.REQUESTED for ref in references}
        )
        target = resolve(name)
        if not isinstance(target, DimseDestination) or not target.storage_commitment:
            return waiting
        try:
            return handler.commit(target, references)
        except (TransientDelivery, PermanentDelivery) as exc:
            log.info("commitment not asked", extra={"destination": name, "reason": str(exc)})
            return waiting

    return ask
