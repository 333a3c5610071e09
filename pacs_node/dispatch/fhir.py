"""FHIR: the stored transaction Bundle POSTed to the EHR's base URL.

The node never creates patients: before posting, the Patient is looked up by the identifier
the Bundle references (``patient_search``). No match means the delivery is *held* with that
reason (a person has to reconcile the patient), not retried blindly. A destination with
``create_patient: true`` (test systems) skips the look-up: its Bundle creates the Patient
conditionally. Every entry is a conditional create, so a re-send never duplicates.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence

import httpx

from pacs_node.dispatch.destinations import AnyDestination, FhirDestination
from pacs_node.dispatch.dicomweb import classify_http
from pacs_node.dispatch.handler import Delivered, Held, Outcome, Parcel, Permanent, Transient
from pacs_node.errors import DeliveryError, PermanentDelivery

log = logging.getLogger(__name__)

FHIR_JSON = "application/fhir+json"


class FhirHandler:
    """Handler for ``fhir`` destinations; one Bundle per request."""

    batch_size = 1

    def send(self, destination: AnyDestination, parcels: Sequence[Parcel]) -> list[Outcome]:
        if not isinstance(destination, FhirDestination):
            raise PermanentDelivery(f"a {destination.type} destination given to the FHIR client")
        headers = {"Accept": FHIR_JSON, **destination.auth.headers()}
        with httpx.Client(headers=headers, timeout=destination.timeout_s) as client:
            return [self._send_one(client, destination, parcel) for parcel in parcels]

    def _send_one(
        self, client: httpx.Client, destination: FhirDestination, parcel: Parcel
    ) -> Outcome:
        if not parcel.encodings:
            return Permanent("no stored Bundle")
        body = next(iter(parcel.encodings.values())).read_bytes()
        try:
            if not destination.create_patient and parcel.patient_search:
                found = client.get(f"{destination.base_url}/{parcel.patient_search}")
                if found.status_code >= 400:
                    raise classify_http(found.status_code, "Patient search")
                if not found.json().get("entry"):
                    return Held("the EHR has no Patient with the study's patient identifier")
            response = client.post(
                destination.base_url, content=body, headers={"Content-Type": FHIR_JSON}
            )
        except httpx.TransportError as exc:
            return Transient(f"FHIR: {type(exc).__name__}: {exc}")
        except DeliveryError as exc:
            return (
                Permanent(str(exc)) if isinstance(exc, PermanentDelivery) else Transient(str(exc))
            )
        except ValueError as exc:  # a search answer that is not JSON
            return Transient(f"FHIR: unreadable Patient search answer: {exc}")
        if response.is_success:
            return Delivered(FHIR_JSON)
        error = classify_http(response.status_code, "FHIR transaction")
        detail = f"{error}: {response.text[:300]}"
        return Permanent(detail) if isinstance(error, PermanentDelivery) else Transient(detail)
