"""C-STORE to a real SCP (pynetdicom on loopback) that accepts the SEG only as JPEG 2000: the
stored JPEG 2000 encoding goes out byte for byte, the SR goes uncompressed, and a SOP class
the SCP refuses in every encoding is dead-lettered at once."""

from __future__ import annotations

import threading
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest
from pydicom.uid import ExplicitVRLittleEndian, JPEG2000Lossless
from pynetdicom import AE, evt

from pacs_node.catalog.db import Catalog, open_catalog
from pacs_node.catalog.deliveries import create_deliveries, list_deliveries
from pacs_node.catalog.jobs import queue_job
from pacs_node.catalog.models import Study, utcnow
from pacs_node.catalog.results import add_result_rows, write_files
from pacs_node.config import NodeOptions, Settings
from pacs_node.destinations import DimseDestination
from pacs_node.dispatch.outbox import Outbox
from pacs_node.results import ResultOptions, build_results
from pacs_node.worker import results_dir, stored_encodings
from tests.conftest import free_port
from tests.results_factory import phantom_study

pytestmark = pytest.mark.integration

SEG = "1.2.840.10008.5.1.4.1.1.66.4"
COMPREHENSIVE_3D_SR = "1.2.840.10008.5.1.4.1.1.88.34"


@pytest.fixture
def scp() -> Iterator[tuple[int, list[tuple[str, str, bytes]]]]:
    """A Storage SCP taking SEG in JPEG 2000 only and 3D SR uncompressed; nothing else."""
    received: list[tuple[str, str, bytes]] = []
    lock = threading.Lock()

    def on_store(event: Any) -> int:
        with lock:
            received.append(
                (
                    str(event.request.AffectedSOPInstanceUID),
                    str(event.context.transfer_syntax),
                    bytes(event.request.DataSet.getvalue()),
                )
            )
        return 0x0000

    ae = AE(ae_title="TESTSCP")
    ae.add_supported_context(SEG, [JPEG2000Lossless])
    ae.add_supported_context(COMPREHENSIVE_3D_SR, [ExplicitVRLittleEndian])
    port = free_port()
    server = ae.start_server(
        ("127.0.0.1", port), block=False, evt_handlers=[(evt.EVT_C_STORE, on_store)]
    )
    try:
        yield port, received
    finally:
        server.shutdown()


@pytest.fixture
def catalog(tmp_path: Path) -> Iterator[Catalog]:
    opened = open_catalog(f"sqlite:///{tmp_path / 'c.sqlite'}")
    yield opened
    opened.dispose()


def test_the_accepted_stored_encoding_is_sent_as_stored(
    tmp_path: Path, catalog: Catalog, scp: tuple[int, list[tuple[str, str, bytes]]]
) -> None:
    port, received = scp
    settings = Settings(
        node=NodeOptions(data_dir=tmp_path / "var", fsync=False),
        destinations={
            "PACS": DimseDestination(type="dimse", ae_title="TESTSCP", host="127.0.0.1", port=port)
        },
    )
    volume, labelmap, info = phantom_study(shape=(10, 32, 32))
    built = build_results(
        volume,
        labelmap,
        info,
        ResultOptions(jpeg2000_copy=True, key_images=1, created=datetime(2026, 1, 1, tzinfo=UTC)),
    )
    items = stored_encodings(built)
    now = utcnow()
    with catalog.sessions.begin() as session:
        study = Study(
            study_uid=built.study_instance_uid,
            state="stable",
            first_received_at=now,
            receiving_since=now,
            last_received_at=now,
            reopened_count=0,
            duplicate_count=0,
        )
        session.add(study)
        session.flush()
        job_id = queue_job(session, study.id, "m", [], {})
        relpaths = write_files(results_dir(settings), f"{job_id}/1", items, fsync=False)
        results = add_result_rows(session, job_id, items, relpaths)
        create_deliveries(
            session, job_id, results, {"seg": ["PACS"], "sr": ["PACS"], "gsps": ["PACS"]}
        )

    outbox = Outbox(catalog, settings)
    try:
        assert outbox.dispatch_due(wait=True) == 1  # one association for the batch
    finally:
        outbox.stop()

    with catalog.sessions() as session:
        rows = {d.kind: d for d in list_deliveries(session)}
    assert (rows["seg"].state, rows["seg"].transfer_syntax_uid) == ("delivered", JPEG2000Lossless)
    assert (rows["sr"].state, rows["sr"].transfer_syntax_uid) == (
        "delivered",
        ExplicitVRLittleEndian,
    )
    assert rows["gsps"].state == "dead"  # refused in every stored encoding: retrying cannot help
    assert rows["gsps"].last_error is not None
    assert "not accepted" in rows["gsps"].last_error

    stored = {
        item.encoding: (results_dir(settings) / path).read_bytes()
        for item, path in zip(items, relpaths, strict=True)
        if item.kind == "seg"
    }
    by_syntax = {syntax: data for _, syntax, data in received}
    assert set(by_syntax) == {JPEG2000Lossless, ExplicitVRLittleEndian}
    seg_sent = by_syntax[JPEG2000Lossless]
    # the data set bytes on the wire are the stored file's, after its file meta: no re-encoding
    assert stored[JPEG2000Lossless].endswith(seg_sent)
    assert len(seg_sent) > len(stored[JPEG2000Lossless]) * 0.9
