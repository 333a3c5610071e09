"""SIGKILL of the node while results are on their way to the PACS: after a restart every result
is in Orthanc exactly once (counted per SOP Instance UID) and every delivery is delivered.

The node is killed while its deliveries are ``sending`` and Orthanc already holds what was sent:
the C-STOREs are done and the node waits for the Storage Commitment report (Orthanc offers the
SOP class), the moment where a crash could lose the outcome of a send that succeeded."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from pydicom import dcmread
from sqlalchemy import func, select

from pacs_node.catalog.db import open_catalog
from pacs_node.catalog.models import Delivery, DeliveryState
from tests.conftest import NodeProcess, free_port, storescu, wait_for
from tests.dicom_factory import write_series
from tests.integration.test_pipeline_orthanc import _job_done, _json, _node, _received
from tests.orthanc import OrthancProcess

pytestmark = pytest.mark.integration


def test_sigkill_during_delivery_loses_nothing_and_duplicates_nothing(
    tmp_path: Path, make_node: Callable[..., NodeProcess]
) -> None:
    dicom_port = free_port()
    node = _node(make_node, dicom_port)
    # Orthanc knows the node, so it takes the commitment request (its report would come on an
    # association of its own, which the node does not take: the node waits commitment_wait_s)
    orthanc = OrthancProcess(
        tmp_path / "orthanc",
        free_port(),
        dicom_port,
        modalities={"node": [node.ae_title, "127.0.0.1", node.port]},
    ).start()
    try:
        paths = write_series(tmp_path / "ct", slices=16, rows=64, columns=64, spacing=(5, 5, 5))
        study_uid = str(dcmread(paths[0], stop_before_pixels=True).StudyInstanceUID)
        assert storescu(node, *paths, calling="ORTHANC").returncode == 0
        wait_for(lambda: _received(node, study_uid, 16), 60, what="the study in the node")
        node.cli("run", study_uid, "--model", "ct-classical")
        wait_for(lambda: _job_done(node), 180, interval=0.5, what="the job to finish")

        catalog = open_catalog(f"sqlite:///{(node.data_dir / 'catalog.sqlite').resolve()}")
        try:

            def in_flight() -> bool:
                with catalog.sessions() as session:
                    sending = session.scalar(
                        select(func.count(Delivery.id)).where(
                            Delivery.state == DeliveryState.SENDING
                        )
                    )
                return bool(sending) and orthanc.get("/statistics")["CountInstances"] > 0

            wait_for(in_flight, 60, interval=0.05, what="deliveries sent, outcome not recorded")
            node.kill()
            with catalog.sessions() as session:
                cut_off = session.scalar(
                    select(func.count(Delivery.id)).where(Delivery.state == DeliveryState.SENDING)
                )
        finally:
            catalog.dispose()
        assert cut_off
        node.start()  # the rows left 'sending' go out again

        def delivered() -> list[dict[str, Any]] | None:
            rows = _json(node, "deliveries")
            return rows if rows and all(d["state"] == "delivered" for d in rows) else None

        deliveries = wait_for(delivered, 90, interval=0.5, what="every delivery after restart")
        assert {d["kind"] for d in deliveries} == {"seg", "sr", "gsps", "key-images", "pdf"}
        assert max(d["attempts"] for d in deliveries) == 2  # re-sent once, not more
        uids = [d["sop_instance_uid"] for d in deliveries]
        assert len(uids) == len(set(uids))  # no result built or queued twice
        for uid in uids:
            found = orthanc.post("/tools/lookup", content=uid)
            assert len([f for f in found if f["Type"] == "Instance"]) == 1, uid
        assert orthanc.get("/statistics")["CountInstances"] == len(uids)
    finally:
        orthanc.stop()
