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

from tests.conftest import NodeProcess, storescu, wait_for
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
    assert list((node.data_dir / "spool" / ".incoming").rglob("*.part")) == []
    study = wait_for(
        lambda: [s for s in node.studies() if s["state"] == "stable"], 20, what="stable"
    )[0]
    assert study["instances"] == len(spooled)


def test_a_killed_job_worker_is_replaced_and_its_job_runs_again(
    make_node: Callable[..., NodeProcess], tmp_path: Path
) -> None:
    """A worker the kernel kills (out of memory, say) costs the job one attempt, not the node:
    the pool starts a new worker and the job runs to the end without a restart."""
    import json
    import os
    import signal

    from sqlalchemy import select

    from pacs_node.catalog.db import open_catalog
    from pacs_node.catalog.models import Job
    from tests.catalog_factory import job_events

    root = Path(__file__).resolve().parents[2]
    node = make_node(models_dir=str(root / "models"), job_workers=1, dicom_workers=0)
    files = write_series(tmp_path / "ct", slices=40, rows=128, columns=128, spacing=(3, 2, 2))
    study_uid = str(pydicom.dcmread(files[0], stop_before_pixels=True).StudyInstanceUID)
    assert storescu(node, *files).returncode == 0
    wait_for(lambda: any(s["instances"] == 40 for s in node.studies()), 60, what="the study")
    node.cli("run", study_uid, "--model", "ct-classical")
    catalog = open_catalog(f"sqlite:///{(node.data_dir / 'catalog.sqlite').resolve()}")
    try:

        def running_pid() -> int | None:
            with catalog.sessions() as session:
                job = session.scalars(select(Job)).one()
            if job.state != "running" or job.stage not in ("infer", "build"):
                return None
            return int((job.claimed_by or "").split(":")[1])

        os.kill(wait_for(running_pid, 120, interval=0.05, what="the job running"), signal.SIGKILL)

        def done() -> dict[str, object] | None:
            (job,) = json.loads(node.cli("jobs", "--json").stdout)
            return job if job["state"] in ("done", "failed") else None

        job = wait_for(done, 180, interval=0.5, what="the job, run again by a new worker")
        events = job_events(catalog)
    finally:
        catalog.dispose()
    assert (job["state"], job["attempts"]) == ("done", 2)
    assert "quality" in {kind for kind, _ in events}  # the gate's verdict is recorded
    # the job's own steps; its SEG and SR are committed first (results_first), in whichever
    # run got that far, and their deliveries' events may come before the job's end
    steps = [k for k, _ in events if k in ("queued", "running", "done", "failed")]
    assert steps[:5] == ["queued", "running", "queued", "running", "done"]
    kinds = [k for k, _ in events]
    assert "results_first" in kinds[: kinds.index("done")]
    assert "worker replaced" in [detail for k, detail in events if k == "queued"][1]
    assert "job worker died; replacing it" in node.log_text()
