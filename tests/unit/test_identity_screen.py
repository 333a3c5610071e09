"""The identity screen's read-only catalog handle: opened when first needed, reopened after a
failure, left alone for a while after one, and quick to give up."""

from __future__ import annotations

import time
from pathlib import Path

from sqlalchemy import text

from pacs_node.catalog.db import READ_ONLY_BUSY_MS, Catalog, open_catalog
from pacs_node.errors import CatalogError
from pacs_node.ingest.identity import IdentityGate, Verdict
from pacs_node.ingest.spool import Spool
from pacs_node.refs import CommitmentReport, InstanceHeader, InstanceRef

HEADER = InstanceHeader("1.2.3", "1.2.3.4", "1.2.3.4.5", "1.2.840.10008.5.1.4.1.1.2")


class _Sink:
    def submit(self, ref: InstanceRef) -> None: ...

    def count(self, name: str, by: int = 1) -> None: ...

    def duplicate(self, study_uid: str) -> None: ...

    def commitment_report(self, report: CommitmentReport) -> None: ...


def test_a_catalog_down_at_start_is_opened_once_it_is_back(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'catalog.db'}"
    open_catalog(url).dispose()  # migrated by the main process
    opened: list[Catalog] = []
    up = False

    def opener() -> Catalog:
        if not up:
            raise CatalogError("catalog down")
        opened.append(open_catalog(url, run_migrations=False, read_only=True))
        return opened[-1]

    gate = IdentityGate(Spool(tmp_path / "spool"), _Sink(), None, open_catalog=opener)
    assert gate.screen(HEADER).verdict == Verdict.NEW  # fails open
    up = True
    assert gate.screen(HEADER).verdict == Verdict.NEW
    assert not gate.being_removed("1.2.3")
    assert opened == []  # skipped while the breaker is open: no timeout paid per C-STORE
    gate._skip_until = 0.0  # SKIP_AFTER_FAILURE_S later
    assert gate.screen(HEADER).verdict == Verdict.NEW
    assert len(opened) == 1
    assert gate.catalog is opened[0]
    assert not gate.being_removed("1.2.3")
    assert len(opened) == 1
    opened[0].dispose()


def test_a_failing_look_up_opens_the_breaker(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'catalog.db'}"
    open_catalog(url).dispose()
    catalog = open_catalog(url, run_migrations=False, read_only=True)
    gate = IdentityGate(Spool(tmp_path / "spool"), _Sink(), catalog)
    (tmp_path / "catalog.db").unlink()
    catalog.engine.dispose()  # the next connection finds no schema: the look-up fails
    assert gate.screen(HEADER).verdict == Verdict.NEW
    assert gate._skip_until > time.monotonic()  # the next C-STOREs do not ask
    assert catalog.engine.pool.checkedout() == 0  # type: ignore[attr-defined]
    catalog.dispose()


def test_the_read_only_sqlite_handle_waits_briefly(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'catalog.db'}"
    open_catalog(url).dispose()
    catalog = open_catalog(url, run_migrations=False, read_only=True)
    with catalog.engine.connect() as connection:
        busy = connection.execute(text("PRAGMA busy_timeout")).scalar()
    assert busy == READ_ONLY_BUSY_MS
    catalog.dispose()


def test_the_read_only_postgresql_handle_has_timeouts(postgres_url: str) -> None:
    open_catalog(postgres_url).dispose()
    catalog = open_catalog(postgres_url, run_migrations=False, read_only=True)
    with catalog.engine.connect() as connection:
        shown = {
            name: connection.execute(text(f"SHOW {name}")).scalar()
            for name in ("statement_timeout", "default_transaction_read_only")
        }
    catalog.dispose()
    assert shown == {"statement_timeout": "2s", "default_transaction_read_only": "on"}
