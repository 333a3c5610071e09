"""The outbox against fake handlers at the registry seam: backoff schedule, transient retries,
dead letter, permanent refusals, holds, per-destination concurrency and restart recovery."""

from __future__ import annotations

import collections
import contextlib
import os
import random
import threading
import time
from collections.abc import Iterator, Sequence
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any

import pytest

from pacs_node.audit.message import validate
from pacs_node.catalog.audit import list_events
from pacs_node.catalog.db import Catalog, open_catalog
from pacs_node.catalog.deliveries import create_deliveries, list_deliveries, retry_delivery
from pacs_node.catalog.models import Delivery, DeliveryState, utcnow
from pacs_node.catalog.results import StoredEncoding
from pacs_node.config import NodeOptions, PeerConfig, Settings
from pacs_node.destinations import AnyDestination, DimseDestination
from pacs_node.dispatch.handler import Delivered, Held, Outcome, Parcel, Permanent, Transient
from pacs_node.dispatch.outbox import Outbox, backoff_delay
from tests.catalog_factory import queue_stored_results
from tests.conftest import wait_for

EXPLICIT_LE = "1.2.840.10008.1.2.1"
CT = "1.2.840.10008.5.1.4.1.1.2"


class FakeHandler:
    """Answers from a script (one list of outcomes per call, last one repeated); records what
    it was given and how many calls ran at once."""

    def __init__(self, *script: Outcome, batch_size: int = 64, gate: threading.Event | None = None):
        self.script = list(script) or [Delivered(EXPLICIT_LE)]
        self.batch_size = batch_size
        self.gate = gate
        self.calls: list[list[Parcel]] = []
        self.delivered: list[int] = []
        self.running = 0
        self.most_at_once = 0
        self._lock = threading.Lock()

    def send(self, destination: AnyDestination, parcels: Sequence[Parcel]) -> list[Outcome]:
        with self._lock:
            self.calls.append(list(parcels))
            outcome = self.script[min(len(self.calls), len(self.script)) - 1]
            self.running += 1
            self.most_at_once = max(self.most_at_once, self.running)
        if self.gate is not None:
            self.gate.wait(10)
        with self._lock:
            self.running -= 1
            if isinstance(outcome, Delivered):
                self.delivered.extend(p.delivery_id for p in parcels)
        return [outcome] * len(parcels)


class Clock:
    def __init__(self) -> None:
        self.now = utcnow()

    def __call__(self) -> datetime:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += timedelta(seconds=seconds)


def _settings(tmp_path: Path, concurrency: int = 1) -> Settings:
    return Settings(
        node=NodeOptions(
            data_dir=tmp_path / "var",
            fsync=False,
            delivery_max_attempts=3,
            delivery_backoff_s=10.0,
            delivery_backoff_max_s=25.0,
        ),
        peers=(PeerConfig(ae_title="CT1", host="127.0.0.1"),),  # no port: not a destination
        destinations={
            "PACS": DimseDestination(
                type="dimse", ae_title="PACS", host="127.0.0.1", port=104, concurrency=concurrency
            )
        },
    )


@pytest.fixture
def catalog(tmp_path: Path) -> Iterator[Catalog]:
    opened = open_catalog(f"sqlite:///{tmp_path / 'c.sqlite'}")
    yield opened
    opened.dispose()


def _deliveries(
    catalog: Catalog, settings: Settings, n: int = 1, destination: str = "PACS"
) -> list[int]:
    """A job with ``n`` stored SEG-like results, each to be delivered to ``destination``."""
    items = [
        StoredEncoding("seg", CT, f"1.2.3.{i}", "1.2.3.100", EXPLICIT_LE, b"DICM" * 8)
        for i in range(n)
    ]
    with catalog.sessions.begin() as session:
        job_id, results = queue_stored_results(
            session, settings.node.data_dir / "results", items, {"seg": [destination]}
        )
        create_deliveries(session, job_id, results, {"seg": [destination]})  # idempotent
    with catalog.sessions() as session:
        return [d.id for d in list_deliveries(session)]


