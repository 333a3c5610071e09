"""Stop signals as a pipe: what arrives is returned one signal per call, other signals are left
out, and nothing is returned when nothing came."""

from __future__ import annotations

import os
import signal
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from types import SimpleNamespace

import pytest

from pacs_node.errors import StartError
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


class _Quiet:
    """A signal source on which no second signal ever comes."""

    def next(self, timeout: float | None = None) -> int | None:
        time.sleep(timeout or 0.0)
        return None


class _Ended(Exception):
    """Stands for the process's end: the watchdog's exits never return."""


def _watched_node(monkeypatch: pytest.MonkeyPatch, exit_code: int | None) -> list[object]:
    import pacs_node.node as node_module

    ends: list[object] = []

    def stop_now(_self: object, reason: str, signum: int, _started: float) -> None:
        ends.append(("stop_now", reason, signum))
        raise _Ended

    def exit_now(code: int) -> None:
        ends.append(("exit_now", code))
        raise _Ended

    monkeypatch.setattr(node_module.Node, "stop_now", stop_now)
    monkeypatch.setattr(node_module, "exit_now", exit_now)
    node = object.__new__(node_module.Node)
    node.settings = SimpleNamespace(node=SimpleNamespace(stop_timeout_s=0.3))  # type: ignore[assignment]
    node._ending = threading.Lock()
    node._exit_code = exit_code
    with pytest.raises(_Ended):
        node._escalate(_Quiet(), signal.SIGTERM, time.monotonic())  # type: ignore[arg-type]
    return ends


def test_a_stop_still_running_at_stop_timeout_s_is_forced(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    started = time.monotonic()
    ends = _watched_node(monkeypatch, exit_code=None)
    assert ends == [("stop_now", "stop_timeout_s passed", signal.SIGTERM)]
    assert 0.3 <= time.monotonic() - started < 2.0


def test_a_finished_stop_whose_exit_is_held_up_leaves_with_its_own_code(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    assert _watched_node(monkeypatch, exit_code=0) == [("exit_now", 0)]


class _Part:
    """A stage of the node that only records its start."""

    def __init__(self, name: str, log: list[str], fails: bool = False) -> None:
        self.name, self.log, self.fails = name, log, fails

    def start(self) -> None:
        if self.fails:
            raise StartError(f"{self.name} cannot start")
        self.log.append(f"{self.name} started")

    def catch_up(self) -> None:
        pass


class _Lease(_Part):
    """The timer lease of a node alone in its catalog."""

    node_id = "node-a"

    def register(self) -> None:
        """No other live node holds this one's node_id."""

    def nodes(self) -> list[object]:
        return []


def test_a_door_that_cannot_start_stops_what_had_started(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    import pacs_node.node as node_module

    log: list[str] = []
    monkeypatch.setattr(node_module, "finish_purges", lambda *args: None)
    monkeypatch.setattr(node_module, "reconcile", lambda *args, **kwargs: 0)
    monkeypatch.setattr(node_module.Node, "stop", lambda self: log.append("stopped") or False)
    node = object.__new__(node_module.Node)
    node.settings = SimpleNamespace(node=SimpleNamespace(data_dir=Path("var"), timer_lease_s=30))  # type: ignore[assignment]
    node.catalog = node.spool = SimpleNamespace(root=Path("var/spool"))  # type: ignore[assignment]
    parts = ("audit", "router", "recorder", "assembly", "jobs", "outbox", "housekeeping", "scp")
    for name in parts:
        setattr(node, name, _Part(name, log))
    node.lease = _Lease("lease", log)  # type: ignore[assignment]
    node.syslog = None
    node.doors = [_Part("web", log, fails=True)]
    with pytest.raises(StartError, match="web cannot start"):
        node.start()
    assert log[-2:] == ["scp started", "stopped"]
