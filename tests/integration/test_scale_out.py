"""Two ingest nodes on one PostgreSQL catalog and one data folder, as a group behind one AE
title: a study split across both is one study, routed once; the owner of the timer lease
SIGKILLed, the other takes the timers over within the lease time and routes the next study."""

from __future__ import annotations

import os
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import yaml
from sqlalchemy import func, select

from pacs_node.catalog import leases, nodes
from pacs_node.catalog.db import Catalog, open_catalog
from pacs_node.catalog.models import Job, Study, StudyEvent, StudyState
from pacs_node.ingest.spool import INCOMING
from tests.conftest import NodeProcess, storescu, wait_for
from tests.dicom_factory import new_uid, write_series

pytestmark = pytest.mark.integration

LEASE_S = 3.0
QUIET_S = 2.0
ROUTES = {"rules": [{"name": "ct", "when": {"modality": "CT"}, "models": ["ct-classical"]}]}


def _node(make_node: Callable[..., NodeProcess], shared: Path, url: str, name: str) -> NodeProcess:
    """A node of the group, not started yet."""
    node = make_node(
        start=False,
        data_dir=str(shared),
        database_url=url,
        node_id=name,
        timer_lease_s=LEASE_S,
        # Longer than two storescu starts apart on a loaded machine: the split study must not
        # be marked stable between its halves.
        quiet_period_s=QUIET_S,
        job_workers=0,  # the jobs stay queued: what is counted is how often a study was routed
        dicom_workers=0,
    )
    node.config_dir.mkdir(parents=True, exist_ok=True)
    (node.config_dir / "routes.yaml").write_text(yaml.safe_dump(ROUTES))
    return node


def _start(make_node: Callable[..., NodeProcess], shared: Path, url: str, name: str) -> NodeProcess:
    return _node(make_node, shared, url, name).start()


def _routing(catalog: Catalog, study_uid: str) -> tuple[str | None, int, int, int]:
    """(state, instances' study count, jobs, times it became stable) of one study."""
    with catalog.sessions() as session:
        study = session.scalars(select(Study).where(Study.study_uid == study_uid)).first()
        if study is None:
            return None, 0, 0, 0
        studies = session.scalar(select(func.count(Study.id)).where(Study.study_uid == study_uid))
        jobs = session.scalar(select(func.count(Job.id)).where(Job.study_id == study.id))
        stable = session.scalar(
            select(func.count(StudyEvent.id)).where(
                StudyEvent.study_id == study.id, StudyEvent.kind == "stable"
            )
        )
        return study.state.value, int(studies or 0), int(jobs or 0), int(stable or 0)


def _owner(catalog: Catalog) -> str:
    with catalog.sessions() as session:
        found = leases.holder(session, leases.TIMERS)
    return "" if found is None else found[0].split("/", 1)[0]


