"""C-STORE SCU: results to a DICOM AE, as the stored bytes of an encoding it accepted.

One association per batch. Every (SOP class, stored transfer syntax) pair of the batch is
proposed as its own presentation context, so the peer accepts or refuses each encoding on its
own; each parcel then goes out in the first of its encodings (in stored order: uncompressed
first) whose context was accepted. A SOP class refused in every encoding is a permanent
failure for that parcel; the file is sent as read from disk, never decoded and re-encoded.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence

from pynetdicom import AE, _config
from pynetdicom.association import Association
from pynetdicom.presentation import build_context

from pacs_node.dispatch.destinations import AnyDestination, DimseDestination
from pacs_node.dispatch.handler import Delivered, Outcome, Parcel, Permanent, Transient
from pacs_node.errors import PermanentDelivery, TransientDelivery

log = logging.getLogger(__name__)

# Send each file's data set exactly as stored, read in chunks (nothing converted).
_config.STORE_SEND_CHUNKED_DATASET = True

MAX_CONTEXTS = 128
SUCCESS_OR_WARNING = frozenset({0x0000, 0xB000, 0xB006, 0xB007})


def classify_status(code: int, comment: str = "") -> Outcome:
    """A C-STORE response status as an outcome (PS3.4 Annex B.2.3)."""
    if code in SUCCESS_OR_WARNING:
        return Delivered()
    what = f"C-STORE status 0x{code:04X}" + (f" {comment}" if comment else "")
    if code == 0x0122 or 0xA900 <= code <= 0xA9FF or 0xC000 <= code <= 0xCFFF:
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
        if destination.host is None or destination.port is None or destination.ae_title is None:
            raise PermanentDelivery("the destination has no address")
        pairs = contexts_for(parcels)
        if len(pairs) > MAX_CONTEXTS:
            raise PermanentDelivery(f"{len(pairs)} presentation contexts needed, at most 128")
        ae = AE(ae_title=self.calling_ae)
        ae.acse_timeout = destination.timeout_s
        ae.dimse_timeout = destination.timeout_s
        ae.network_timeout = destination.timeout_s
        ae.requested_contexts = [build_context(sop, [syntax]) for sop, syntax in pairs]
        where = f"{destination.ae_title}@{destination.host}:{destination.port}"
        assoc = ae.associate(destination.host, destination.port, ae_title=destination.ae_title)
        if not assoc.is_established:
            reason = "association rejected" if assoc.is_rejected else "no association"
            raise TransientDelivery(f"{where}: {reason}")
        try:
            accepted = {
                (str(cx.abstract_syntax), str(cx.transfer_syntax[0]))
                for cx in assoc.accepted_contexts
            }
            return [self._send_one(assoc, parcel, accepted) for parcel in parcels]
        finally:
            if assoc.is_established:
                assoc.release()

    @staticmethod
    def _send_one(assoc: Association, parcel: Parcel, accepted: set[tuple[str, str]]) -> Outcome:
        syntax = next(
            (ts for ts in parcel.encodings if (parcel.sop_class_uid or "", ts) in accepted), None
        )
        if syntax is None:
            offered = ", ".join(parcel.encodings)
            return Permanent(f"SOP class {parcel.sop_class_uid} not accepted in {offered}")
        if not assoc.is_established:
            return Transient("association aborted")
        try:
            status = assoc.send_c_store(parcel.encodings[syntax])
        except (OSError, ValueError, RuntimeError) as exc:
            return Transient(f"C-STORE failed: {exc}")
        if not status or "Status" not in status:
            return Transient("no C-STORE response")
        outcome = classify_status(int(status.Status), str(status.get("ErrorComment", "")))
        return Delivered(syntax) if isinstance(outcome, Delivered) else outcome
