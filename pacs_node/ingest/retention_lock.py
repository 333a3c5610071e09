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


class _Registry:
    """This process's locks, one per lock file."""

    def __init__(self) -> None:
        self.reset()

    def reset(self) -> None:
        """A forked child has none of its parent's locks: a fresh registry (never one copied
        while another thread held it)."""
        self.guard = threading.Lock()
        self.locks: dict[Path, _ProcessLock] = {}

    def get(self, path: Path) -> _ProcessLock:
        key = path.resolve()
        with self.guard:
            found = self.locks.get(key)
            if found is None:
                found = self.locks[key] = _ProcessLock(path)
            return found


_registry = _Registry()
os.register_at_fork(after_in_child=_registry.reset)


@contextlib.contextmanager
def retention_lock(path: Path, *, shared: bool) -> Iterator[None]:
    """Hold the retention lock of the lock file ``path``, shared or exclusive."""
    lock = _registry.get(path)
    with lock.shared() if shared else lock.exclusive():
        yield