def _rows(catalog: Catalog) -> list[Delivery]:
    with catalog.sessions() as session:
        return list(session.query(Delivery).order_by(Delivery.id))


def test_backoff_doubles_to_the_cap_with_jitter() -> None:
    rng = random.Random(1)
    for attempt, ceiling in [(1, 5), (2, 10), (3, 20), (4, 40), (5, 60), (9, 60)]:
        delays = [backoff_delay(attempt, 5.0, 60.0, rng) for _ in range(200)]
        assert min(delays) >= ceiling / 2
        assert max(delays) <= ceiling
        assert max(delays) - min(delays) > ceiling / 4  # jittered, not lock-step


def test_transient_failures_back_off_then_deliver_once(tmp_path: Path, catalog: Catalog) -> None:
    settings = _settings(tmp_path)
    (delivery_id,) = _deliveries(catalog, settings)
    fake = FakeHandler(Transient("peer down"), Transient("peer down"), Delivered(EXPLICIT_LE))
    clock = Clock()
    outbox = Outbox(catalog, settings, {"dimse": fake}, rng=random.Random(3), clock=clock)

    assert outbox.dispatch_due(wait=True) == 1
    (row,) = _rows(catalog)
    assert (row.state, row.attempts, row.last_error) == (DeliveryState.PENDING, 1, "peer down")
    assert row.next_attempt_at is not None
    first_wait = (row.next_attempt_at - clock.now).total_seconds()
    assert 5.0 <= first_wait <= 10.0
    assert outbox.dispatch_due(wait=True) == 0  # not due yet: nothing is sent early
    clock.advance(first_wait)
    assert outbox.dispatch_due(wait=True) == 1
    (row,) = _rows(catalog)
    assert row.next_attempt_at is not None
    second_wait = (row.next_attempt_at - clock.now).total_seconds()
    assert 10.0 <= second_wait <= 20.0
    clock.advance(second_wait)
    assert outbox.dispatch_due(wait=True) == 1
    (row,) = _rows(catalog)
    assert (row.state, row.attempts, row.transfer_syntax_uid) == (
        DeliveryState.DELIVERED,
        3,
        EXPLICIT_LE,
    )
    assert fake.delivered == [delivery_id]
    clock.advance(1000)
    assert outbox.dispatch_due(wait=True) == 0  # delivered is final
    # each attempt is audited in its settling transaction: 110104 (R), failed twice, then sent
    with catalog.sessions() as session:
        audited = list_events(session).rows
    assert [(e.event_id, e.action, e.outcome) for e in audited] == [
        ("110104", "R", 8),
        ("110104", "R", 8),
        ("110104", "R", 0),
    ]
    assert audited[0].description == "peer down"
    assert audited[2].actor == settings.node.ae_title
    for event in audited:
        validate(event.message.encode())


def test_dead_letter_after_the_limit_and_retry_by_hand(tmp_path: Path, catalog: Catalog) -> None:
    settings = _settings(tmp_path)
    (delivery_id,) = _deliveries(catalog, settings)
    fake = FakeHandler(Transient("peer down"))
    clock = Clock()
    outbox = Outbox(catalog, settings, {"dimse": fake}, clock=clock)
    for _ in range(3):
        assert outbox.dispatch_due(wait=True) == 1
        clock.advance(60)
    (row,) = _rows(catalog)
    assert row.state == DeliveryState.DEAD
    assert row.last_error == "gave up after 3 attempts: peer down"
    assert outbox.dispatch_due(wait=True) == 0  # kept, listed, never retried on its own
    with catalog.sessions.begin() as session:
        assert retry_delivery(session, delivery_id) is True
    fake.script = [Delivered(EXPLICIT_LE)]
    assert outbox.dispatch_due(wait=True) == 1
    (row,) = _rows(catalog)
    assert (row.state, row.attempts) == (DeliveryState.DELIVERED, 1)


