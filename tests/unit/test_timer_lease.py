"""The timer lease of a group of nodes on one catalog: taken, renewed, handed over, and checked
in the transaction of each timer action (SQLite and PostgreSQL)."""

from __future__ import annotations

import sqlite3
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from dataclasses import replace
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import create_engine, delete, func, select, text, update
from sqlalchemy.exc import DBAPIError
from sqlalchemy.orm import Session

from pacs_node import process_identity
from pacs_node.assembly import Assembly
from pacs_node.catalog import leases, nodes
from pacs_node.catalog.db import Catalog, open_catalog
from pacs_node.catalog.models import (
    Job,
    NodeLease,
    NodeRegistration,
    RouteOutcome,
    Series,
    Study,
    StudyState,
)
from pacs_node.catalog.studies import StudyTouch, list_studies
from pacs_node.config import NodeOptions, Settings
from pacs_node.ingest.spool import Spool
from pacs_node.refs import RoutingHeader
from pacs_node.routing import facts
from pacs_node.routing.router import Router
from pacs_node.routing.rules import RoutesFile
from pacs_node.timer_lease import TimerLease
from tests.catalog_factory import ingest
from tests.dicom_factory import write_series
from tests.unit.test_assembly import T0, _record, _ref


@pytest.fixture(params=["sqlite", "postgresql"])
def url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    if request.param == "sqlite":
        return f"sqlite:///{tmp_path / 'catalog.sqlite'}"
    return str(request.getfixturevalue("postgres_url"))


@pytest.fixture
def catalogs(url: str) -> Iterator[tuple[Catalog, Catalog]]:
    """Two nodes' handles on one catalog (two engines, as two processes would have)."""
    first = open_catalog(url)
    second = open_catalog(url, run_migrations=False)
    yield first, second
    first.dispose()
    second.dispose()


def _expire(catalog: Catalog) -> None:
    """The owner died: its lease runs out (instead of waiting for it)."""
    with catalog.sessions.begin() as session:
        session.execute(update(NodeLease).values(expires_at=leases.NEVER))


def test_one_owner_renews_the_other_takes_over_when_it_expires(
    catalogs: tuple[Catalog, Catalog],
) -> None:
    a = TimerLease(catalogs[0], "node-a", ttl_s=30)
    b = TimerLease(catalogs[1], "node-b", ttl_s=30)
    taken: list[str] = []
    b.add_listener(lambda: taken.append("b"))
    assert a.renew()
    assert a.owned()
    assert not b.renew()
    assert not b.owned()
    assert a.renew()  # renewal keeps it
    with catalogs[1].sessions.begin() as session:
        assert not b.held(session)
        found = leases.holder(session, leases.TIMERS)
    assert found is not None
    assert found[0] == a.owner
    _expire(catalogs[0])
    assert b.renew()
    assert taken == ["b"]
    assert b.renew()
    assert taken == ["b"]
    assert not a.renew()
    assert not a.owned()
    with catalogs[0].sessions.begin() as session:
        assert not a.held(session)
    b.stop()  # a graceful stop hands it over at once
    assert a.renew()


def test_only_the_owner_marks_a_study_stable_once_across_a_hand_over(
    catalogs: tuple[Catalog, Catalog],
) -> None:
    settings = Settings(node=NodeOptions(quiet_period_s=30, max_wait_s=600))
    a_lease = TimerLease(catalogs[0], "node-a", ttl_s=30)
    b_lease = TimerLease(catalogs[1], "node-b", ttl_s=30)
    a = Assembly(catalogs[0], settings, a_lease)
    b = Assembly(catalogs[1], settings, b_lease)
    stable: list[str] = []
    a.add_listener(lambda uid: stable.append(f"a:{uid}"))
    b.add_listener(lambda uid: stable.append(f"b:{uid}"))
    _record(catalogs[1], _ref(1, T0))  # received by the node without the lease
    assert a_lease.renew()
    assert not b_lease.renew()
    assert not b.check("1.2.3", 0)  # not the owner: never acts
    _expire(catalogs[0])
    assert b_lease.renew()
    assert not a.check("1.2.3", 0)  # lost it: never acts, even on an old timer
    assert b.check("1.2.3", 0)
    assert not b.check("1.2.3", 0)
    assert stable == ["b:1.2.3"]


