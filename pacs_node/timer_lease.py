"""The timer lease: which node of a group runs the assembly timers and housekeeping.

Every node receives, spools and records; only the lease's owner marks studies stable, routes
them and purges them. The owner renews the lease every third of ``timer_lease_s``; a node that
dies stops renewing, and another takes the lease once it expires. Each timer action checks the
lease in its own transaction (:func:`pacs_node.catalog.leases.hold`), so the hand-over never
lets two nodes act. A node that takes the lease over calls its listeners (arm the timers of
every study still receiving, route studies left stable but unrouted).

The lease also keeps this process's registration under its ``node_id`` alive
(:mod:`pacs_node.catalog.nodes`): :meth:`TimerLease.register` at start refuses a ``node_id``
another live process holds, a heartbeat thread of its own refreshes it (never held up by the
lease's listeners, a catch-up of many studies), a graceful stop removes it. A heartbeat that
finds the row taken over by another process calls ``on_fenced``: the node must stop.
"""

from __future__ import annotations

import logging
import os
import secrets
import socket
import threading
from collections.abc import Callable

from sqlalchemy.orm import Session

from pacs_node import process_identity
from pacs_node.catalog import leases, nodes
from pacs_node.catalog.db import Catalog

log = logging.getLogger(__name__)


class TimerLease:
    def __init__(
        self,
        catalog: Catalog,
        node_id: str,
        ttl_s: float,
        name: str = leases.TIMERS,
        *,
        gone: Callable[[str, str], bool] | None = None,
        on_fenced: Callable[[], object] | None = None,
    ) -> None:
        """``gone(owner, mine)``: whether the process that took the lease as ``owner`` (this
        node's earlier life) is no longer running; its lease is then taken back at start
        rather than after it expires. ``on_fenced``: called once (on the heartbeat thread)
        when another process took this one's registration over; the node must stop."""
        self.catalog = catalog
        self.name = name
        self.ttl_s = ttl_s
        self.node_id = node_id
        self.owner = f"{node_id}/{os.getpid()}/{secrets.token_hex(4)}"
        self.gone = gone
        self._owned = False
        self._listeners: list[Callable[[], object]] = []
        self._stopping = threading.Event()
        self._thread: threading.Thread | None = None
        self._heart: threading.Thread | None = None
        self.on_fenced = on_fenced
        self.fenced = threading.Event()  # another process runs as node_id now
        self.host = socket.gethostname()[:255]
        self.identity = process_identity.current()
        self._registered = False

    def add_listener(self, listener: Callable[[], object]) -> None:
        """Called (in the lease's thread) each time this node takes the lease."""
        self._listeners.append(listener)

    def owned(self) -> bool:
        """Whether the last renewal kept the lease: a cheap hint; :meth:`held` decides."""
        return self._owned

    def held(self, session: Session) -> bool:
        """Whether this node holds the lease, checked in (and locked to) ``session``'s
        transaction: call it first in the transaction of each timer action."""
        return leases.hold(session, self.name, self.owner, self.ttl_s)

    def register(self) -> nodes.RegisteredNode | None:
        """Register this process as its ``node_id``: None when done, else the live
        registration of another process under the same ``node_id`` (the node must not start).
        A stale registration, or a live one of this node's own earlier process that is gone
        (same boot and pid namespace, its pid free or reused: see
        :mod:`pacs_node.process_identity`), is taken over; any other waits out the lease."""

        def earlier_life(row: nodes.RegisteredNode) -> bool:
            return process_identity.earlier_life(row.identity, self.identity)

        with self.catalog.sessions.begin() as session:
            held = nodes.register(
                session,
                self.node_id,
                self.owner,
                self.host,
                self.identity,
                self.ttl_s,
                gone=earlier_life,
            )
        self._registered = held is None
        if self._registered and self._heart is None:
            self._heart = threading.Thread(target=self._beating, name="node-heartbeat", daemon=True)
            self._heart.start()
        return held

    def registered(self) -> bool:
        """Whether this process holds its registration (readiness: False once fenced)."""
        return self._registered and not self.fenced.is_set()

    def nodes(self) -> list[nodes.RegisteredNode]:
        """Every node registered on the catalog, live or stale."""
        with self.catalog.sessions() as session:
            return nodes.registered_nodes(session, self.ttl_s)

    def _beating(self) -> None:
        while not self._stopping.wait(self.ttl_s / 3) and self._beat():
            pass

    def _beat(self) -> bool:
        """Write the heartbeat; False once this process's registration is another's."""
        if not self._registered:
            return False
        try:
            with self.catalog.sessions.begin() as session:
                beat = nodes.beat(session, self.node_id, self.owner, self.host, self.identity)
        except Exception:
            log.warning("node heartbeat not written: the catalog is unreachable", exc_info=True)
            return True
        if beat is nodes.Beat.RESTORED:
            log.warning("node registration was missing; written again", extra=self._said())
        if beat is not nodes.Beat.TAKEN:
            return True
        self._registered = False  # the row is the other process's now: never remove it
        self._owned = False
        self.fenced.set()
        log.error(
            "another process took this node's registration over (its heartbeat was stale);"
            " stopping: two processes must never run as one node_id",
            extra=self._said(),
        )
        if self.on_fenced is not None:
            try:
                self.on_fenced()
            except Exception:
                log.exception("stop after losing the registration failed")
        return False

    def _said(self) -> dict[str, object]:
        return {"node_id": self.node_id, "owner": self.owner}

    def renew(self) -> bool:
        """Take or renew the lease; on taking it, call the listeners."""
        if self.fenced.is_set():
            self._owned = False
            return False
        try:
            with self.catalog.sessions.begin() as session:
                won = leases.acquire(session, self.name, self.owner, self.ttl_s)
        except Exception:
            log.warning("timer lease not renewed: the catalog is unreachable", exc_info=True)
            won = False
        taken, self._owned = won and not self._owned, won
        if taken:
            log.info("timer lease taken", extra={"owner": self.owner})
            for listener in self._listeners:
                try:
                    listener()
                except Exception:
                    log.exception("timer lease listener failed")
        return won

    def start(self) -> None:
        self._take_back_own()
        self.renew()
        self._thread = threading.Thread(target=self._loop, name="timer-lease", daemon=True)
        self._thread.start()

    def _take_back_own(self) -> None:
        """A restarted node need not wait for the lease its dead earlier process still holds."""
        if self.gone is None:
            return
        try:
            with self.catalog.sessions.begin() as session:
                found = leases.holder(session, self.name)
                if found is None or not found[0].startswith(f"{self.node_id}/"):
                    return
                if self.gone(found[0], self.owner):
                    leases.release(session, self.name, found[0])
                    log.info("timer lease of an earlier process taken back")
        except Exception:
            log.warning("timer lease of an earlier process not checked", exc_info=True)

    def _loop(self) -> None:
        while not self._stopping.wait(self.ttl_s / 3):
            was = self._owned
            if not self.renew() and was:
                log.warning("timer lease lost", extra={"owner": self.owner})

    def stop(self) -> None:
        """Stop renewing and give the lease up, so another node takes it without waiting."""
        self._stopping.set()
        for thread in (self._thread, self._heart):
            if thread is not None and thread is not threading.current_thread():
                thread.join(timeout=self.ttl_s)
        if self._owned:
            self._owned = False
            try:
                with self.catalog.sessions.begin() as session:
                    leases.release(session, self.name, self.owner)
            except Exception:
                log.warning("timer lease not released; it expires by itself", exc_info=True)
        if self._registered:
            self._registered = False
            try:
                with self.catalog.sessions.begin() as session:
                    nodes.leave(session, self.node_id, self.owner)
            except Exception:
                log.warning("node registration not removed; it goes stale by itself", exc_info=True)
