"""Connection and association limits shared by every Storage SCP process of one node.

The main process creates one :class:`SharedLimits` (a small table in shared memory) and hands it
to each spawned worker with that worker's row number. Every count is kept per worker row, so a
worker that dies leaves nothing held: the main process clears its row before it starts the
replacement (:meth:`SharedLimits.clear_row`).

No lock is shared between processes (a worker killed while holding one would stop every other
worker): a process writes only its own row, under a lock of its own, and takes a count by adding
it first and then reading the sums; over a cap, it takes it back and refuses. Two processes racing
for the last place may then both refuse, never both succeed: a limit can only be stricter.

What is counted:

- established associations, node-wide: in total and per peer (calling AE title + address);
- connections that have not yet sent their A-ASSOCIATE-RQ ("pending"): in total and per source
  address (an IPv6 address counts by its /64, which one host can otherwise fill at will), in a
  table of each process's own, so that the process at a limit can always make room by closing
  one of its own (ingest/transport.py).

Per-key counts live in ``SLOTS`` buckets chosen by a keyed hash (a random key per node start),
so two keys share a bucket with probability 1/``SLOTS``: a shared bucket can only make a limit
stricter for the two keys, never looser, and a sender cannot choose its collisions.
"""

from __future__ import annotations

import hashlib
import ipaddress
import os
import threading
from collections.abc import Callable
from dataclasses import dataclass
from multiprocessing.context import BaseContext
from typing import Any

SLOTS = 4096
# Row layout: [pending total, established total, pending by address x SLOTS, established by
# peer x SLOTS]
_PENDING_TOTAL, _ESTABLISHED_TOTAL, _PENDING_BASE = 0, 1, 2
_PEER_BASE = _PENDING_BASE + SLOTS
ROW = _PEER_BASE + SLOTS


@dataclass(frozen=True, slots=True)
class Caps:
    """The limits in force (from NodeOptions)."""

    pending_total: int
    pending_per_address: int
    established_total: int
    established_per_peer: int


def address_key(address: str) -> str:
    """What a per-address limit counts by: the IPv4 address, or an IPv6 address's /64."""
    try:
        ip = ipaddress.ip_address(address.split("%", 1)[0])
    except ValueError:
        return address
    if isinstance(ip, ipaddress.IPv6Address):
        if ip.ipv4_mapped is not None:
            return str(ip.ipv4_mapped)
        return str(ipaddress.IPv6Network((ip, 64), strict=False))
    return str(ip)


class Lease:
    """One held count; :meth:`release` gives it back exactly once, whoever calls it first."""

    def __init__(self, release: Callable[[], None]) -> None:
        self._release: Callable[[], None] | None = release
        self._lock = threading.Lock()

    def release(self) -> None:
        with self._lock:
            release, self._release = self._release, None
        if release is not None:
            release()


class SharedLimits:
    """Counters in one shared array; rows per worker, buckets per key."""

    def __init__(
        self,
        caps: Caps,
        counts: Any,
        salt: bytes,
        rows: int,
        row: int = 0,
        row_locks: dict[int, threading.Lock] | None = None,
    ) -> None:
        self.caps = caps
        self._counts = counts
        self._salt = salt
        self._rows = rows
        self.row = row
        # This process's writes to a row, one lock per row shared by every handle of the table
        # in this process (for_row): two handles of one row must never add at the same time,
        # or an increment or decrement is lost and a count leaks.
        self._row_locks = {} if row_locks is None else row_locks
        self._lock = self._row_locks.setdefault(row, threading.Lock())

    def __getstate__(self) -> dict[str, Any]:
        state = dict(self.__dict__)
        del state["_lock"]  # a process gets locks of its own, never shared ones
        del state["_row_locks"]
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)
        self._row_locks = {}
        self._lock = self._row_locks.setdefault(self.row, threading.Lock())

    @classmethod
    def create(cls, caps: Caps, rows: int, context: BaseContext | None = None) -> SharedLimits:
        """A table for ``rows`` processes; with ``context`` it can be handed to spawned ones."""
        if context is None:
            return cls(caps, [0] * (ROW * rows), os.urandom(16), rows)
        return cls(caps, context.RawArray("i", ROW * rows), os.urandom(16), rows)

    def for_row(self, row: int) -> SharedLimits:
        """The same table, counting as worker ``row`` (given to that worker)."""
        return SharedLimits(self.caps, self._counts, self._salt, self._rows, row, self._row_locks)

    def _bucket(self, key: str) -> int:
        digest = hashlib.blake2b(key.encode("utf-8", "replace"), key=self._salt, digest_size=8)
        return int.from_bytes(digest.digest(), "little") % SLOTS

    def _sum(self, column: int) -> int:
        return sum(self._counts[r * ROW + column] for r in range(self._rows))

    def _add(self, columns: tuple[tuple[int, int], ...], by: int) -> None:
        base = self.row * ROW
        with self._lock:
            for column, _cap in columns:
                self._counts[base + column] = max(0, self._counts[base + column] + by)

    def _take(self, columns: tuple[tuple[int, int], ...]) -> tuple[Lease | None, int]:
        """Increment every column if each stays within its cap; else change nothing. On
        refusal, also the index in ``columns`` of the first column over its cap."""
        self._add(columns, 1)  # its lock's release orders the increments before the reads
        over = next((i for i, (column, cap) in enumerate(columns) if self._sum(column) > cap), -1)
        if over >= 0:
            self._add(columns, -1)
            return None, over
        return Lease(lambda: self._add(columns, -1)), -1

    def take_pending(self, address: str) -> Lease | None:
        """A connection that has not yet sent its A-ASSOCIATE-RQ; None: a limit is reached."""
        column = _PENDING_BASE + self._bucket(address_key(address))
        lease, _over = self._take(
            (
                (_PENDING_TOTAL, self.caps.pending_total),
                (column, self.caps.pending_per_address),
            )
        )
        return lease

    def pending_limit(self, address: str) -> str | None:
        """Which pending limit ``address`` is at now (``"address"`` or ``"total"``), if any."""
        column = _PENDING_BASE + self._bucket(address_key(address))
        if self._sum(column) >= self.caps.pending_per_address:
            return "address"
        if self._sum(_PENDING_TOTAL) >= self.caps.pending_total:
            return "total"
        return None

    def take_association(self, calling_ae: str, address: str) -> tuple[Lease | None, str]:
        """An established association; on refusal, which limit (``"total"`` or ``"peer"``)."""
        peer = _PEER_BASE + self._bucket(f"{calling_ae.strip()}\\{address_key(address)}")
        lease, over = self._take(
            (
                (_ESTABLISHED_TOTAL, self.caps.established_total),
                (peer, self.caps.established_per_peer),
            )
        )
        return lease, ("total" if over == 0 else "peer") if lease is None else ""

    def established(self) -> int:
        return self._sum(_ESTABLISHED_TOTAL)

    def pending(self) -> int:
        return self._sum(_PENDING_TOTAL)

    def clear_row(self, row: int) -> None:
        """Forget what worker ``row`` held (it died; the kernel closed its connections). Only
        the main process calls it, before the row's next worker starts: nobody else writes it."""
        for index in range(row * ROW, (row + 1) * ROW):
            self._counts[index] = 0
