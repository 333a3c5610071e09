"""Opening the catalog: engine, SQLite pragmas, alembic migrations, session factory."""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from alembic import command
from alembic.config import Config
from alembic.migration import MigrationContext
from alembic.script import ScriptDirectory
from sqlalchemy import Engine, create_engine, event
from sqlalchemy.engine import make_url
from sqlalchemy.exc import SQLAlchemyError
from sqlalchemy.orm import Session, sessionmaker

from pacs_node.datadir import DIR_MODE, private_sqlite
from pacs_node.errors import CatalogError

log = logging.getLogger(__name__)

MIGRATIONS_DIR = Path(__file__).parent / "migrations"


@dataclass(frozen=True)
class Catalog:
    """The engine and its session factory; passed to whoever needs the catalog."""

    engine: Engine
    sessions: sessionmaker[Session]

    @property
    def url(self) -> str:
        return self.engine.url.render_as_string(hide_password=True)

    def dispose(self) -> None:
        self.engine.dispose()


def _sqlite_pragmas(dbapi_connection: Any, _record: Any) -> None:
    cursor = dbapi_connection.cursor()
    # WAL lets the CLI read while the node writes. FULL fsyncs the WAL at every commit: with
    # NORMAL a power loss may drop the last commits, and housekeeping removes a study's files
    # only after the commit that says so (a lost commit would list files that are gone).
    cursor.execute("PRAGMA journal_mode=WAL")
    cursor.execute("PRAGMA synchronous=FULL")
    cursor.execute("PRAGMA busy_timeout=30000")
    cursor.execute("PRAGMA foreign_keys=ON")
    cursor.close()


# The read-only handle screens each C-STORE before it is answered: it must fail fast (the
# screen then fails open and the recorder checks) rather than hold the answer, or the retention
# lock taken around it, for the catalog's timeouts (minutes for a blackholed PostgreSQL).
READ_ONLY_TIMEOUT_S = 2
READ_ONLY_BUSY_MS = 500


# A PostgreSQL peer gone silent (a partition, a frozen host) ends its connection within about
# a minute rather than the kernel's two hours: both sides notice and the server frees its locks.
KEEPALIVES: dict[str, Any] = {
    "keepalives": 1,
    "keepalives_idle": 15,
    "keepalives_interval": 5,
    "keepalives_count": 3,
    "tcp_user_timeout": 30_000,
}


def _sqlite_query_only(dbapi_connection: Any, _record: Any) -> None:
    cursor = dbapi_connection.cursor()
    cursor.execute("PRAGMA query_only=ON")
    cursor.execute(f"PRAGMA busy_timeout={READ_ONLY_BUSY_MS}")
    cursor.close()


def _busy_timeout(ms: int) -> Any:
    def listener(dbapi_connection: Any, _record: Any) -> None:
        cursor = dbapi_connection.cursor()
        cursor.execute(f"PRAGMA busy_timeout={ms}")
        cursor.close()

    return listener


