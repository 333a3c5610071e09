"""The README's online backup of a SQLite catalog: taken while the node writes, it is one
consistent snapshot that a restored node opens (see "Backup and restore")."""

from __future__ import annotations

import shutil
import sqlite3
import threading
import time
from collections.abc import Callable
from pathlib import Path

import pytest
from sqlalchemy import func, select

from pacs_node.catalog.db import open_catalog
from pacs_node.catalog.models import Counter, Study, StudyEvent, utcnow
from pacs_node.catalog.studies import add_event

WRITTEN = "backup_test_studies"


def _vacuum_into(source: Path, dest: Path) -> None:
    # what `sqlite3 catalog.sqlite "VACUUM INTO '<dest>'"` runs
    with sqlite3.connect(source) as connection:
        connection.execute("VACUUM INTO ?", (str(dest),))
    connection.close()


def _backup_api(source: Path, dest: Path) -> None:
    source_connection = sqlite3.connect(source)
    dest_connection = sqlite3.connect(dest)
    try:
        source_connection.backup(dest_connection)  # every page in one step: one snapshot
    finally:
        dest_connection.close()
        source_connection.close()


class Writer(threading.Thread):
    """Commits a study, its event and a counter of them together, as fast as it can."""

    def __init__(self, url: str) -> None:
        super().__init__(daemon=True)
        self.catalog = open_catalog(url)
        self.stop = threading.Event()
        self.committed = 0
        self.error: BaseException | None = None

    def run(self) -> None:
        try:
            while not self.stop.is_set():
                now = utcnow()
                with self.catalog.sessions.begin() as session:
                    study = Study(
                        study_uid=f"1.2.826.0.1.{self.committed + 1}",
                        first_received_at=now,
                        receiving_since=now,
                        last_received_at=now,
                    )
                    session.add(study)
                    session.flush()
                    add_event(session, study.id, "received", now, instances=1)
                    counter = session.get(Counter, WRITTEN)
                    if counter is None:
                        session.add(Counter(name=WRITTEN, value=1))
                    else:
                        counter.value += 1
                self.committed += 1
        except BaseException as exc:  # reported by the test
            self.error = exc
        finally:
            self.catalog.dispose()

    def wait_for(self, count: int, deadline_s: float = 60) -> None:
        deadline = time.monotonic() + deadline_s
        while self.committed < count:
            assert self.error is None, self.error
            assert time.monotonic() < deadline, f"only {self.committed} commits"
            time.sleep(0.01)


@pytest.mark.parametrize("backup", [_vacuum_into, _backup_api], ids=["vacuum-into", "api"])
def test_an_online_backup_restores_to_a_consistent_catalog(
    backup: Callable[[Path, Path], None], tmp_path: Path
) -> None:
    live = tmp_path / "var" / "catalog.sqlite"
    writer = Writer(f"sqlite:///{live}")
    writer.start()
    try:
        writer.wait_for(20)
        before = writer.committed
        saved = tmp_path / "backup" / "catalog.sqlite"
        saved.parent.mkdir()
        backup(live, saved)
        writer.wait_for(writer.committed + 10)  # it kept writing through the backup
        assert before < writer.committed
    finally:
        writer.stop.set()
        writer.join(timeout=30)
    assert writer.error is None, writer.error

    restored = tmp_path / "restored" / "catalog.sqlite"
    restored.parent.mkdir()
    shutil.copy2(saved, restored)  # the node is stopped: a plain copy, no -wal or -shm
    catalog = open_catalog(f"sqlite:///{restored}", run_migrations=False)  # schema checked
    try:
        with catalog.sessions() as session:
            studies = session.scalar(select(func.count(Study.id)))
            events = session.scalar(select(func.count(StudyEvent.id)))
            counted = session.get_one(Counter, WRITTEN).value
        assert studies is not None
        assert studies >= before
        assert studies == events == counted  # each commit whole or absent
        with catalog.engine.connect() as connection:
            check = connection.exec_driver_sql("PRAGMA integrity_check").scalar()
        assert check == "ok"
    finally:
        catalog.dispose()