def test_permanent_refusal_is_dead_at_once(tmp_path: Path, catalog: Catalog) -> None:
    settings = _settings(tmp_path)
    _deliveries(catalog, settings, n=2)
    fake = FakeHandler(Permanent("SOP class refused"))
    outbox = Outbox(catalog, settings, {"dimse": fake})
    assert outbox.dispatch_due(wait=True) == 1  # both in one batch
    assert [(r.state, r.attempts) for r in _rows(catalog)] == [(DeliveryState.DEAD, 1)] * 2


def test_holds_wait_for_a_person_or_for_config(tmp_path: Path, catalog: Catalog) -> None:
    settings = _settings(tmp_path)
    _deliveries(catalog, settings, destination="CT1")  # the sender, known without a port
    fake = FakeHandler(Held("the EHR has no Patient"))
    outbox = Outbox(catalog, settings, {"dimse": fake})
    outbox.dispatch_due(wait=True)
    (row,) = _rows(catalog)
    assert (row.state, row.held_for) == (DeliveryState.HELD, "destination")
    assert row.last_error is not None
    assert "CT1" in row.last_error
    assert fake.calls == []
    outbox.recover()  # same config: still nowhere to send
    assert _rows(catalog)[0].state == DeliveryState.HELD
    # the peer gets a port in peers.yaml; at the next start its deliveries go out
    configured = settings.model_copy(
        update={"peers": (PeerConfig(ae_title="CT1", host="127.0.0.1", port=104),)}
    )
    outbox = Outbox(catalog, configured, {"dimse": fake})
    outbox.recover()
    outbox.dispatch_due(wait=True)
    (row,) = _rows(catalog)
    assert (row.state, row.held_for) == (DeliveryState.HELD, "patient")  # the fake's answer


def test_concurrency_per_destination_is_respected(tmp_path: Path, catalog: Catalog) -> None:
    settings = _settings(tmp_path, concurrency=2)
    ids = _deliveries(catalog, settings, n=5)
    gate = threading.Event()
    fake = FakeHandler(batch_size=1, gate=gate)
    outbox = Outbox(catalog, settings, {"dimse": fake})
    try:
        assert outbox.dispatch_due() == 2  # two slots, one parcel each
        wait_for(lambda: fake.running == 2, 10, what="two sends in flight")
        assert outbox.dispatch_due() == 0  # no free slot
        gate.set()
        wait_for(lambda: fake.running == 0 and len(fake.calls) == 2, 10, what="the first two")
        wait_for(lambda: outbox.dispatch_due() == 0 and len(fake.delivered) == 5, 10, what="all")
    finally:
        gate.set()
        outbox.stop()
    assert fake.most_at_once == 2
    assert sorted(fake.delivered) == ids  # each exactly once
    assert {r.state for r in _rows(catalog)} == {DeliveryState.DELIVERED}


def test_rows_cut_off_mid_send_go_out_again_at_start(tmp_path: Path, catalog: Catalog) -> None:
    """A restarted process takes back at once the claims its node's earlier process left, and
    only those: another node's live claim on the shared catalog waits for its lease."""
    settings = _settings(tmp_path)
    _deliveries(catalog, settings, n=2)
    fake = FakeHandler()
    outbox = Outbox(catalog, settings, {"dimse": fake})
    earlier = f"{outbox.node_id}/{os.getpid()}/0dead000"  # this node, an earlier life
    other = f"other-node:abc/{os.getpid()}/00000000"  # another node, alive
    lease = utcnow() + timedelta(minutes=5)
    with catalog.sessions.begin() as session:
        first, second = session.query(Delivery).order_by(Delivery.id).all()
        for row, owner in ((first, earlier), (second, other)):
            row.state, row.attempts = DeliveryState.SENDING, 1
            row.claimed_by, row.lease_expires_at = owner, lease
    assert outbox.dispatch_due(wait=True) == 0  # a live claim is not claimed twice
    outbox.recover()
    assert outbox.dispatch_due(wait=True) == 1
    rows = _rows(catalog)
    assert [(r.state, r.attempts) for r in rows] == [
        (DeliveryState.DELIVERED, 2),
        (DeliveryState.SENDING, 1),  # the other node's, untouched
    ]
    assert rows[1].claimed_by == other


