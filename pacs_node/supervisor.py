"""One supervisor for the node's child processes (job workers, SCP workers): start them, watch
them, start a new one in the place of one that died, and stop them all by a deadline.

Each child has a pipe of its own from the node and nothing else shared with the node or with
its siblings, so a child that dies (killed for memory, a crash in a native library, a SIGTERM
to the process group) takes nothing with it that another process waits on. On that pipe a
message means "stop after the current piece of work"; the pipe at its end means the node is
gone. In the child, SIGTERM means the same as the message and SIGINT is ignored: a Ctrl-C in a
terminal reaches every process of the group, and the node decides what it means.

A dead child is replaced within ``poll_s``. One that keeps dying soon after it starts is
started again after a growing pause (:class:`Backoff`), so a child that cannot start does not
take a core spawning interpreters; one that ran for a while starts again at once.
"""

from __future__ import annotations

import contextlib
import logging
import multiprocessing
import signal
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from multiprocessing.connection import Connection, wait
from multiprocessing.process import BaseProcess

from pacs_node.lifecycle import SignalPipe, join_or_kill

log = logging.getLogger(__name__)

STOP = "stop"  # the node's message to a child: stop after the current piece of work


@dataclass(frozen=True)
class Backoff:
    """How long a dead child waits before it starts again: not at all after a life of at
    least ``steady_s``; after a quick death, not at all the first time, then ``first_s``,
    doubling up to ``max_s`` while it keeps dying quickly."""

    steady_s: float = 30.0
    first_s: float = 1.0
    max_s: float = 30.0

    def delay(self, quick_deaths: int) -> float:
        if quick_deaths <= 1:
            return 0.0
        return float(min(self.max_s, self.first_s * 2 ** (quick_deaths - 2)))


@dataclass
class Child:
    """One child process in its slot, with the node's end of its pipe."""

    slot: int
    process: BaseProcess
    link: Connection
    started_at: float  # time.time(), for what the child may have left behind
    started: float  # time.monotonic()
    quick_deaths: int = 0  # deaths in a row, each soon after a start
    seen_dead: bool = False
    due: float = 0.0  # time.monotonic() at which its replacement may start


ChildHook = Callable[[Child], object]