@pytest.mark.parametrize("url", ["postgresql"], indirect=True)
def test_a_frozen_owner_blocks_a_takeover_only_briefly_and_its_action_is_undone(
    catalogs: tuple[Catalog, Catalog],
) -> None:
    """The hold is a row lock: a takeover waits for the transaction that checked the lease.
    An owner that froze in that transaction (idle) is cut off by the server after half its
    lease, so the takeover goes ahead within a bound, and the frozen action never commits."""
    a = TimerLease(catalogs[0], "node-a", ttl_s=1)
    b = TimerLease(catalogs[1], "node-b", ttl_s=1)
    assert a.renew()
    won, done = threading.Event(), threading.Event()

    def take_over() -> None:  # b's lease loop: renew until it takes the lease
        while not done.wait(0.05):
            if b.renew():
                won.set()
                return

    session = catalogs[0].sessions()
    session.begin()
    assert a.held(session)
    session.execute(update(Study).values(state=StudyState.STABLE))  # the owner's action
    thread = threading.Thread(target=take_over, daemon=True)
    thread.start()
    try:
        assert won.wait(15), "the frozen owner's transaction still blocks the lease"
        with pytest.raises(DBAPIError):
            session.commit()
    finally:
        done.set()
        session.close()
    thread.join(5)
    with catalogs[1].sessions.begin() as check:
        assert not a.held(check)
        assert b.held(check)


@pytest.mark.parametrize("url", ["postgresql"], indirect=True)
def test_one_study_received_at_two_nodes_at_once_is_one_study(
    catalogs: tuple[Catalog, Catalog],
) -> None:
    barrier = threading.Barrier(2)

    def receive(catalog: Catalog, first: int) -> None:
        barrier.wait()
        for n in range(first, 40, 2):
            _record(catalog, _ref(n, T0))

    threads = [
        threading.Thread(target=receive, args=(catalog, i)) for i, catalog in enumerate(catalogs)
    ]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(30)
    with catalogs[0].sessions() as session:
        (study,) = list_studies(session)
        assert session.scalar(select(Series.id).where(Series.series_uid == "1.2.3.1")) is not None
        assert list(session.scalars(select(Study.state))) == [StudyState.RECEIVING]
    assert study.instances == 40


def test_a_restarted_node_takes_its_dead_processes_lease_back_at_once(
    catalogs: tuple[Catalog, Catalog],
) -> None:
    earlier = TimerLease(catalogs[0], "node-a", ttl_s=30)
    assert earlier.renew()
    other = TimerLease(catalogs[1], "node-b", ttl_s=30, gone=lambda owner, mine: True)
    other.start()  # another node's lease is never taken back early
    other.stop()
    assert not other.owned()
    restarted = TimerLease(
        catalogs[1], "node-a", ttl_s=30, gone=lambda owner, mine: owner == earlier.owner
    )
    restarted.start()
    try:
        assert restarted.owned()
    finally:
        restarted.stop()


def test_the_owners_sweep_catches_up_on_studies_it_did_not_route(
    catalogs: tuple[Catalog, Catalog],
) -> None:
    """A stable study whose routing was missed (the lease lapsed for a moment, routing
    raised) is taken up by the owner's next sweep, not left until a restart."""
    settings = Settings(node=NodeOptions(quiet_period_s=30, max_wait_s=600))
    lease = TimerLease(catalogs[0], "node-a", ttl_s=30)
    assembly = Assembly(catalogs[0], settings, lease)
    caught_up: list[str] = []
    assembly.add_sweep_listener(lambda: caught_up.append("routed"))
    assembly.add_sweep_listener(lambda: 1 / 0)  # a failing listener stops neither
    assembly.start()
    try:
        assert assembly.sweep() == 0
        assert caught_up == []  # not the owner: nothing
        assert lease.renew()
        assembly.sweep()
        assembly.sweep()
        assert caught_up == ["routed", "routed"]
    finally:
        assembly.stop()