def test_c_store_statuses_and_contexts() -> None:
    from pacs_node.dispatch.dimse import classify_status, contexts_for

    assert classify_status(0x0000) == Delivered()
    assert classify_status(0xB007) == Delivered()  # a warning is stored
    assert isinstance(classify_status(0xA700, "disk full"), Transient)
    assert isinstance(classify_status(0xA900), Permanent)
    assert isinstance(classify_status(0x0122), Permanent)
    assert isinstance(classify_status(0xC001), Permanent)
    j2k = "1.2.840.10008.1.2.4.90"
    seg = "1.2.840.10008.5.1.4.1.1.66.4"
    parcels = [
        Parcel(1, "seg", seg, "1.1", {EXPLICIT_LE: Path("a"), j2k: Path("b")}),
        Parcel(2, "sr", CT, "1.2", {EXPLICIT_LE: Path("c")}),
        Parcel(3, "fhir", None, None, {"application/fhir+json": Path("d")}),
    ]
    # every stored encoding of every SOP class is proposed, each as its own context
    assert contexts_for(parcels) == [(seg, EXPLICIT_LE), (seg, j2k), (CT, EXPLICIT_LE)]


class Recorder:
    """Delivers everything, counting in ``sent`` (shared by the nodes) how often each delivery
    id went out. Its first batch waits at ``both`` until the other node's first batch comes,
    so the two nodes are sure to be sending at the same time."""

    batch_size = 3

    def __init__(
        self, sent: collections.Counter[int], lock: threading.Lock, both: threading.Barrier
    ) -> None:
        self.sent = sent
        self.count = 0
        self._lock = lock
        self._both = both

    def send(self, destination: AnyDestination, parcels: Sequence[Parcel]) -> list[Outcome]:
        with self._lock:
            first = self.count == 0
            self.count += len(parcels)
        if first:
            with contextlib.suppress(threading.BrokenBarrierError):
                self._both.wait(10)
        time.sleep(0.005)  # long enough for the other node to try the same rows
        with self._lock:
            self.sent.update(p.delivery_id for p in parcels)
        return [Delivered(EXPLICIT_LE)] * len(parcels)


@pytest.mark.parametrize("backend", ["sqlite", "postgresql"])
def test_two_nodes_on_one_catalog_never_send_a_row_twice(
    tmp_path: Path, backend: str, request: pytest.FixtureRequest
) -> None:
    url = (
        f"sqlite:///{tmp_path / 'shared.sqlite'}"
        if backend == "sqlite"
        else request.getfixturevalue("postgres_url")
    )
    shared = open_catalog(url)
    settings = _settings(tmp_path)
    ids = _deliveries(shared, settings, n=40)
    sent: collections.Counter[int] = collections.Counter()
    lock, both = threading.Lock(), threading.Barrier(2)
    recorders = [Recorder(sent, lock, both), Recorder(sent, lock, both)]
    outboxes = [
        Outbox(
            shared,
            settings.model_copy(
                update={"node": settings.node.model_copy(update={"node_id": name})}
            ),
            {"dimse": recorder},
        )
        for name, recorder in zip(("node-a", "node-b"), recorders, strict=True)
    ]
    try:
        for outbox in outboxes:
            outbox.start()  # each takes back only its own node's claims: none
        wait_for(lambda: sum(sent.values()) >= 40, 60, what="every delivery sent")
        wait_for(
            lambda: {r.state for r in _rows(shared)} == {DeliveryState.DELIVERED},
            30,
            what="every delivery settled",
        )
    finally:
        for outbox in outboxes:
            outbox.stop()
        shared.dispose()
    assert sorted(sent) == ids
    assert set(sent.values()) == {1}  # never one row twice
    assert not both.broken  # both nodes were sending at the same time


