"""Alembic migrations build exactly the schema the models declare, up and down, on both backends."""

from __future__ import annotations

from pathlib import Path

import pytest
from alembic import command
from alembic.autogenerate import compare_metadata
from alembic.config import Config
from alembic.migration import MigrationContext

from pacs_node.catalog.db import MIGRATIONS_DIR, create_catalog_engine
from pacs_node.catalog.models import Base


def _config() -> Config:
    cfg = Config()
    cfg.set_main_option("script_location", str(MIGRATIONS_DIR))
    return cfg


@pytest.mark.parametrize("backend", ["sqlite", "postgresql"])
def test_upgrade_downgrade_and_no_drift(
    backend: str, tmp_path: Path, request: pytest.FixtureRequest
) -> None:
    url = (
        f"sqlite:///{tmp_path / 'c.sqlite'}"
        if backend == "sqlite"
        else request.getfixturevalue("postgres_url")
    )
    engine = create_catalog_engine(url)
    cfg = _config()
    try:
        for target in ("head", "base", "head"):
            with engine.begin() as connection:
                cfg.attributes["connection"] = connection
                if target == "base":
                    command.downgrade(cfg, target)
                else:
                    command.upgrade(cfg, target)
        with engine.connect() as connection:
            drift = compare_metadata(MigrationContext.configure(connection), Base.metadata)
        assert drift == []
    finally:
        engine.dispose()
