"""The outbox: sends due deliveries through their destination's handler, and decides what
happens after each attempt.

- Delivered: done. Held (the EHR does not know the patient; no destination configured yet):
  waits for a person or for config, never retried blindly.
- Transient (peer down, timeout, busy, 5xx): retried after an exponential backoff with jitter,
  ``delivery_backoff_s * 2**(attempt-1)`` capped at ``delivery_backoff_max_s``, drawn uniformly
  from its upper half so many deliveries do not retry in lock-step; after
  ``delivery_max_attempts`` it is dead-lettered.
- Permanent (refused SOP class, 4xx): dead-lettered at once. Dead rows are kept, listed and
  retryable by hand (``pacs-node deliveries retry``): nothing is ever dropped.

- Transient with a ``not_before`` (an HTTP Retry-After): the next attempt is no earlier than
  that, even when the backoff would be shorter.

Each destination has at most ``concurrency`` batches in flight (associations, requests). A
loop thread looks for due rows every ``POLL_S`` or when woken; batches run on a thread pool.
Handlers are found by destination ``type`` in a registry, so tests put a fake at that seam.

Claims are leased (see :mod:`pacs_node.catalog.deliveries`): each Outbox has an owner id
``<node id>/<pid>/<token>``; ``node id`` is ``node_id`` from node.yaml, else the host name and a
hash of the data directory, so a restarted process knows its node's earlier claims and takes
back those whose process is gone. The loop renews the leases of what it is sending every
``delivery_lease_s / 3`` and takes back anyone's expired claims (a process that died, or could
not settle: a settle that fails leaves the row 'sending' until its lease runs out).
"""

from __future__ import annotations

import logging
import os
import random
import secrets
import threading
import time
from collections.abc import Callable, Mapping
from concurrent.futures import Future, ThreadPoolExecutor, wait
from dataclasses import replace
from datetime import datetime, timedelta
from pathlib import Path
from urllib.parse import urlsplit

from sqlalchemy.orm import Session

from pacs_node.audit import events as audit_events
from pacs_node.catalog.audit import add_events_within, job_study
from pacs_node.catalog.db import Catalog
from pacs_node.catalog.deliveries import (
    HELD_FOR_DESTINATION,
    HELD_FOR_PATIENT,
    Outgoing,
    claim_due,
    claim_owners,
    due_destinations,
    hold_claim,
    mark_dead,
    mark_delivered,
    mark_held,
    mark_retry,
    note_commitment_peer,
    reclaim_expired,
    release_destination_holds,
    renew_leases,
    reset_claims,
)
from pacs_node.catalog.models import Commitment, utcnow
from pacs_node.config import Settings
from pacs_node.destinations import (
    AnyDestination,
    DicomWebDestination,
    DimseDestination,
    FhirDestination,
)
from pacs_node.dispatch.commitment import peer_addresses
from pacs_node.dispatch.destinations import Unresolved, resolve
from pacs_node.dispatch.handler import (
    Delivered,
    Handler,
    Held,
    Outcome,
    Parcel,
    Permanent,
    Transient,
)
from pacs_node.errors import DeliveryError, PermanentDelivery

log = logging.getLogger(__name__)

POLL_S = 0.5
MAX_THREADS = 16


def default_handlers(calling_ae: str) -> Mapping[str, Handler]:
    """The built-in handlers by destination ``type``."""
    from pacs_node.dispatch.dicomweb import StowHandler
    from pacs_node.dispatch.dimse import CStoreHandler
    from pacs_node.dispatch.fhir import FhirHandler

    return {"dimse": CStoreHandler(calling_ae), "dicomweb": StowHandler(), "fhir": FhirHandler()}


def node_id(settings: Settings) -> str:
    """This node's stable name in the claims it makes: ``node_id``, else host name + data dir."""
    return settings.node.node_name()


def process_gone(owner: str, mine: str) -> bool:
    """Whether the process that made a claim of this node (``<node id>/<pid>/<token>``) is gone:
    not this Outbox, and its pid is this process (an earlier life: containers reuse pid 1) or
    no longer alive."""
    if owner == mine:
        return False
    try:
        pid = int(owner.rsplit("/", 2)[-2])
    except (ValueError, IndexError):
        return True
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    except PermissionError:  # alive, someone else's
        return False
    return False


