"""Every way of stopping a running node ends within a bound, with the catalog consistent.

The node runs as a service manager starts it: in a process group of its own, with a job worker
and an SCP worker. Signals go to the main process (``kill PID``, Docker's ``docker stop``) or to
the whole group (systemd's ``KillMode=control-group``, Ctrl-C in a terminal). Each test prints
how long the stop took and asserts that no process of the group is left (zombies aside: their
reaper is the machine's PID 1, not the node)."""

from __future__ import annotations

import json
import os
import re
import signal
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pydicom
import pytest
from pynetdicom import AE
from sqlalchemy import select, update

from pacs_node.catalog.db import Catalog, open_catalog
from pacs_node.catalog.models import Delivery, Job, JobState
from tests.catalog_factory import job_events, queue_stored_results
from tests.conftest import NodeProcess, storescu, wait_for
from tests.dicom_factory import write_series
from tests.http_server import Reply, Request, ScriptedServer
from tests.integration.test_dispatch_misbehaving import DICOM_JSON, _instances, _stow_answer
from tests.integration.test_load_and_limits import _scp_workers

pytestmark = pytest.mark.integration

MODELS = Path(__file__).resolve().parents[2] / "models"
BOUND_S = 20.0  # every stop, graceful or forced, ends well within this
VERIFICATION = "1.2.840.10008.1.1"
PHASES = ("stopping", "scp closed", "job workers stopped", "stopped")


def _serving(make_node: Callable[..., NodeProcess], **options: Any) -> NodeProcess:
    """A node in its own process group, its job worker idle and waiting for work."""
    node = make_node(start=False, models_dir=str(MODELS), job_workers=1, dicom_workers=1, **options)
    return _start(node)


def _start(node: NodeProcess) -> NodeProcess:
    started = node.log_text().count("job worker started")
    node.start(own_group=True)
    if node.node["job_workers"]:
        wait_for(
            lambda: node.log_text().count("job worker started") > started,
            90,
            what="the job worker",
        )
    return node


def _live_members(group: int) -> list[int]:
    """Processes of ``group`` that still run (zombies left for PID 1 to reap do not)."""
    pids = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
        except OSError:
            continue
        state, _ppid, pgrp = stat[stat.rindex(")") + 2 :].split()[:3]
        if int(pgrp) == group and state != "Z":
            pids.append(int(entry.name))
    return pids


def _signal(node: NodeProcess, signum: int, *, group: bool) -> None:
    assert node.process is not None
    if group:
        os.killpg(node.process.pid, signum)
    else:
        node.process.send_signal(signum)


def _gone(node: NodeProcess, since: float, what: str) -> tuple[int, float]:
    """Wait for the node and every process of its group to end; (exit status, seconds)."""
    assert node.process is not None
    group = node.process.pid
    wait_for(
        lambda: node.process is not None and node.process.poll() is not None,
        BOUND_S,
        interval=0.02,
        what=f"the node to exit ({what}); log:\n{node.log_text()[-3000:]}",
    )
    wait_for(lambda: not _live_members(group), 5, interval=0.02, what="its processes to end")
    took = time.monotonic() - since
    print(f"stop path {what}: exit {node.process.returncode} after {took:.2f} s")
    return node.process.returncode, took


def _phases(text: str) -> list[str]:
    """The node's stop phases, in the order its log shows them."""
    found = re.findall(
        r" pacs_node\.node (stopping now|stopping|scp closed|job workers stopped|stopped)( |$)",
        text,
        re.MULTILINE,
    )
    return [phase for phase, _ in found]


def _healthy(node: NodeProcess) -> dict[str, Any]:
    report: dict[str, Any] = json.loads(node.cli("status", "--json").stdout)
    assert report["catalog_reachable"], report
    assert report["healthy"], report
    return report


def _catalog(node: NodeProcess) -> Catalog:
    return open_catalog(f"sqlite:///{(node.data_dir / 'catalog.sqlite').resolve()}")