def test_a_settle_failure_is_taken_back_after_its_lease(
    tmp_path: Path, catalog: Catalog, monkeypatch: pytest.MonkeyPatch
) -> None:
    settings = _settings(tmp_path)
    settings = settings.model_copy(
        update={"node": settings.node.model_copy(update={"delivery_lease_s": 30.0})}
    )
    _deliveries(catalog, settings)
    import pacs_node.dispatch.outbox as outbox_module

    real = outbox_module.mark_delivered
    failures = iter([RuntimeError("the catalog went away")])

    def flaky(*args: Any, **kwargs: Any) -> None:
        error = next(failures, None)
        if error is not None:
            raise error
        real(*args, **kwargs)

    monkeypatch.setattr(outbox_module, "mark_delivered", flaky)
    fake = FakeHandler()
    clock = Clock()
    outbox = Outbox(catalog, settings, {"dimse": fake}, clock=clock)
    assert outbox.dispatch_due(wait=True) == 1
    (row,) = _rows(catalog)
    assert (row.state, row.claimed_by) == (DeliveryState.SENDING, outbox.owner)
    clock.advance(20)
    assert outbox.dispatch_due(wait=True) == 0  # the lease still holds
    clock.advance(11)
    assert outbox.dispatch_due(wait=True) == 1  # taken back and sent again, no restart
    (row,) = _rows(catalog)
    assert (row.state, row.attempts) == (DeliveryState.DELIVERED, 2)
    assert len(fake.calls) == 2


def test_a_long_send_renews_its_lease(tmp_path: Path, catalog: Catalog) -> None:
    settings = _settings(tmp_path)
    settings = settings.model_copy(
        update={"node": settings.node.model_copy(update={"delivery_lease_s": 30.0})}
    )
    _deliveries(catalog, settings)
    gate = threading.Event()
    fake = FakeHandler(gate=gate)
    clock = Clock()
    outbox = Outbox(catalog, settings, {"dimse": fake}, clock=clock)
    try:
        assert outbox.dispatch_due() == 1
        wait_for(lambda: fake.running == 1, 10, what="the send in flight")
        clock.advance(15)
        outbox.dispatch_due()  # renews: a third of the lease has passed
        clock.advance(20)  # past the first lease, within the renewed one
        assert outbox.dispatch_due() == 0
        (row,) = _rows(catalog)
        assert row.state == DeliveryState.SENDING
        gate.set()
        wait_for(lambda: _rows(catalog)[0].state == DeliveryState.DELIVERED, 10, what="done")
    finally:
        gate.set()
        outbox.stop()
    assert len(fake.calls) == 1


@pytest.mark.parametrize(
    ("calling_ae", "address", "settled"),
    [
        ("PACS", "10.0.0.5", True),
        ("PACS", "::ffff:10.0.0.5", True),  # the same host over an IPv4-mapped address
        ("PACS", "10.0.0.6", False),  # the right AE title from another host
        ("OTHER", "10.0.0.5", False),  # another AE on the right host
    ],
)
def test_a_commitment_report_settles_only_from_the_destination_asked(
    tmp_path: Path, catalog: Catalog, calling_ae: str, address: str, settled: bool
) -> None:
    from pacs_node.catalog.deliveries import (
        Outgoing,
        mark_delivered,
        note_commitment_peer,
        record_commitment_report,
    )
    from pacs_node.catalog.studies import counters
    from pacs_node.refs import CommitmentReport

    settings = _settings(tmp_path)
    (delivery_id,) = _deliveries(catalog, settings)
    item = Outgoing(delivery_id, 1, "PACS", "seg", CT, "1.2.3.0", {}, None, 1)
    with catalog.sessions.begin() as session:
        session.query(Delivery).update({"state": DeliveryState.SENDING, "attempts": 1})
        note_commitment_peer(session, delivery_id, "PACS", ["10.0.0.5"])
        mark_delivered(session, item, EXPLICIT_LE, "requested", "2.25.9")
    report = CommitmentReport(calling_ae, "2.25.9", ("1.2.3.0",), (), address)
    with catalog.sessions.begin() as session:
        assert record_commitment_report(session, report, utcnow()) == int(settled)
    (row,) = _rows(catalog)
    assert row.commitment == ("committed" if settled else "requested")
    with catalog.sessions() as session:
        refused = counters(session).get("commitment_reports_refused", 0)
    assert refused == (0 if settled else 1)
