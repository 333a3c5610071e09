"""STOW-RS: results to a DICOMweb service, one multipart request per batch.

dicomweb-client carries the request (its session, URL building and multipart encoding) with
the destination's auth headers. Its public ``store_instances`` takes pydicom Datasets and
re-encodes them; we hand its multipart poster the stored Part 10 bytes instead, so what is sent
is exactly what was built. The response's Failed SOP Sequence marks the parcels that failed.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import Any

import requests
from dicomweb_client.api import DICOMwebClient

from pacs_node.dispatch.destinations import AnyDestination, DicomWebDestination
from pacs_node.dispatch.handler import Delivered, Outcome, Parcel, Permanent, Transient
from pacs_node.errors import PermanentDelivery, TransientDelivery

log = logging.getLogger(__name__)

RETRY_STATUSES = frozenset({408, 425, 429, 500, 502, 503, 504})


def classify_http(status: int, what: str) -> TransientDelivery | PermanentDelivery:
    """An HTTP error status as the delivery error it means."""
    if status in RETRY_STATUSES or status >= 500:
        return TransientDelivery(f"{what}: HTTP {status}")
    return PermanentDelivery(f"{what}: HTTP {status}")


class StowHandler:
    """Handler for ``dicomweb`` destinations."""

    batch_size = 16

    def send(self, destination: AnyDestination, parcels: Sequence[Parcel]) -> list[Outcome]:
        if not isinstance(destination, DicomWebDestination):
            raise PermanentDelivery(f"a {destination.type} destination given to STOW-RS")
        client = DICOMwebClient(url=destination.url, headers=destination.auth.headers())
        chosen = [next(iter(p.encodings.items())) for p in parcels]
        data = [path.read_bytes() for _, path in chosen]
        url = f"{destination.url}/studies"
        try:
            response: Any = client._http_post_multipart_application_dicom(url, data)
        except requests.HTTPError as exc:
            status = exc.response.status_code if exc.response is not None else 0
            if status == 409 and exc.response is not None:  # some instances failed
                return self._partial(exc.response, parcels, chosen)
            raise classify_http(status, "STOW-RS") from exc
        except requests.RequestException as exc:
            raise TransientDelivery(f"STOW-RS: {type(exc).__name__}: {exc}") from exc
        failed = self._failed_uids(response)
        return [
            Permanent(f"STOW-RS refused {p.sop_instance_uid}")
            if p.sop_instance_uid in failed
            else Delivered(ts)
            for p, (ts, _) in zip(parcels, chosen, strict=True)
        ]

    @staticmethod
    def _failed_uids(response: Any) -> set[str]:
        items = getattr(response, "FailedSOPSequence", None) or []
        return {str(item.get("ReferencedSOPInstanceUID", "")) for item in items}

    def _partial(
        self, response: requests.Response, parcels: Sequence[Parcel], chosen: list[Any]
    ) -> list[Outcome]:
        from pydicom import Dataset

        try:
            failed = self._failed_uids(Dataset.from_json(response.json()))
        except ValueError:
            return [Transient("STOW-RS: HTTP 409 without a readable response")] * len(parcels)
        return [
            Transient(f"STOW-RS refused {p.sop_instance_uid} (409)")
            if p.sop_instance_uid in failed
            else Delivered(ts)
            for p, (ts, _) in zip(parcels, chosen, strict=True)
        ]
