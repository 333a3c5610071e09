"""The seam between the outbox and the wire: one small Protocol, one handler per destination
type, and the outcomes a handler reports for each parcel.

A handler sends a batch of parcels to one destination and answers one :data:`Outcome` per
parcel, in order. A failure that hits the whole batch (connection refused, association
rejected, HTTP 503) may instead be raised as :class:`TransientDelivery` or
:class:`PermanentDelivery`; the outbox applies it to every parcel. Handlers never touch the
catalog and never rebuild an object: they send the stored bytes named in ``encodings``.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Protocol

from pacs_node.destinations import AnyDestination


@dataclass(frozen=True)
class Parcel:
    """One stored result on its way to one destination."""

    delivery_id: int
    kind: str
    sop_class_uid: str | None
    sop_instance_uid: str | None
    encodings: dict[
        str, Path
    ]  # transfer syntax UID (or media type) -> stored file, preferred first
    patient_search: str | None = None


@dataclass(frozen=True)
class Delivered:
    transfer_syntax_uid: str | None = None  # the encoding that went out
    commitment: str | None = None  # Storage Commitment state (dispatch.commitment.Commitment)
    commitment_uid: str | None = None  # its Transaction UID


@dataclass(frozen=True)
class Transient:
    reason: str
    not_before: datetime | None = None  # the peer asked us to wait until then (Retry-After)


@dataclass(frozen=True)
class Permanent:
    reason: str


@dataclass(frozen=True)
class Held:
    """Needs a person (the EHR does not know the patient): not retried blindly."""

    reason: str


Outcome = Delivered | Transient | Permanent | Held


class Handler(Protocol):
    """Sends parcels to destinations of one type."""

    batch_size: int  # parcels per call (per association, per request)

    def send(self, destination: AnyDestination, parcels: Sequence[Parcel]) -> list[Outcome]: ...
