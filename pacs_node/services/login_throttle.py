"""What the doors facing the network remember of sign-ins, in memory: two records that slow
password guessing beyond the per-account lock, and the passwords verified lately.

- Per source address (an IPv6 address by its /64, as the DICOM port counts), a token bucket of
  failed sign-ins: ``burst`` of them at once, then one more every ``refill``. An address with
  none left is refused before its password is even checked (the web answers 429 with
  ``Retry-After``), so one address can neither spray a common password over many names nor
  make the node hash passwords at its pace.
- Per name that is no account, the same failure count and lock the catalog keeps for an account
  (:class:`Strikes`), so "locked until ..." is answered alike whether the name exists or not.

In memory, per process, because losing them is cheap: a restart forgives an address its
failures, while the account locks (the defence of one account's password) stay in the catalog.
Both records are bounded; the entry touched longest ago is forgotten first.

:class:`VerifiedPasswords` spares HTTP Basic (sent again with every DICOMweb request) an
argon2 check per request: a name and password verified against a stored hash are remembered, as
a keyed hash under a random key of this process, for a few minutes and for that stored hash
only, so a changed password is checked afresh (and a lock or a disabled account still refuses).
"""

from __future__ import annotations

import hashlib
import hmac
import secrets
import threading
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime, timedelta

from pacs_node.ingest.limits import address_key

REFILL = timedelta(seconds=30)
CAPACITY = 10_000


@dataclass(slots=True)
class Strikes:
    """Failed sign-ins in a row and the lock they earned, as a ``users`` row keeps them."""

    failures: int = 0
    locked_until: datetime | None = None


@dataclass(slots=True)
class _Bucket:
    tokens: float
    at: datetime


class LoginThrottle:
    """Failed sign-ins per address and per unknown name; thread-safe (routes run in a pool)."""

    def __init__(self, burst: int, refill: timedelta = REFILL, capacity: int = CAPACITY) -> None:
        if burst < 1:
            raise ValueError("burst must be at least 1")
        self.burst = burst
        self.refill = refill
        self.capacity = capacity
        self._lock = threading.Lock()
        self._buckets: OrderedDict[str, _Bucket] = OrderedDict()
        self._strikes: OrderedDict[str, Strikes] = OrderedDict()

    def _bucket(self, address: str, now: datetime) -> _Bucket:
        address = address_key(address)
        bucket = self._buckets.get(address)
        if bucket is None:
            bucket = _Bucket(float(self.burst), now)
            self._buckets[address] = bucket
            if len(self._buckets) > self.capacity:
                self._buckets.popitem(last=False)
        else:
            earned = max((now - bucket.at) / self.refill, 0.0)
            bucket.tokens = min(float(self.burst), bucket.tokens + earned)
            bucket.at = now
            self._buckets.move_to_end(address)
        return bucket

    def wait(self, address: str, now: datetime) -> timedelta | None:
        """How long ``address`` must wait before its next sign-in is checked; None: no wait."""
        with self._lock:
            bucket = self._bucket(address, now)
            if bucket.tokens >= 1:
                return None
            return self.refill * (1 - bucket.tokens)

    def failed(self, address: str, now: datetime) -> None:
        """Count one failed sign-in from ``address``."""
        with self._lock:
            bucket = self._bucket(address, now)
            bucket.tokens = max(bucket.tokens - 1, 0.0)

    def strike(
        self, name: str, now: datetime, lock_after: Callable[[int, datetime], datetime | None]
    ) -> datetime | None:
        """One failed sign-in as ``name``, which is no account: counted as an account counts
        it (not while locked); until when the name is locked, None when it is not."""
        with self._lock:
            strikes = self._strikes.get(name)
            if strikes is None:
                strikes = self._strikes[name] = Strikes()
                if len(self._strikes) > self.capacity:
                    self._strikes.popitem(last=False)
            else:
                self._strikes.move_to_end(name)
            if strikes.locked_until is not None and strikes.locked_until > now:
                return strikes.locked_until
            strikes.failures += 1
            strikes.locked_until = lock_after(strikes.failures, now)
            return strikes.locked_until


class VerifiedPasswords:
    """Name and password pairs that matched a stored hash lately; thread-safe and bounded."""

    def __init__(self, ttl: timedelta = timedelta(minutes=5), capacity: int = 1024) -> None:
        self.ttl = ttl
        self.capacity = capacity
        self._key = secrets.token_bytes(32)
        self._lock = threading.Lock()
        self._seen: OrderedDict[bytes, tuple[str, datetime]] = OrderedDict()

    def _digest(self, name: str, password: str) -> bytes:
        message = name.encode("utf-8") + b"\0" + password.encode("utf-8")
        return hmac.new(self._key, message, hashlib.sha256).digest()

    def matches(self, name: str, password: str, stored: str, now: datetime) -> bool:
        """Whether this pair matched ``stored`` less than ``ttl`` ago."""
        with self._lock:
            found = self._seen.get(self._digest(name, password))
        if found is None:
            return False
        held, at = found
        return hmac.compare_digest(held, stored) and now - at < self.ttl

    def remember(self, name: str, password: str, stored: str, now: datetime) -> None:
        """Remember that this pair matched ``stored`` at ``now``."""
        digest = self._digest(name, password)
        with self._lock:
            self._seen[digest] = (stored, now)
            self._seen.move_to_end(digest)
            if len(self._seen) > self.capacity:
                self._seen.popitem(last=False)
