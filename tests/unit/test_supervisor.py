"""The child-process supervisor with real spawned children: a crashed child is replaced (after
a pause when it keeps crashing), a stop asks over the pipe and kills the one that does not
listen by the deadline, and a child hears SIGTERM, ignores SIGINT and sees the node gone."""

from __future__ import annotations

import os
import signal
import time
from multiprocessing.connection import Connection
from pathlib import Path

from pacs_node.supervisor import Backoff, Child, ChildHook, NodeLink, Supervisor
from tests.conftest import wait_for

FAST = Backoff(steady_s=60.0, first_s=30.0, max_s=30.0)  # a second quick death waits 30 s


def _child(folder: str, mode: str, control: Connection) -> None:
    """``crash-once``: the first start exits 3; ``crash``: every start exits 3; ``stuck``:
    hears nothing (SIGTERM ignored, pipe unread); ``follow``: waits for the node's word and
    writes what it heard."""
    root = Path(folder)
    (root / f"started-{os.getpid()}").touch()
    if mode == "crash" or (mode == "crash-once" and not (root / "crashed").exists()):
        (root / "crashed").touch()
        os._exit(3)
    if mode == "stuck":
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        while True:
            time.sleep(1)
    link = NodeLink(control)
    (root / f"ready-{os.getpid()}").touch()
    link.stopping.wait()
    (root / ("gone" if link.gone.is_set() else "stopped")).write_text(str(os.getpid()))
    os._exit(0)


def _supervisor(
    folder: Path,
    mode: str,
    *,
    poll_s: float = 0.05,
    backoff: Backoff | None = None,
    died: ChildHook | None = None,
    replaced: ChildHook | None = None,
) -> Supervisor:
    return Supervisor(
        "test child",
        1,
        _child,
        lambda _slot: (str(folder), mode),
        process_name="pacs-node-test-{slot}",
        poll_s=poll_s,
        backoff=backoff,
        died=died,
        replaced=replaced,
    )


def _starts(folder: Path) -> int:
    return len(list(folder.glob("started-*")))


def _ready(folder: Path, pid: int | None) -> bool:
    return (folder / f"ready-{pid}").exists()


def test_a_crashed_child_is_replaced_and_stops_when_asked(tmp_path: Path) -> None:
    died: list[tuple[int, int | None]] = []
    replaced: list[float] = []

    def on_death(child: Child) -> None:
        died.append((child.slot, child.process.exitcode))

    children = _supervisor(
        tmp_path, "crash-once", died=on_death, replaced=lambda c: replaced.append(c.started_at)
    )
    children.start()
    try:
        wait_for(
            lambda: children.restarts == 1 and _ready(tmp_path, children.processes[0].pid),
            60,
            what="a new child",
        )
        assert died == [(0, 3)]
        assert len(replaced) == 1
        assert replaced[0] <= time.time()
        assert _starts(tmp_path) == 2
    finally:
        killed = children.stop(time.monotonic() + 30)
    assert killed == []  # it stopped on the node's message
    assert (tmp_path / "stopped").is_file()
    assert children.processes == []


def test_a_child_that_keeps_crashing_waits_before_it_starts_again(tmp_path: Path) -> None:
    children = _supervisor(tmp_path, "crash", backoff=FAST, poll_s=3600)  # rounds by hand
    children.start()
    try:
        wait_for(lambda: children.alive == 0, 60, what="the first crash")
        assert children.replace_dead() == 1  # at once
        wait_for(lambda: _starts(tmp_path) == 2, 60, what="the first restart")
        wait_for(lambda: children.alive == 0, 30, what="the second crash")
        assert children.replace_dead() == 0  # its pause has begun
        assert children.replace_dead() == 0
        assert (_starts(tmp_path), children.restarts) == (2, 1)
    finally:
        children.stop(time.monotonic() + 5)
    assert [FAST.delay(n) for n in (0, 1, 2, 3)] == [0.0, 0.0, 30.0, 30.0]
    assert [Backoff().delay(n) for n in (1, 2, 3, 4, 9)] == [0.0, 1.0, 2.0, 4.0, 30.0]


def test_a_stop_kills_a_child_that_does_not_listen_by_the_deadline(tmp_path: Path) -> None:
    children = _supervisor(tmp_path, "stuck")
    children.start()
    wait_for(lambda: _starts(tmp_path) == 1, 60, what="the child")
    (process,) = children.processes
    started = time.monotonic()
    killed = children.stop(started + 1.0)
    took = time.monotonic() - started
    assert killed == [process]
    assert process.exitcode == -signal.SIGKILL
    assert 1.0 <= took < 6.0
    assert children.restarts == 0  # a child killed by the stop is not replaced


def test_a_child_hears_sigterm_ignores_sigint_and_sees_the_node_gone(tmp_path: Path) -> None:
    children = _supervisor(tmp_path, "follow")
    children.start()
    try:
        wait_for(lambda: _starts(tmp_path) == 1, 60, what="the child")
        (process,) = children.processes
        assert process.pid is not None
        wait_for(lambda: _ready(tmp_path, process.pid), 30, what="the child listening")
        os.kill(process.pid, signal.SIGINT)
        os.kill(process.pid, signal.SIGTERM)
        wait_for((tmp_path / "stopped").is_file, 30, what="the SIGTERMed child")
        process.join(10)
        assert process.exitcode == 0  # SIGINT did not end it; SIGTERM let it finish
        wait_for(lambda: children.restarts == 1, 30, what="its replacement")
        (replacement,) = children._children
        wait_for(lambda: _ready(tmp_path, replacement.process.pid), 60, what="the replacement")
        replacement.link.close()  # as when the node dies: its end of the pipe closes
        wait_for((tmp_path / "gone").is_file, 30, what="the node seen gone")
        assert (tmp_path / "gone").read_text() == str(replacement.process.pid)
    finally:
        children.kill_now()
        children.stop(time.monotonic() + 5)