def test_two_ingest_nodes_route_a_split_study_once_and_hand_the_timers_over(
    postgres_url: str, make_node: Callable[..., NodeProcess], tmp_path: Path
) -> None:
    """(The database fixture first: it is dropped after the nodes stop.)"""
    shared = tmp_path / "shared"
    first = _start(make_node, shared, postgres_url, "node-a")
    catalog = open_catalog(postgres_url, run_migrations=False)
    try:
        wait_for(lambda: _owner(catalog) == "node-a", 10, what="node-a to own the timers")
        second = _start(make_node, shared, postgres_url, "node-b")

        split = new_uid()
        paths = write_series(tmp_path / "split", slices=8, study_uid=split)
        # Both halves at once (two storescu): the two nodes insert the study's rows concurrently.
        with ThreadPoolExecutor(2) as pool:
            sends = [
                pool.submit(storescu, node, *half)
                for node, half in ((first, paths[:4]), (second, paths[4:]))
            ]
            for sent in [f.result() for f in sends]:
                assert sent.returncode == 0, sent.stderr
        wait_for(lambda: _routing(catalog, split)[2] > 0, 20, what="the split study routed")
        assert _owner(catalog) == "node-a"  # routed by the owner, from the other's rows too

        first.kill()  # SIGKILL: no hand-over, the lease must run out
        killed = time.monotonic()
        later = new_uid()
        sent = storescu(second, *write_series(tmp_path / "later", slices=4, study_uid=later))
        assert sent.returncode == 0, sent.stderr
        wait_for(lambda: _owner(catalog) == "node-b", 2 * LEASE_S + 5, what="node-b takes over")
        took_over = time.monotonic() - killed
        wait_for(lambda: _routing(catalog, later)[2] > 0, 20, what="the later study routed")

        assert took_over < LEASE_S + LEASE_S / 3 + 3, took_over  # expiry + one renewal + slack
        assert _routing(catalog, split) == (StudyState.STABLE.value, 1, 1, 1)
        assert _routing(catalog, later) == (StudyState.STABLE.value, 1, 1, 1)
        with catalog.sessions() as session:
            assert session.scalar(select(func.count(Job.id))) == 2
        assert [s["instances"] for s in second.studies() if s["study_uid"] == split] == [8]
    finally:
        catalog.dispose()


def _registered(catalog: Catalog) -> dict[str, tuple[str, int]]:
    """node_id -> (host, pid) of every registration."""
    with catalog.sessions() as session:
        return {r.node_id: (r.host, r.pid) for r in nodes.registered_nodes(session, LEASE_S)}


def test_a_second_node_under_a_live_node_id_is_refused_and_leaves_live_partial_files(
    postgres_url: str, make_node: Callable[..., NodeProcess], tmp_path: Path
) -> None:
    """Two nodes on one catalog configured with the same node_id: the second one refuses to
    start (file, key, reason) before it touches anything; a node starting beside a live one
    leaves that one's partial files in the shared ``.incoming`` alone, and removes those of
    nodes not running; a node_id whose process died is taken over."""
    shared = tmp_path / "shared"
    first = _start(make_node, shared, postgres_url, "node-a")
    assert first.process is not None
    catalog = open_catalog(postgres_url, run_migrations=False)
    try:
        incoming = shared / "spool" / INCOMING
        in_flight = incoming / "node.node-a" / "in-flight.part"  # node-a is writing it
        in_flight.write_bytes(b"partial")
        abandoned = incoming / "node.node-z" / "abandoned.part"  # node-z is not running
        abandoned.parent.mkdir()
        abandoned.write_bytes(b"partial")
        long_ago = time.time() - 10 * LEASE_S  # a partial file of a node that is not running
        os.utime(abandoned, (long_ago, long_ago))
        assert _registered(catalog)["node-a"][1] == first.process.pid

        twin = _node(make_node, shared, postgres_url, "node-a")
        with pytest.raises(AssertionError, match="node exited early"):
            twin.start()
        said = twin.log_path.read_text().replace("\n", "")  # the console wraps long lines
        assert f"{twin.config_dir / 'node.yaml'}: node_id: " in said
        assert "'node-a' is in use by a running node" in said
        assert in_flight.exists()  # refused before any clean-up
        assert abandoned.exists()
        assert _registered(catalog)["node-a"][1] == first.process.pid

        second = _start(make_node, shared, postgres_url, "node-b")
        assert in_flight.exists()  # node-a's, and node-a is live
        assert not abandoned.exists()
        assert abandoned.parent.exists()  # a folder stays: its node may be starting now
        assert set(_registered(catalog)) == {"node-a", "node-b"}

        first.kill()  # its registration stays; its process is gone
        again = _start(make_node, shared, postgres_url, "node-a")
        assert again.process is not None
        assert _registered(catalog)["node-a"][1] == again.process.pid
        assert not in_flight.exists()  # its own leftovers, from its dead process
        second.stop()
        assert "node-b" not in _registered(catalog)  # a graceful stop unregisters
    finally:
        catalog.dispose()