@pytest.mark.parametrize("url", ["postgresql"], indirect=True)
def test_a_node_with_a_skewed_clock_does_not_shorten_the_quiet_period(
    catalogs: tuple[Catalog, Catalog],
) -> None:
    """Arrivals and the timer both read the database's clock: an instance a node whose clock
    is an hour behind received just now is not taken for an hour-old one."""
    settings = Settings(node=NodeOptions(quiet_period_s=30, max_wait_s=600))
    lease = TimerLease(catalogs[0], "node-a", ttl_s=30)
    assembly = Assembly(catalogs[0], settings, lease)
    assert lease.renew()
    skewed = datetime.now(UTC) - timedelta(hours=1)
    _record(catalogs[1], _ref(1, skewed))
    assert not assembly.check("1.2.3", 30)  # 30 s have not passed by the database's clock
    assert _study_state(catalogs[0]) == StudyState.RECEIVING
    assert assembly.check("1.2.3", 0)
    assert _study_state(catalogs[0]) == StudyState.STABLE
    assembly.stop()


def _study_state(catalog: Catalog) -> StudyState:
    with catalog.sessions() as session:
        return session.scalars(select(Study.state)).one()


@pytest.mark.parametrize("url", ["sqlite"], indirect=True)
def test_a_timer_armed_from_a_clock_ahead_of_this_nodes_fires_within_a_quiet_period(
    catalogs: tuple[Catalog, Catalog],
) -> None:
    """Arrival times may be the database's clock, an hour ahead of this node's: the timer still
    fires within a quiet period by this node's clock (and the check re-arms it exactly)."""
    assembly = Assembly(catalogs[0], Settings(node=NodeOptions(quiet_period_s=30)))
    assembly.start()
    try:
        ahead = datetime.now(UTC) + timedelta(hours=1)
        assembly.on_touched([StudyTouch("1.2.3", ahead, ahead, "CT1", reopened=False)])
        job = assembly._scheduler.get_job("1.2.3")
        assert job is not None
        assert job.next_run_time <= datetime.now(UTC) + timedelta(seconds=31)
    finally:
        assembly.stop()


def _stale(catalog: Catalog, node_id: str) -> None:
    """The registered process stopped beating: its heartbeat is older than the lease."""
    with catalog.sessions.begin() as session:
        session.execute(
            update(NodeRegistration)
            .where(NodeRegistration.node_id == node_id)
            .values(heartbeat_at=datetime(2000, 1, 1, tzinfo=UTC))
        )


def test_a_node_id_held_by_a_live_process_is_refused_and_a_stale_one_taken_over(
    catalogs: tuple[Catalog, Catalog],
) -> None:
    first = TimerLease(catalogs[0], "node-a", ttl_s=30)
    assert first.register() is None
    assert first.register() is None  # its own registration again: still its own
    twin = TimerLease(catalogs[1], "node-a", ttl_s=30, gone=lambda owner, mine: True)
    twin.host = "other-host"  # a process gone on this host says nothing of another host
    held = twin.register()
    assert held is not None
    assert (held.owner, held.host, held.live) == (first.owner, first.host, True)
    assert TimerLease(catalogs[1], "node-b", ttl_s=30).register() is None  # other ids are free
    assert first._beat()  # a heartbeat: still live
    assert twin.register() is not None
    _stale(catalogs[0], "node-a")
    assert twin.register() is None  # taken over
    with catalogs[0].sessions.begin() as session:
        beat = nodes.beat(session, "node-a", first.owner, first.host, first.identity)
        assert beat is nodes.Beat.TAKEN  # no longer the first's
    assert {n.node_id: n.owner for n in twin.nodes()}["node-a"] == twin.owner


def _dead_pid() -> int:
    """A pid that no process holds now (a child that exited and was reaped)."""
    child = subprocess.Popen([sys.executable, "-c", "pass"])
    child.wait()
    return child.pid


def test_a_restarted_node_takes_its_dead_processes_registration_over_at_once(
    catalogs: tuple[Catalog, Catalog],
) -> None:
    earlier = TimerLease(catalogs[0], "node-a", ttl_s=30)
    earlier.identity = replace(earlier.identity, pid=_dead_pid(), start=12345)
    assert earlier.register() is None
    restarted = TimerLease(catalogs[1], "node-a", ttl_s=30)
    assert restarted.register() is None  # same boot and pid namespace, its process gone
    restarted.stop()  # a graceful stop removes the registration
    assert restarted.nodes() == []


def test_a_container_restarted_as_the_same_pid_takes_its_registration_over(
    catalogs: tuple[Catalog, Catalog],
) -> None:
    """Pid 1 again in a restarted container: the pid is this process's, its start time not."""
    earlier = TimerLease(catalogs[0], "node-a", ttl_s=30)
    earlier.identity = replace(earlier.identity, start=earlier.identity.start + 1)
    assert earlier.register() is None
    assert TimerLease(catalogs[1], "node-a", ttl_s=30).register() is None


