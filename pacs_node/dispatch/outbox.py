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

Each destination has at most ``concurrency`` batches in flight (associations, requests). A
loop thread looks for due rows every ``POLL_S`` or when woken; batches run on a thread pool.
Handlers are found by destination ``type`` in a registry, so tests put a fake at that seam.
"""

from __future__ import annotations

import logging
import random
import threading
from collections.abc import Callable, Mapping
from concurrent.futures import ThreadPoolExecutor
from datetime import datetime, timedelta
from pathlib import Path

from sqlalchemy.orm import Session

from pacs_node.catalog.db import Catalog
from pacs_node.catalog.deliveries import (
    HELD_FOR_DESTINATION,
    HELD_FOR_PATIENT,
    Outgoing,
    claim_due,
    due_destinations,
    mark_dead,
    mark_delivered,
    mark_held,
    mark_retry,
    release_destination_holds,
    reset_sending,
)
from pacs_node.catalog.models import utcnow
from pacs_node.config import Settings
from pacs_node.dispatch.destinations import AnyDestination, Unresolved, resolve
from pacs_node.dispatch.handler import (
    Delivered,
    Handler,
    Held,
    Outcome,
    Parcel,
    Permanent,
    Transient,
    default_handlers,
)
from pacs_node.errors import DeliveryError, PermanentDelivery

log = logging.getLogger(__name__)

POLL_S = 0.5
MAX_THREADS = 16


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
        self._lock = threading.Lock()
        self._wake = threading.Event()
        self._stopping = threading.Event()
        self._thread: threading.Thread | None = None
        self._pool = ThreadPoolExecutor(MAX_THREADS, thread_name_prefix="outbox")

    def resolve(self, name: str) -> AnyDestination | Unresolved:
        return resolve(name, self.settings.destinations, self.settings.peers)

    def recover(self) -> None:
        """Rows cut off mid-send go out again; holds for want of a destination are re-checked."""
        with self.catalog.sessions.begin() as session:
            resent = reset_sending(session)
            released = release_destination_holds(
                session, lambda name: not isinstance(self.resolve(name), Unresolved)
            )
        if resent or released:
            log.info("outbox recovered", extra={"resent": resent, "released": released})

    def start(self) -> None:
        self.recover()
        self._thread = threading.Thread(target=self._loop, name="outbox", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stopping.set()
        self._wake.set()
        if self._thread is not None:
            self._thread.join(30)
        self._pool.shutdown(wait=True, cancel_futures=True)

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
                    items = claim_due(session, name, batch, now)
                if not items:
                    self._release(name)
                    break
                started += 1
                if wait:
                    self._run(name, target, items)
                else:
                    self._pool.submit(self._run, name, target, items)
        return started

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
            with self.catalog.sessions.begin() as session:
                for item, outcome in zip(items, outcomes, strict=True):
                    self._settle(session, item, outcome, target)
            delivered = sum(isinstance(o, Delivered) for o in outcomes)
            log.info(
                "delivery batch",
                extra={"destination": name, "items": len(items), "delivered": delivered},
            )
        except Exception:
            # rows stay 'sending'; the next start sends them again (receivers de-duplicate)
            log.exception("delivery batch could not be settled", extra={"destination": name})
        finally:
            self._release(name)
            self._wake.set()

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
            mark_retry(session, item, outcome.reason, self.clock() + timedelta(seconds=delay))