def create_catalog_engine(
    url: str,
    *,
    read_only: bool = False,
    statement_timeout_s: float | None = None,
    pool_size: int | None = None,
) -> Engine:
    """``statement_timeout_s`` (writable handles only): a statement, or a wait for SQLite's
    write lock, that takes longer fails (a handle that answers a peer must answer within the
    peer's DIMSE timeout); ``pool_size``: connections kept (the overflow is 1 more)."""
    parsed = make_url(url)
    pool: dict[str, Any] = {} if pool_size is None else {"pool_size": pool_size, "max_overflow": 1}
    if parsed.get_backend_name() == "sqlite":
        if parsed.database and parsed.database != ":memory:":
            Path(parsed.database).parent.mkdir(parents=True, exist_ok=True, mode=DIR_MODE)
            private_sqlite(Path(parsed.database))  # it holds patient names: 0600
        timeout = READ_ONLY_BUSY_MS / 1000 if read_only else statement_timeout_s or 30
        engine = create_engine(
            url, connect_args={"check_same_thread": False, "timeout": timeout}, **pool
        )
        event.listen(engine, "connect", _sqlite_pragmas)
        if read_only:
            event.listen(engine, "connect", _sqlite_query_only)
        elif statement_timeout_s is not None:
            event.listen(engine, "connect", _busy_timeout(int(statement_timeout_s * 1000)))
        return engine
    if parsed.get_backend_name() == "postgresql" and parsed.drivername == "postgresql":
        parsed = parsed.set(drivername="postgresql+psycopg")
    if read_only:
        statement_ms = READ_ONLY_TIMEOUT_S * 1000
        return create_engine(
            parsed,
            pool_pre_ping=True,
            pool_timeout=READ_ONLY_TIMEOUT_S,
            connect_args={
                **KEEPALIVES,
                "connect_timeout": READ_ONLY_TIMEOUT_S,
                # unacknowledged bytes (a peer gone silent) end the connection in this time
                "tcp_user_timeout": statement_ms,
                "options": (
                    f"-c default_transaction_read_only=on -c statement_timeout={statement_ms}"
                ),
            },
        )
    connect_args = dict(KEEPALIVES)
    if statement_timeout_s is not None:
        statement_ms = int(statement_timeout_s * 1000)
        connect_args["connect_timeout"] = max(1, int(statement_timeout_s))
        connect_args["options"] = (
            f"-c statement_timeout={statement_ms} -c lock_timeout={statement_ms}"
        )
        pool.setdefault("pool_timeout", statement_timeout_s)
    return create_engine(parsed, pool_pre_ping=True, connect_args=connect_args, **pool)


def sqlite_file(url: str) -> Path | None:
    """The database file behind a SQLite URL, or None for other backends."""
    parsed = make_url(url)
    if parsed.get_backend_name() != "sqlite" or not parsed.database:
        return None
    return None if parsed.database == ":memory:" else Path(parsed.database)


def migrate(engine: Engine) -> None:
    """Bring the schema to the newest alembic revision (idempotent)."""
    cfg = Config()
    cfg.set_main_option("script_location", str(MIGRATIONS_DIR))
    with engine.begin() as connection:
        cfg.attributes["connection"] = connection
        command.upgrade(cfg, "head")


def check_schema(engine: Engine) -> None:
    """Refuse to work on a catalog whose schema is not the one this version expects."""
    cfg = Config()
    cfg.set_main_option("script_location", str(MIGRATIONS_DIR))
    head = ScriptDirectory.from_config(cfg).get_current_head()
    with engine.connect() as connection:
        current = MigrationContext.configure(connection).get_current_revision()
    if current != head:
        raise CatalogError(
            f"the catalog schema is at revision {current}, this pacs-node expects {head}: "
            "start `pacs-node serve` once (it migrates the catalog)"
        )


def open_catalog(
    url: str,
    *,
    run_migrations: bool = True,
    read_only: bool = False,
    statement_timeout_s: float | None = None,
    pool_size: int | None = None,
) -> Catalog:
    """Open (and by default migrate) the catalog; read-only commands pass
    ``run_migrations=False`` so they never change a schema a running node is using, and
    ``read_only`` makes every session refuse writes (the SCP worker processes' handle);
    ``statement_timeout_s`` and ``pool_size`` as for :func:`create_catalog_engine`."""
    try:
        engine = create_catalog_engine(
            url, read_only=read_only, statement_timeout_s=statement_timeout_s, pool_size=pool_size
        )
        if run_migrations:
            migrate(engine)
        else:
            check_schema(engine)
    except SQLAlchemyError as exc:
        safe = make_url(url).render_as_string(hide_password=True)
        raise CatalogError(f"cannot open the catalog at {safe}: {exc}") from exc
    return Catalog(engine=engine, sessions=sessionmaker(engine, expire_on_commit=False))
