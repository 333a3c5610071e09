"""Durability and privacy of what the node writes: SQLite at synchronous=FULL, the catalog
file 0600 whatever the umask, new result folders fsync'd up to the data folder."""

from __future__ import annotations

import os
import stat
from collections.abc import Iterator
from pathlib import Path

import pytest
from sqlalchemy import text

from pacs_node.catalog.db import open_catalog
from pacs_node.catalog.results import StoredEncoding, write_files
from pacs_node.datadir import make_private


@pytest.fixture
def loose_umask() -> Iterator[None]:
    old = os.umask(0o022)
    yield
    os.umask(old)


def _mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def test_the_catalog_is_full_sync_and_private(tmp_path: Path, loose_umask: None) -> None:
    database = tmp_path / "var" / "catalog.sqlite"
    catalog = open_catalog(f"sqlite:///{database}")
    try:
        with catalog.engine.begin() as connection:
            assert connection.execute(text("PRAGMA synchronous")).scalar() == 2  # FULL
            assert connection.execute(text("PRAGMA journal_mode")).scalar() == "wal"
            connection.execute(text("INSERT INTO counters (name, value) VALUES ('x', 1)"))
        for suffix in ("", "-wal", "-shm"):
            assert _mode(database.with_name(database.name + suffix)) == 0o600, suffix
    finally:
        catalog.dispose()


def test_an_old_world_readable_data_folder_is_closed(tmp_path: Path, loose_umask: None) -> None:
    data = tmp_path / "var"
    data.mkdir(mode=0o755)
    database = data / "catalog.sqlite"
    database.write_bytes(b"")
    database.chmod(0o644)
    make_private(data, database)
    assert _mode(data) == 0o700
    assert _mode(database) == 0o600
    assert _mode(data / "spool") == 0o700
    assert _mode(data / "results") == 0o700
    assert os.umask(0o077) == 0o077  # make_private set it for the whole process


def test_new_result_folders_are_fsynced_up_to_the_data_folder(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    synced: list[Path] = []
    real_fsync = os.fsync

    def recording_fsync(fd: int) -> None:
        synced.append(Path(os.readlink(f"/proc/self/fd/{fd}")))
        real_fsync(fd)

    monkeypatch.setattr(os, "fsync", recording_fsync)
    results = tmp_path / "var" / "results"
    item = StoredEncoding("pdf", None, None, None, "application/pdf", b"%PDF-1.4")
    (relpath,) = write_files(results, "7/1", [item])
    assert (results / relpath).read_bytes() == b"%PDF-1.4"
    for directory in (results / "7" / "1", results / "7", results, tmp_path / "var"):
        assert directory in synced, directory
    file_synced = [i for i, p in enumerate(synced) if p.parent == results / "7" / "1"]
    assert file_synced  # the file itself (under its temporary name, before the rename)
    assert file_synced[0] < synced.index(results / "7") < synced.index(tmp_path / "var")