def test_a_live_process_is_never_taken_for_an_earlier_life(
    catalogs: tuple[Catalog, Catalog], tmp_path: Path
) -> None:
    """Containers sharing a host name, each its node as pid 1: the same host and pid (even
    this process's own), another pid namespace or boot, or nothing known (no ``/proc``), and
    the row waits out the lease."""
    first = TimerLease(catalogs[0], "node-a", ttl_s=30)
    assert first.register() is None
    mine = first.identity
    assert mine.known
    others = [
        mine,  # the very same process, registered by another handle
        replace(mine, pid=_dead_pid(), pid_ns=mine.pid_ns + 1),  # another container
        replace(mine, pid=_dead_pid(), boot_id="another-boot"),  # another host, same name
    ]
    for identity in others:
        twin = TimerLease(catalogs[1], "node-a", ttl_s=30)
        with catalogs[0].sessions.begin() as session:
            session.execute(
                update(NodeRegistration)
                .where(NodeRegistration.node_id == "node-a")
                .values(
                    pid=identity.pid,
                    boot_id=identity.boot_id,
                    pid_ns=identity.pid_ns,
                    pid_start=identity.start,
                )
            )
        held = twin.register()
        assert held is not None, identity
        assert held.host == twin.host
    unknown = TimerLease(catalogs[1], "node-a", ttl_s=30)
    unknown.identity = process_identity.current(proc=tmp_path / "no-proc")
    assert not unknown.identity.known
    assert unknown.register() is not None
    _stale(catalogs[0], "node-a")
    assert unknown.register() is None  # once stale, taken over


def _lease_row_locked(url: str) -> bool:
    """Whether another transaction holds the timer lease's row (PostgreSQL) or the database's
    write lock (SQLite) now: asked without waiting."""
    if url.startswith("sqlite"):
        connection = sqlite3.connect(url.removeprefix("sqlite:///"), timeout=0)
        try:
            connection.execute("BEGIN IMMEDIATE")
            connection.execute("ROLLBACK")
            return False
        except sqlite3.OperationalError:
            return True
        finally:
            connection.close()
    engine = create_engine(url)
    try:
        with engine.begin() as connection:
            connection.execute(
                text("SELECT name FROM node_leases WHERE name = 'timers' FOR UPDATE NOWAIT")
            )
        return False
    except DBAPIError:
        return True
    finally:
        engine.dispose()


