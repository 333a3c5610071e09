"""An EHR that answers errors naming the patient, over real HTTP: what the catalog keeps about
the failure (the delivery's last error, the job's events) holds the status, not the patient."""

from __future__ import annotations

import http.server
import json
import threading
from collections.abc import Iterator
from datetime import timedelta
from pathlib import Path

import pytest

from pacs_node.catalog.db import Catalog, open_catalog
from pacs_node.catalog.models import Delivery, DeliveryState, JobEvent, utcnow
from pacs_node.catalog.results import FHIR_MEDIA_TYPE, StoredEncoding
from pacs_node.config import NodeOptions, Settings
from pacs_node.destinations import FhirDestination
from pacs_node.dispatch.outbox import Outbox
from tests.catalog_factory import queue_stored_results
from tests.conftest import free_port

pytestmark = pytest.mark.integration

PHI = ["DOE", "JANE", "4471122", "1961-07-14"]
BODIES = [
    (503, "text/plain", b"Service down while looking up Patient DOE^JANE MRN 4471122"),
    (
        400,
        "application/fhir+json",
        json.dumps(
            {
                "resourceType": "OperationOutcome",
                "issue": [
                    {
                        "severity": "error",
                        "code": "processing",
                        "diagnostics": "Patient DOE, JANE (MRN 4471122, born 1961-07-14) differs",
                    }
                ],
            }
        ).encode(),
    ),
]


class _Ehr(http.server.BaseHTTPRequestHandler):
    answered = 0

    def do_POST(self) -> None:
        self.rfile.read(int(self.headers.get("Content-Length", "0")))
        status, media, body = BODIES[min(type(self).answered, len(BODIES) - 1)]
        type(self).answered += 1
        self.send_response(status)
        self.send_header("Content-Type", media)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, format: str, *args: object) -> None:
        return


@pytest.fixture
def ehr() -> Iterator[str]:
    server = http.server.ThreadingHTTPServer(("127.0.0.1", free_port()), _Ehr)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_port}/fhir"
    server.shutdown()
    server.server_close()


def _queue_fhir_delivery(catalog: Catalog, settings: Settings) -> None:
    bundle = json.dumps({"resourceType": "Bundle", "type": "transaction", "entry": []}).encode()
    items = [StoredEncoding("fhir", None, None, None, FHIR_MEDIA_TYPE, bundle)]
    with catalog.sessions.begin() as session:
        queue_stored_results(session, settings.node.data_dir / "results", items, {"fhir": ["EHR"]})


def test_ehr_error_bodies_never_reach_the_catalog(tmp_path: Path, ehr: str) -> None:
    settings = Settings(
        node=NodeOptions(data_dir=tmp_path / "var", delivery_backoff_s=1.0),
        destinations={
            "EHR": FhirDestination(type="fhir", base_url=ehr, create_patient=True, timeout_s=10)
        },
    )
    catalog = open_catalog(f"sqlite:///{tmp_path / 'var' / 'catalog.sqlite'}")
    now = [utcnow()]
    outbox = Outbox(catalog, settings, clock=lambda: now[0])
    try:
        _queue_fhir_delivery(catalog, settings)
        now[0] = utcnow() + timedelta(seconds=1)
        assert outbox.dispatch_due(wait=True) == 1
        with catalog.sessions() as session:
            row = session.query(Delivery).one()
            assert row.state == DeliveryState.PENDING  # 503: transient, retried later
            assert row.last_error is not None
            assert "503" in row.last_error
            for value in PHI:
                assert value not in row.last_error
        now[0] += timedelta(hours=1)
        assert outbox.dispatch_due(wait=True) == 1
        with catalog.sessions() as session:
            row = session.query(Delivery).one()
            events = [json.dumps(e.detail) if e.detail else "" for e in session.query(JobEvent)]
        assert row.state == DeliveryState.DEAD  # 400: permanent
        assert row.last_error is not None
        assert "400" in row.last_error
        stored = " ".join([row.last_error, *events])
        assert "delivery_dead" not in stored  # details only; the kind is its own column
        for value in PHI:
            assert value not in stored
        assert _Ehr.answered == 2
    finally:
        outbox.stop()
        catalog.dispose()