@pytest.mark.parametrize(
    ("signum", "group"),
    [
        (signal.SIGTERM, False),
        (signal.SIGTERM, True),
        (signal.SIGINT, False),
        (signal.SIGINT, True),
    ],
    ids=["SIGTERM-node", "SIGTERM-group", "SIGINT-node", "SIGINT-group"],
)
def test_one_signal_stops_the_node_gracefully(
    make_node: Callable[..., NodeProcess], signum: int, group: bool
) -> None:
    """SIGTERM to the whole group used to leave the main process waiting for ever on the job
    worker that the same signal had killed while it slept in a shared multiprocessing Event."""
    node = _serving(make_node)
    before = len(node.log_text())
    started = time.monotonic()
    _signal(node, signum, group=group)
    code, took = _gone(
        node, started, f"{signal.Signals(signum).name} to the {'group' if group else 'node'}"
    )
    assert code == 0
    assert took < BOUND_S
    assert _phases(node.log_text()[before:]) == list(PHASES)
    _healthy(node)


def test_workers_that_end_first_are_replaced_and_the_node_still_stops(
    make_node: Callable[..., NodeProcess],
) -> None:
    """A job worker killed and an SCP worker stopped on their own: both are replaced, the DICOM
    port still answers, and the node then stops as cleanly as ever."""
    node = _serving(make_node)
    (scp_worker,) = wait_for(lambda: _scp_workers(node), 30, what="the SCP worker")
    (job_worker,) = re.findall(r"job worker started worker=\S+:(\d+):w0", node.log_text())
    # SIGTERM: the SCP worker drains and exits (it used to take the shared port down with it)
    os.kill(scp_worker, signal.SIGTERM)
    os.kill(int(job_worker), signal.SIGKILL)
    wait_for(
        lambda: (
            "SCP worker died; replacing it" in node.log_text()
            and node.log_text().count("job worker started") == 2
        ),
        90,
        what="both workers replaced",
    )
    assert "job worker died; replacing it" in node.log_text()
    ae = AE(ae_title="STORESCU")
    ae.add_requested_context(VERIFICATION)
    assoc = ae.associate("127.0.0.1", node.port, ae_title=node.ae_title)
    assert assoc.is_established
    assert int(assoc.send_c_echo().Status) == 0
    assoc.release()
    started = time.monotonic()
    _signal(node, signal.SIGTERM, group=True)
    code, took = _gone(node, started, "SIGTERM to the group after both workers were replaced")
    assert (code, took < BOUND_S) == (0, True)
    _healthy(node)