class Supervisor:
    """``count`` children, each running ``target(*args(slot), control)`` in a process of its
    own (``spawn``: no thread or connection of the node is inherited).

    ``started`` is called after each start (the node closes its copies of what the child now
    holds); ``died`` once per death, before the replacement starts (an exception leaves the
    slot empty and is tried again on the next round); ``replaced`` after the replacement
    started, with the dead child."""

    def __init__(
        self,
        what: str,
        count: int,
        target: Callable[..., object],
        args: Callable[[int], tuple[object, ...]] = lambda _slot: (),
        *,
        process_name: str,
        started: ChildHook | None = None,
        died: ChildHook | None = None,
        replaced: ChildHook | None = None,
        poll_s: float = 1.0,
        backoff: Backoff | None = None,
    ) -> None:
        self.what = what
        self.count = count
        self._target = target
        self._args = args
        self._process_name = process_name
        self._started = started
        self._died = died
        self._replaced = replaced
        self.poll_s = poll_s
        self.backoff = backoff or Backoff()
        self.restarts = 0
        self._context = multiprocessing.get_context("spawn")
        self._children: list[Child] = []
        self._lock = threading.Lock()
        self._stopping = threading.Event()
        self._watcher: threading.Thread | None = None

    @property
    def processes(self) -> list[BaseProcess]:
        return [child.process for child in self._children]

    @property
    def stopping(self) -> bool:
        return self._stopping.is_set()

    @property
    def alive(self) -> int:
        return sum(1 for child in self._children if child.process.is_alive())

    def start(self) -> None:
        """Start every child, then the thread that watches them. On Linux, a child's parent
        death signal is tied to the thread that started it: replacements come from the
        watching thread, which ends only when the children are being stopped anyway."""
        with self._lock:
            self._children = [self._spawn(slot) for slot in range(self.count)]
        self._watcher = threading.Thread(
            target=self._watch, name=f"{self._process_name}-supervisor", daemon=True
        )
        self._watcher.start()

    def _spawn(self, slot: int, quick_deaths: int = 0) -> Child:
        control, link = self._context.Pipe(duplex=False)
        try:
            process = self._context.Process(
                target=self._target,
                args=(*self._args(slot), control),
                name=self._process_name.format(slot=slot),
                daemon=True,
            )
            started_at = time.time()
            process.start()
        except BaseException:  # no fork (memory, process limit): no pipe left behind either
            link.close()
            control.close()
            raise
        control.close()  # the child has its own copy; the node keeps the only writing end
        child = Child(slot, process, link, started_at, time.monotonic(), quick_deaths)
        if self._started is not None:
            self._started(child)
        return child

    def _watch(self) -> None:
        while not self._stopping.wait(self.poll_s):
            try:
                self.replace_dead()
            except Exception:  # no memory to spawn, a hook failing: try on the next round
                log.exception("could not replace a dead child process", extra={"child": self.what})

    def replace_dead(self) -> int:
        """Start a new child in the place of each dead one whose pause is over; returns how
        many were started."""
        replaced: list[Child] = []
        try:
            with self._lock:
                if self._stopping.is_set():
                    return 0
                now = time.monotonic()
                for slot, child in enumerate(self._children):
                    if child.process.is_alive():
                        continue
                    if not child.seen_dead:
                        if self._died is not None:
                            self._died(child)
                        child.seen_dead = True
                        quick = now - child.started < self.backoff.steady_s
                        child.quick_deaths = child.quick_deaths + 1 if quick else 0
                        child.due = now + self.backoff.delay(child.quick_deaths)
                        if child.due > now:
                            log.warning(
                                "child process keeps dying; its restart waits",
                                extra={
                                    "child": self.what,
                                    "slot": slot,
                                    "wait_s": round(child.due - now, 1),
                                },
                            )
                    if now < child.due:
                        continue
                    child.link.close()
                    self._children[slot] = self._spawn(slot, child.quick_deaths)
                    self.restarts += 1
                    replaced.append(child)
        finally:  # a failed spawn must not cost the children already replaced their hook
            for dead in replaced:
                if self._replaced is not None:
                    self._replaced(dead)
        return len(replaced)

    def request_stop(self) -> None:
        """Ask every child to stop after its current work; from now on none is replaced."""
        self._stopping.set()
        with self._lock:
            for child in self._children:
                with contextlib.suppress(OSError):  # that child is gone already
                    child.link.send(STOP)

    def stop(self, deadline: float) -> list[BaseProcess]:
        """Wait for the children until ``deadline`` (``time.monotonic()``); SIGKILL those
        still there. Returns the killed ones (their work must be handed back)."""
        self.request_stop()
        if self._watcher is not None:  # one busy in a hook is not waited for past the deadline
            self._watcher.join(max(0.0, deadline - time.monotonic()))
            self._watcher = None
        with self._lock:
            killed = join_or_kill(self.processes, deadline)
            for child in self._children:
                child.link.close()
            self._children.clear()
        return killed

    def kill_now(self) -> None:
        """SIGKILL every child, waiting for nothing (not even the lock): the node is stopping
        at once, and what the children held is repaired when it starts again."""
        for process in list(self.processes):
            if process.exitcode is None:
                process.kill()


class NodeLink:
    """A child's side of its pipe from the node. ``stopping`` is set by the node's message or
    a SIGTERM; when the pipe ends (the node is gone, even SIGKILLed), ``gone`` is set and
    ``on_gone`` runs (by default: stop as asked). SIGINT is ignored from now on. Create it in
    the child's main thread (signal handlers)."""

    def __init__(self, control: Connection, on_gone: Callable[[], object] | None = None) -> None:
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        self._signals = SignalPipe((signal.SIGTERM,))
        self._control = control
        self._on_gone = on_gone
        self.stopping = threading.Event()
        self.gone = threading.Event()
        threading.Thread(target=self._follow, name="node-link", daemon=True).start()

    def _follow(self) -> None:
        waiting: Sequence[Connection | int] = [self._control, self._signals.fileno()]
        while True:
            for ready in wait(waiting):
                if ready is self._control:
                    try:
                        self._control.recv()
                    except (EOFError, OSError):
                        self.gone.set()
                        if self._on_gone is not None:
                            self._on_gone()
                        self.stopping.set()
                        return
                    self.stopping.set()
                elif self._signals.next(0) is not None:
                    self.stopping.set()