def test_routing_reads_the_spool_before_it_takes_the_lease_row(
    url: str, catalogs: tuple[Catalog, Catalog], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A series recorded without headers has its files read for routing: while they are read
    the timer lease's row (and on SQLite the write lock) is free, so a slow file system holds
    no lock. A study that changed after that reading is routed on a fresh one."""
    catalog = catalogs[0]
    spool_dir = tmp_path / "spool"
    spool = Spool(spool_dir)
    study_id, study_uid, _ = ingest(
        catalog, spool_dir, write_series(tmp_path / "s", slices=3, rows=16, columns=16)
    )
    with catalog.sessions.begin() as session:  # recorded before headers were kept
        session.execute(update(Series).values(routing_first=None, routing_last=None))
        session.execute(
            update(Study)
            .where(Study.id == study_id)
            .values(state=StudyState.STABLE, stable_at=datetime.now(UTC))
        )
    lease = TimerLease(catalog, "node-a", ttl_s=30)
    assert lease.renew()
    routes = RoutesFile.model_validate(
        {"rules": [{"name": "ct", "when": {"modality": "CT"}, "models": ["ct-classical"]}]}
    )
    router = Router(catalog, spool, routes, lease)
    original = facts._read
    locked: list[bool] = []

    def reading(spool: Spool, relpath: str, series_uid: str) -> RoutingHeader:
        locked.append(_lease_row_locked(url))
        return original(spool, relpath, series_uid)

    monkeypatch.setattr(facts, "_read", reading)
    router.on_stable(study_uid)
    assert locked == [False, False]  # the first and the last file, before the lease's row
    with catalog.sessions() as session:
        assert session.scalar(select(func.count(Job.id))) == 1

    # A reading of another moment (the study has changed since) is not used.
    with catalog.sessions.begin() as session:
        session.execute(update(Study).values(routed_at=None))
        stale = ((study_id, None, None, 0, 0, 0), [])
        routed = router.route_study(session, study_uid, stale)
    assert routed is not None
    assert routed[0] is RouteOutcome.ROUTED  # from a fresh reading, not the empty one


def _heartbeat(catalog: Catalog, node_id: str) -> datetime | None:
    with catalog.sessions() as session:
        return session.scalar(
            select(NodeRegistration.heartbeat_at).where(NodeRegistration.node_id == node_id)
        )


def test_the_heartbeat_goes_on_while_a_lease_listener_runs_long(
    catalogs: tuple[Catalog, Catalog],
) -> None:
    """A catch-up of many studies on taking the lease never lets the registration go stale."""
    lease = TimerLease(catalogs[0], "node-a", ttl_s=0.6)
    release = threading.Event()
    lease.add_listener(lambda: release.wait(30))
    assert lease.register() is None
    first = _heartbeat(catalogs[0], "node-a")
    starting = threading.Thread(target=lease.start)
    starting.start()
    try:
        deadline = time.monotonic() + 10
        while _heartbeat(catalogs[0], "node-a") == first:
            assert time.monotonic() < deadline, "no heartbeat while the listener ran"
            time.sleep(0.05)
        assert not release.is_set()  # still in the listener
    finally:
        release.set()
        starting.join(10)
        lease.stop()


def test_a_registration_is_stale_only_after_twice_the_lease_time(
    catalogs: tuple[Catalog, Catalog],
) -> None:
    first = TimerLease(catalogs[0], "node-a", ttl_s=30)
    assert first.register() is None
    first.identity = replace(first.identity, pid_ns=first.identity.pid_ns + 1)  # not ours
    with catalogs[0].sessions.begin() as session:
        session.execute(
            update(NodeRegistration).values(
                heartbeat_at=datetime.now(UTC) - timedelta(seconds=45),
                pid_ns=first.identity.pid_ns,
            )
        )
    twin = TimerLease(catalogs[1], "node-a", ttl_s=30)
    assert twin.register() is not None  # 1.5 lease times without a beat: still live
    with catalogs[0].sessions.begin() as session:
        session.execute(
            update(NodeRegistration).values(heartbeat_at=datetime.now(UTC) - timedelta(seconds=65))
        )
    assert twin.register() is None
    twin.stop()


def test_a_process_whose_registration_was_taken_over_stops_and_a_missing_row_is_written_again(
    catalogs: tuple[Catalog, Catalog],
) -> None:
    fenced: list[bool] = []
    lease = TimerLease(catalogs[0], "node-a", ttl_s=30, on_fenced=lambda: fenced.append(True))
    assert lease.register() is None
    with catalogs[0].sessions.begin() as session:
        session.execute(delete(NodeRegistration))  # an operator, a restored database
    assert lease._beat()
    assert {n.node_id: n.owner for n in lease.nodes()} == {"node-a": lease.owner}
    assert lease.registered()
    with catalogs[1].sessions.begin() as session:
        session.execute(update(NodeRegistration).values(owner="node-a/1/another"))
    assert not lease._beat()
    assert fenced == [True]
    assert lease.fenced.is_set()
    assert not lease.registered()
    assert not lease.renew()  # no lease for a fenced process
    lease.stop()  # leaves the other process's row alone
    assert {n.node_id: n.owner for n in lease.nodes()} == {"node-a": "node-a/1/another"}


def test_a_registration_whose_holder_left_meanwhile_is_inserted_again(
    catalogs: tuple[Catalog, Catalog], monkeypatch: pytest.MonkeyPatch
) -> None:
    """The insert met the row of a process that stopped (and removed it) before the row was
    read: the start inserts again rather than failing on a row that is gone."""
    real = nodes._insert
    calls: list[int] = []

    def insert(session: Session, values: dict[str, Any]) -> bool:
        calls.append(1)
        return len(calls) > 1 and real(session, values)  # the first met the leaving row

    monkeypatch.setattr(nodes, "_insert", insert)
    lease = TimerLease(catalogs[0], "node-a", ttl_s=30)
    assert lease.register() is None
    assert {n.node_id: n.owner for n in lease.nodes()} == {"node-a": lease.owner}
    assert len(calls) == 2
    lease.stop()