def test_a_running_job_is_queued_again_after_a_forced_stop_and_handed_back_by_a_graceful_one(
    make_node: Callable[..., NodeProcess], tmp_path: Path
) -> None:
    """Ctrl-C twice in the terminal while a job runs: the first asks for a graceful stop, which
    waits for the job; the second kills every process now. The catalog is as after a SIGKILL:
    the next start puts the job back in the queue. When the job outlasts a graceful stop's
    bound, its worker is stopped and the job handed back to the queue, and the node exits 0."""
    node = _serving(make_node, stop_timeout_s=120)
    files = write_series(tmp_path / "ct", slices=48, rows=256, columns=256, spacing=(3, 2, 2))
    study_uid = str(pydicom.dcmread(files[0], stop_before_pixels=True).StudyInstanceUID)
    assert storescu(node, *files).returncode == 0
    node.cli("run", study_uid, "--model", "ct-classical")
    catalog = _catalog(node)
    try:

        def in_inference() -> bool:
            with catalog.sessions() as session:
                job = session.scalars(select(Job)).one_or_none()
            return job is not None and job.state == JobState.RUNNING and job.stage == "infer"

        wait_for(in_inference, 120, interval=0.05, what="the job in inference")
        before = len(node.log_text())
        started = time.monotonic()
        _signal(node, signal.SIGINT, group=True)
        wait_for(  # the graceful stop is now waiting for the job
            lambda: "scp closed" in node.log_text()[before:], 10, interval=0.02, what="scp closed"
        )
        second = time.monotonic()
        _signal(node, signal.SIGINT, group=True)
        code, took = _gone(node, started, "a second SIGINT to the group while a job runs")
        after_second = time.monotonic() - second
        print(f"stop path second signal: gone {after_second:.2f} s after it")
        assert code == 128 + signal.SIGINT
        assert after_second < 5.0
        assert took < BOUND_S
        text = node.log_text()[before:]
        assert _phases(text)[0] == "stopping"
        assert _phases(text)[-2:] == ["stopping now", "stopped"]
        assert 'reason="second signal"' in text
        with catalog.sessions() as session:
            assert session.scalars(select(Job.state)).one() == JobState.RUNNING  # cut off

        node.node["stop_timeout_s"] = 3  # shorter than the job: the stop hands it back
        _start(node)  # puts the job back in the queue; the worker takes it again
        wait_for(in_inference, 120, interval=0.05, what="the job in inference again")
        before = len(node.log_text())
        started = time.monotonic()
        _signal(node, signal.SIGTERM, group=True)
        code, took = _gone(node, started, "SIGTERM to the group, the job outlasting 3 s")
        assert code == 0
        assert took < BOUND_S
        assert _phases(node.log_text()[before:]) == list(PHASES)
        assert "killed_and_requeued=1" in node.log_text()[before:]
        with catalog.sessions() as session:
            job = session.scalars(select(Job)).one()
        events = job_events(catalog)
    finally:
        catalog.dispose()
    assert job.state == JobState.QUEUED
    assert [kind for kind, _ in events] == ["queued", "running", "queued", "running", "queued"]
    assert "restart" in events[2][1]
    assert "node stopping" in events[4][1]
    assert [s["instances"] for s in node.studies() if s["study_uid"] == study_uid] == [48]
    _healthy(node)


def test_a_stalled_peer_does_not_hold_the_stop(
    make_node: Callable[..., NodeProcess],
) -> None:
    """A STOW-RS peer that stalls mid-answer: the outbox lets go of the send by
    ``stop_timeout_s``, the stop stays graceful, and the delivery goes out again after a
    restart."""
    (item,) = _instances(1)
    answered = Reply(200, _stow_answer([str(item.sop_instance_uid)], {}), DICOM_JSON)
    stalled = Reply(200, answered.body, DICOM_JSON, stall_s=60.0)

    def script(request: Request) -> Reply:
        return stalled if len(server.of("POST")) == 1 else answered

    server = ScriptedServer(script).start()
    try:
        node = make_node(
            start=False, models_dir=str(MODELS), job_workers=1, dicom_workers=1, stop_timeout_s=2
        )
        node.destinations = {
            "WEB": {"type": "dicomweb", "url": f"{server.url}/dicom-web", "timeout_s": 120}
        }
        node.data_dir.mkdir(parents=True)
        catalog = _catalog(node)
        try:
            with catalog.sessions.begin() as session:
                job_id, _ = queue_stored_results(
                    session, node.data_dir / "results", [item], {"seg": ["WEB"]}
                )
                session.execute(update(Job).where(Job.id == job_id).values(state=JobState.DONE))
            _start(node)
            wait_for(lambda: server.of("POST"), 60, interval=0.05, what="the delivery sent")
            before = len(node.log_text())
            started = time.monotonic()
            _signal(node, signal.SIGTERM, group=False)
            code, took = _gone(node, started, "SIGTERM to the node, a send stalled")
            assert code == 0
            assert 1.5 <= took < BOUND_S
            text = node.log_text()[before:]
            assert "stopping now" not in text
            assert "deliveries still sending at the stop deadline" in text
            with catalog.sessions() as session:
                assert session.scalars(select(Delivery.state)).one().value == "sending"

            node.node["job_workers"] = 0
            _start(node)

            def delivered() -> bool:
                with catalog.sessions() as session:
                    return session.scalars(select(Delivery.state)).one().value == "delivered"

            wait_for(delivered, 60, interval=0.1, what="the delivery, sent again")
        finally:
            catalog.dispose()
        assert len(server.of("POST")) == 2
        _healthy(node)
    finally:
        server.stop()
