"""The retention lock: shared while an acknowledgement relies on a spool file, exclusive while
retention removes a study's rows or files.

Between processes it is a lock on the spool's lock file. On NFS the Linux client emulates
``flock`` with POSIX record locks, which belong to the process, not to the open file: a second
open in the same process would be granted an exclusive lock while another thread holds the
shared one, and closing any descriptor drops them all. So each process opens the file once and
holds the file lock on behalf of all its threads, and its threads exclude each other with a
readers-writer lock of their own.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import threading
from collections.abc import Iterator
from pathlib import Path


class _ProcessLock:
    """One process's holding of one lock file: threads share or exclude, the file lock follows."""

    def __init__(self, path: Path) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        self._fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)
        self._cond = threading.Condition()
        self._readers = 0
        self._writer = False

    @contextlib.contextmanager
    def shared(self) -> Iterator[None]:
        with self._cond:
            self._cond.wait_for(lambda: not self._writer)
            if self._readers == 0:  # the first reader takes the file lock for all of them
                fcntl.flock(self._fd, fcntl.LOCK_SH)
            self._readers += 1
        try:
            yield
        finally:
            with self._cond:
                self._readers -= 1
                if self._readers == 0:
                    fcntl.flock(self._fd, fcntl.LOCK_UN)
                    self._cond.notify_all()

    @contextlib.contextmanager
    def exclusive(self) -> Iterator[None]:
        with self._cond:
            self._cond.wait_for(lambda: not self._writer and self._readers == 0)
            self._writer = True
        try:
            fcntl.flock(self._fd, fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(self._fd, fcntl.LOCK_UN)
        finally:
            with self._cond:
                self._writer = False
                self._cond.notify_all()


_locks: dict[tuple[int, Path], _ProcessLock] = {}
_registry = threading.Lock()


def _process_lock(path: Path) -> _ProcessLock:
    key = (os.getpid(), path.resolve())  # a forked child opens its own (locks are per process)
    with _registry:
        found = _locks.get(key)
        if found is None:
            found = _locks[key] = _ProcessLock(path)
        return found


@contextlib.contextmanager
def retention_lock(path: Path, *, shared: bool) -> Iterator[None]:
    """Hold the retention lock of the lock file ``path``, shared or exclusive."""
    lock = _process_lock(path)
    with lock.shared() if shared else lock.exclusive():
        yield
