"""The retention lock excludes threads of one process too (on NFS the file lock alone does
not: POSIX record locks belong to the process)."""

from __future__ import annotations

import fcntl
import threading
from pathlib import Path

import pytest

from pacs_node.ingest.spool import retention_lock


@pytest.fixture(params=["local", "nfs"])
def file_locks(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> None:
    """Local flock, or the Linux NFS client's emulation of it: POSIX record locks, which one
    process never conflicts with and which any close() of the file drops."""
    if request.param == "nfs":
        monkeypatch.setattr(fcntl, "flock", fcntl.lockf)


@pytest.mark.usefixtures("file_locks")
def test_a_purge_waits_for_a_receive_in_another_thread_of_the_same_process(
    tmp_path: Path,
) -> None:
    receiving, purged, done = threading.Event(), threading.Event(), threading.Event()

    def receive() -> None:
        with retention_lock(tmp_path, shared=True):
            receiving.set()
            done.wait(10)

    def purge() -> None:
        with retention_lock(tmp_path, shared=False):
            purged.set()

    receiver = threading.Thread(target=receive)
    receiver.start()
    assert receiving.wait(10)
    with retention_lock(tmp_path, shared=True):  # readers share it, and leaving keeps it held
        pass
    purger = threading.Thread(target=purge)
    purger.start()
    assert not purged.wait(0.3), "the exclusive lock was granted while a reader held it"
    done.set()
    receiver.join(10)
    purger.join(10)
    assert purged.is_set()
    with retention_lock(tmp_path, shared=False):  # and it is free again
        pass