def backoff_delay(attempt: int, base_s: float, cap_s: float, rng: random.Random) -> float:
    """Seconds before retry number ``attempt`` (1-based): exponential, capped, with jitter."""
    ceiling = min(cap_s, base_s * 2 ** max(0, attempt - 1))
    return rng.uniform(ceiling / 2, ceiling)


class Outbox:
    def __init__(
        self,
        catalog: Catalog,
        settings: Settings,
        handlers: Mapping[str, Handler] | None = None,
        *,
        rng: random.Random | None = None,
        clock: Callable[[], datetime] = utcnow,
    ) -> None:
        self.catalog = catalog
        self.settings = settings
        self.handlers = handlers or default_handlers(settings.node.ae_title)
        self.results_dir = settings.node.data_dir / "results"
        self.rng = rng or random.Random()
        self.clock = clock
        self._in_flight: dict[str, int] = {}
        self.node_id = node_id(settings)
        self.owner = f"{self.node_id}/{os.getpid()}/{secrets.token_hex(4)}"
        self._sending: set[int] = set()  # delivery ids claimed and not yet settled
        self._renewed_at = clock()
        self._lock = threading.Lock()
        self._wake = threading.Event()
        self._stopping = threading.Event()
        self._thread: threading.Thread | None = None
        self._pool = ThreadPoolExecutor(MAX_THREADS, thread_name_prefix="outbox")
        self._batches: set[Future[None]] = set()  # batches submitted and not yet settled

    def resolve(self, name: str) -> AnyDestination | Unresolved:
        return resolve(name, self.settings.destinations, self.settings.peers)

    def lease_until(self, now: datetime) -> datetime:
        return now + timedelta(seconds=self.settings.node.delivery_lease_s)

    def recover(self) -> None:
        """Claims of this node's earlier processes go out again (another node's are left to
        their lease); holds for want of a destination are re-checked."""
        with self.catalog.sessions.begin() as session:
            gone = [o for o in claim_owners(session, self.node_id) if process_gone(o, self.owner)]
            resent = reset_claims(session, gone)
            released = release_destination_holds(
                session, lambda name: not isinstance(self.resolve(name), Unresolved)
            )
        if resent or released:
            log.info("outbox recovered", extra={"resent": resent, "released": released})

    def start(self) -> None:
        self.recover()
        self._thread = threading.Thread(target=self._loop, name="outbox", daemon=True)
        self._thread.start()

    def request_stop(self) -> None:
        """No new batch starts from now; the sends under way go on."""
        self._stopping.set()
        self._wake.set()

    def stop(self, deadline: float | None = None) -> int:
        """Stop by ``deadline`` (``time.monotonic()``; None: wait for every send under way).
        Returns how many deliveries were still being sent then: a peer that stalls must not
        hold the node's stop. Their claims stay; the next start sends them again (a peer
        stores the same SOP Instance UIDs once)."""
        self.request_stop()

        def left() -> float | None:
            return None if deadline is None else max(0.0, deadline - time.monotonic())

        if self._thread is not None:
            self._thread.join(30 if deadline is None else left())
        self._pool.shutdown(wait=False, cancel_futures=True)
        with self._lock:
            batches = set(self._batches)
        wait(batches, timeout=left())
        with self._lock:
            return len(self._sending)

    def _forget(self, batch: Future[None]) -> None:
        with self._lock:
            self._batches.discard(batch)

    def wake(self) -> None:
        self._wake.set()

    def _loop(self) -> None:
        while not self._stopping.is_set():
            try:
                self.dispatch_due()
            except Exception:  # the loop must outlive a bad moment of the database
                log.exception("outbox pass failed; trying again")
            self._wake.wait(POLL_S)
            self._wake.clear()

    def dispatch_due(self, *, wait: bool = False) -> int:
        """Start a batch for every due destination with a free slot; the number started.
        ``wait``: run them here and return when they are settled (burst mode, tests)."""
        now = self.clock()
        self._keep_claims(now)
        with self.catalog.sessions() as session:
            names = due_destinations(session, now)
        started = 0
        for name in names:
            target = self.resolve(name)
            limit, batch = self._limits(target)
            while True:
                with self._lock:
                    if self._in_flight.get(name, 0) >= limit:
                        break
                    self._in_flight[name] = self._in_flight.get(name, 0) + 1
                with self.catalog.sessions.begin() as session:
                    items = claim_due(session, name, batch, now, self.owner, self.lease_until(now))
                if not items:
                    self._release(name)
                    break
                with self._lock:
                    self._sending.update(item.delivery_id for item in items)
                started += 1
                if wait:
                    self._run(name, target, items)
                else:
                    batch_future = self._pool.submit(self._run, name, target, items)
                    with self._lock:
                        self._batches.add(batch_future)
                    batch_future.add_done_callback(self._forget)
        return started

    def _keep_claims(self, now: datetime) -> None:
        """Renew the leases of what this Outbox is sending (every third of a lease) and take
        back expired claims of any process."""
        period = timedelta(seconds=self.settings.node.delivery_lease_s / 3)
        with self.catalog.sessions.begin() as session:
            if now - self._renewed_at >= period:
                with self._lock:
                    sending = set(self._sending)
                if sending:
                    renew_leases(session, self.owner, sending, self.lease_until(now))
                self._renewed_at = now
            taken = reclaim_expired(session, now)
        if taken:
            log.warning("expired delivery claims taken back", extra={"deliveries": taken})

    def _limits(self, target: AnyDestination | Unresolved) -> tuple[int, int]:
        if isinstance(target, Unresolved):
            return 1, 256
        handler = self.handlers.get(target.type)
        return target.concurrency, handler.batch_size if handler else 256

    def _release(self, name: str) -> None:
        with self._lock:
            self._in_flight[name] = max(0, self._in_flight.get(name, 0) - 1)

    def _run(self, name: str, target: AnyDestination | Unresolved, items: list[Outgoing]) -> None:
        try:
            outcomes = self._send(target, items)
            hosts = self._commitment_hosts(target, outcomes)
            lost = 0
            with self.catalog.sessions.begin() as session:
                for item, outcome in zip(items, outcomes, strict=True):
                    if not hold_claim(session, item):
                        lost += 1  # its lease ran out and it was taken back: not ours to settle
                        continue
                    if (
                        hosts is not None
                        and isinstance(target, DimseDestination)
                        and isinstance(outcome, Delivered)
                        and outcome.commitment == Commitment.REQUESTED.value
                    ):
                        note_commitment_peer(
                            session, item.delivery_id, target.ae_title or "", hosts
                        )
                    self._settle(session, item, outcome, target)
                self._audit(session, name, target, items, outcomes)
            if lost:
                log.warning(
                    "delivery claims lost before settling",
                    extra={"destination": name, "deliveries": lost},
                )
            delivered = sum(isinstance(o, Delivered) for o in outcomes)
            log.info(
                "delivery batch",
                extra={"destination": name, "items": len(items), "delivered": delivered},
            )
        except Exception:
            # rows stay 'sending' until their lease runs out; then they go out again (the
            # receivers de-duplicate by UID)
            log.exception("delivery batch could not be settled", extra={"destination": name})
        finally:
            with self._lock:
                self._sending.difference_update(item.delivery_id for item in items)
            self._release(name)
            self._wake.set()

    def _audit(
        self,
        session: Session,
        name: str,
        target: AnyDestination | Unresolved,
        items: list[Outgoing],
        outcomes: list[Outcome],
    ) -> None:
        """One audit event per study and outcome of the batch (110104 R, 110106 for FHIR),
        in the settling transaction (in a savepoint: an audit failure is logged and never
        undoes the settle). Held rows (destination
        or patient not yet known) sent nothing and are not audited; retries are, each time."""
        if isinstance(target, Unresolved):
            return
        groups: dict[tuple[int, bool], list[tuple[Outgoing, Outcome]]] = {}
        for item, outcome in zip(items, outcomes, strict=True):
            if isinstance(outcome, Held):
                continue
            groups.setdefault((item.job_id, isinstance(outcome, Delivered)), []).append(
                (item, outcome)
            )
        address = _address_of(target)
        audited = []
        for (job_id, ok), pairs in groups.items():
            study = job_study(session, job_id)
            if study is None:
                continue
            counts: dict[str, int] = {}
            for item, _ in pairs:
                if item.sop_class_uid:
                    counts[item.sop_class_uid] = counts.get(item.sop_class_uid, 0) + 1
            reason = None if ok else getattr(pairs[0][1], "reason", None)
            event = audit_events.results_sent(
                self.settings.node.ae_title,
                name,
                address,
                replace(study, sop_classes=tuple(sorted(counts.items()))),
                fhir=isinstance(target, FhirDestination),
                ok=ok,
                reason=reason,
            )
            audited.append(event)
        add_events_within(session, audited)

    @staticmethod
    def _commitment_hosts(
        target: AnyDestination | Unresolved, outcomes: list[Outcome]
    ) -> tuple[str, ...] | None:
        """The addresses a commitment report on the destination's own association may come
        from, when this batch asked for commitment (resolved before the settle transaction)."""
        asked = any(
            isinstance(o, Delivered) and o.commitment == Commitment.REQUESTED.value
            for o in outcomes
        )
        if not asked or not isinstance(target, DimseDestination) or not target.host:
            return None
        return peer_addresses(target.host)

    def _send(self, target: AnyDestination | Unresolved, items: list[Outgoing]) -> list[Outcome]:
        if isinstance(target, Unresolved):
            return [Held(target.reason)] * len(items)
        handler = self.handlers.get(target.type)
        if handler is None:
            return [Permanent(f"no handler for destination type {target.type}")] * len(items)
        parcels = [self._parcel(item) for item in items]
        try:
            outcomes = handler.send(target, parcels)
        except PermanentDelivery as exc:
            return [Permanent(str(exc))] * len(items)
        except DeliveryError as exc:
            return [Transient(str(exc))] * len(items)
        except Exception as exc:  # a handler bug must not lose the rows: retry with backoff
            log.exception("handler failed", extra={"type": target.type})
            return [Transient(f"{type(exc).__name__}: {exc}")] * len(items)
        if len(outcomes) != len(items):
            return [Transient("handler answered for a different number of parcels")] * len(items)
        return outcomes

    def _parcel(self, item: Outgoing) -> Parcel:
        return Parcel(
            delivery_id=item.delivery_id,
            kind=item.kind,
            sop_class_uid=item.sop_class_uid,
            sop_instance_uid=item.sop_instance_uid,
            encodings={ts: self.results_dir / Path(rel) for ts, rel in item.encodings.items()},
            patient_search=item.patient_search,
        )

    def _settle(
        self,
        session: Session,
        item: Outgoing,
        outcome: Outcome,
        target: AnyDestination | Unresolved,
    ) -> None:
        options = self.settings.node
        if isinstance(outcome, Delivered):
            mark_delivered(
                session,
                item,
                outcome.transfer_syntax_uid,
                outcome.commitment,
                outcome.commitment_uid,
            )
        elif isinstance(outcome, Held):
            held_for = HELD_FOR_DESTINATION if isinstance(target, Unresolved) else HELD_FOR_PATIENT
            mark_held(session, item, outcome.reason, held_for)
        elif isinstance(outcome, Permanent):
            mark_dead(session, item, outcome.reason)
        elif item.attempts >= options.delivery_max_attempts:
            mark_dead(session, item, f"gave up after {item.attempts} attempts: {outcome.reason}")
        else:
            delay = backoff_delay(
                item.attempts, options.delivery_backoff_s, options.delivery_backoff_max_s, self.rng
            )
            at = self.clock() + timedelta(seconds=delay)
            if outcome.not_before is not None and outcome.not_before > at:
                at = outcome.not_before  # the peer said when (Retry-After)
            mark_retry(session, item, outcome.reason, at)


def _address_of(target: AnyDestination) -> str | None:
    """Where a destination is, for the audit message's NetworkAccessPointID."""
    if isinstance(target, DimseDestination):
        return f"{target.host}:{target.port}" if target.host else target.peer
    if isinstance(target, FhirDestination):
        return urlsplit(target.base_url).netloc or None
    if isinstance(target, DicomWebDestination):
        return urlsplit(target.url).netloc or None
    return None
