"""What every process of the node needs to stop well: stop signals it can wait on, and an exit
that a stuck thread or a slow teardown cannot hold up.

Signals. A Python signal handler runs in the main thread between two bytecodes, possibly while
that thread holds a lock: a handler that sets a ``threading.Event`` can deadlock on the event's
own lock, and one that does real work (joining processes, writing the catalog) leaves nothing to
act on a second signal. So no handler here does anything. The interpreter's C-level handler
writes each signal's number to the wakeup fd (:func:`signal.set_wakeup_fd`) the moment the
signal arrives, even while the main thread sits in a C call; whoever wants to know waits on
that pipe, in the main thread or in any other.
"""

from __future__ import annotations

import logging
import os
import select
import signal
import threading
import time
from collections.abc import Iterable, Sequence
from multiprocessing.process import BaseProcess
from types import FrameType
from typing import NoReturn

CLOSE_LOGS_S = 1.0
KILL_WAIT_S = 5.0  # how long a SIGKILLed process may take to be gone


def _recorded(_signum: int, _frame: FrameType | None) -> None:
    """The wakeup fd already holds the signal's number; there is nothing left to do."""


class SignalPipe:
    """``signals`` (SIGTERM, SIGINT) delivered as a pipe to wait on. Main thread only."""

    def __init__(self, signals: Iterable[int]) -> None:
        self.signals = frozenset(signals)
        self._reader, self._writer = os.pipe()
        os.set_blocking(self._reader, False)
        os.set_blocking(self._writer, False)
        self._pending: list[int] = []
        signal.set_wakeup_fd(self._writer, warn_on_full_buffer=False)
        for signum in self.signals:
            signal.signal(signum, _recorded)

    def fileno(self) -> int:
        """For ``select`` and :func:`multiprocessing.connection.wait`."""
        return self._reader

    def next(self, timeout: float | None = None) -> int | None:
        """The next of ``signals`` to arrive, waiting up to ``timeout`` seconds (None: for
        ever); None if none came. Signals that arrive together are returned one per call."""
        while not self._pending:
            ready, _, _ = select.select([self._reader], [], [], timeout)
            if not ready:
                return None
            try:
                data = os.read(self._reader, 512)
            except BlockingIOError:
                continue
            # Every signal with a Python handler is written here; only ours count.
            self._pending.extend(b for b in data if b in self.signals)
            if not self._pending and timeout is not None:
                return None
        return self._pending.pop(0)


def exit_now(code: int) -> NoReturn:
    """End this process at once with ``code``, after writing what the log handlers still hold
    (repeat summaries; a handler blocked on a full stderr pipe gets ``CLOSE_LOGS_S``). Skips
    the interpreter's teardown, a second or more with torch or pynetdicom loaded on a busy
    machine, and any thread that would hold it up: callers have written what they must."""
    closing = threading.Thread(target=logging.shutdown, name="close-logs", daemon=True)
    closing.start()
    closing.join(CLOSE_LOGS_S)
    os._exit(code)


def join_or_kill(processes: Sequence[BaseProcess], deadline: float) -> list[BaseProcess]:
    """Wait for ``processes`` until ``deadline`` (``time.monotonic()``), then SIGKILL those
    still alive and reap them; returns the killed ones (their work must be handed back)."""
    for process in processes:
        process.join(max(0.0, deadline - time.monotonic()))
    killed = [p for p in processes if p.is_alive()]
    for process in killed:
        process.kill()
    for process in killed:
        process.join(KILL_WAIT_S)
    return killed
