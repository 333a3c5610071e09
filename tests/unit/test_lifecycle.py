"""Stop signals as a pipe: what arrives is returned one signal per call, other signals are left
out, and nothing is returned when nothing came."""

from __future__ import annotations

import os
import signal
from collections.abc import Iterator

import pytest

from pacs_node.lifecycle import SignalPipe


@pytest.fixture
def restored_signals() -> Iterator[None]:
    """SignalPipe takes over process-wide settings; the test process gets its own back."""
    handlers = {signum: signal.getsignal(signum) for signum in (signal.SIGTERM, signal.SIGUSR1)}
    wakeup = signal.set_wakeup_fd(-1)
    signal.set_wakeup_fd(wakeup)
    yield
    signal.set_wakeup_fd(wakeup)
    for signum, handler in handlers.items():
        signal.signal(signum, handler)


@pytest.mark.usefixtures("restored_signals")
def test_signals_come_one_per_call_and_others_are_left_out() -> None:
    signal.signal(signal.SIGUSR1, lambda _signum, _frame: None)  # its byte reaches the pipe too
    pipe = SignalPipe((signal.SIGTERM,))
    assert pipe.next(0.01) is None
    for signum in (signal.SIGUSR1, signal.SIGTERM, signal.SIGTERM):
        os.kill(os.getpid(), signum)
    assert pipe.next(2.0) == signal.SIGTERM
    assert pipe.next(0) == signal.SIGTERM  # the second, read with the first, kept for this call
    assert pipe.next(0.01) is None
