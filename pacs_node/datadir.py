"""The data folder holds patient data (the spool, the catalog with names and IDs, results):
only the node's own user may read it.

:func:`make_private` runs before anything is written: it sets the process umask to 077, so
every file the node (and its worker processes, which inherit the umask) creates is 0600 and
every folder 0700, makes the data folder itself 0700 (which also closes everything below it
to other users, whatever an older version left there), and tightens an existing SQLite catalog
and its ``-wal``/``-shm`` files to 0600. It also creates ``spool/`` and ``results/`` and
fsyncs their entries, so the folders that hold acknowledged bytes survive a power loss.
"""

from __future__ import annotations

import contextlib
import os
from pathlib import Path

PRIVATE_UMASK = 0o077
DIR_MODE = 0o700
FILE_MODE = 0o600
SQLITE_SUFFIXES = ("", "-wal", "-shm", "-journal")


def fsync_dir(path: Path) -> None:
    """Make ``path``'s entries (files renamed or folders created in it) durable."""
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def private_sqlite(database: Path) -> None:
    """Create the catalog file 0600 before SQLite does (its ``-wal`` and ``-shm`` take the
    database file's mode), and tighten one an older version created 0644."""
    if not database.exists():
        with contextlib.suppress(FileExistsError):
            os.close(os.open(database, os.O_CREAT | os.O_WRONLY | os.O_EXCL, FILE_MODE))
    for suffix in SQLITE_SUFFIXES:
        path = database.with_name(database.name + suffix)
        try:
            stat = path.stat()
        except FileNotFoundError:
            continue
        if stat.st_mode & 0o077 and stat.st_uid == os.geteuid():  # another user's: not ours
            path.chmod(FILE_MODE)


def make_private(data_dir: Path, sqlite_database: Path | None = None) -> None:
    """umask 077 for this process, the data folder 0700 with ``spool/`` and ``results/``
    in it, and the SQLite catalog (if that is the catalog) 0600."""
    os.umask(PRIVATE_UMASK)
    data_dir.mkdir(parents=True, exist_ok=True, mode=DIR_MODE)
    if data_dir.stat().st_mode & 0o777 != DIR_MODE:
        data_dir.chmod(DIR_MODE)
    for name in ("spool", "results"):
        (data_dir / name).mkdir(exist_ok=True, mode=DIR_MODE)
    fsync_dir(data_dir)
    with contextlib.suppress(PermissionError):  # a parent we may cross but not read
        fsync_dir(data_dir.resolve().parent)
    if sqlite_database is not None:
        sqlite_database.parent.mkdir(parents=True, exist_ok=True, mode=DIR_MODE)
        private_sqlite(sqlite_database)
