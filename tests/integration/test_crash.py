"""SIGKILL in the middle of a send: every acknowledged instance survives into spool and catalog."""

from __future__ import annotations

import sqlite3
import threading
from collections.abc import Callable
from pathlib import Path

import pydicom
import pytest
from pydicom.uid import ExplicitVRLittleEndian
from pynetdicom import AE

from tests.conftest import NodeProcess, wait_for
from tests.dicom_factory import CT_IMAGE, write_series

pytestmark = pytest.mark.integration

KILL_AFTER = 25


def test_sigkill_mid_send_loses_nothing_acknowledged(
    make_node: Callable[..., NodeProcess], tmp_path: Path
) -> None:
    node = make_node(quiet_period_s=1.0)
    files = write_series(tmp_path / "ct", slices=80, rows=128, columns=128)

    acknowledged: list[str] = []
    killed = threading.Event()
    ae = AE(ae_title="PACSNODE_SCU")
    ae.add_requested_context(CT_IMAGE, ExplicitVRLittleEndian)
    assoc = ae.associate("127.0.0.1", node.port, ae_title=node.ae_title)
    assert assoc.is_established
    for path in files:
        if not assoc.is_established:
            break
        status = assoc.send_c_store(path)
        if status and int(status.Status) == 0:
            acknowledged.append(path.name)
        if len(acknowledged) == KILL_AFTER and not killed.is_set():
            # Kill while the next C-STOREs are in flight, not between associations.
            threading.Timer(0.02, node.kill).start()
            killed.set()
    if assoc.is_established:
        assoc.abort()
    wait_for(lambda: node.process is not None and node.process.poll() is not None, 10, what="kill")
    assert len(acknowledged) >= KILL_AFTER

    node.start()
    acked_uids = {pydicom.dcmread(tmp_path / "ct" / name).SOPInstanceUID for name in acknowledged}
    spooled = {p.stem for p in (node.data_dir / "spool").rglob("*.dcm")}
    assert acked_uids <= spooled

    def cataloged() -> set[str]:
        with sqlite3.connect(node.data_dir / "catalog.sqlite") as db:
            return {row[0] for row in db.execute("select sop_instance_uid from instances")}

    assert acked_uids <= cataloged()
    assert cataloged() == spooled
    assert list((node.data_dir / "spool" / ".incoming").iterdir()) == []
    study = wait_for(
        lambda: [s for s in node.studies() if s["state"] == "stable"], 20, what="stable"
    )[0]
    assert study["instances"] == len(spooled)
