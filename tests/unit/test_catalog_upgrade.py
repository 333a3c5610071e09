"""A catalog the previous release wrote (schema 0008), with rows in every table, upgrades to
this release's schema with every value kept, reads back through the models, and downgrades
to the same text; on SQLite and on PostgreSQL."""

from __future__ import annotations

import json
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest
from alembic import command
from alembic.config import Config
from sqlalchemy import Engine, inspect, select, text
from sqlalchemy.orm import Session

from pacs_node.catalog.db import MIGRATIONS_DIR, create_catalog_engine, migrate
from pacs_node.catalog.models import Base, Job, JobEvent, utcnow

PREVIOUS = "0008"
AT = datetime(2026, 12, 1, 10, 30, 15, 250000, tzinfo=UTC)
LATER = datetime(2026, 12, 1, 11, 0, 0, tzinfo=UTC)


class Stamp:
    """A timestamp column's value: written as the backend's text, read back as ``when``."""

    def __init__(self, when: datetime) -> None:
        self.when = when

    def sql(self, backend: str) -> str:
        if backend == "sqlite":  # how SQLAlchemy stores DateTime there: UTC, no zone
            return self.when.strftime("%Y-%m-%d %H:%M:%S.%f")
        return self.when.isoformat()


class JsonText(str):
    """A JSON column's text as the previous release wrote it (``json.dumps``)."""


SERIES_UIDS = JsonText('["1.2.3.4", "1.2.3.5"]')
DESTINATIONS = JsonText('{"pdf": ["SOURCE"], "seg": ["PACS", "ARCHIVE"]}')
TIMINGS = JsonText('{"build_s": 0.5, "total_s": 12.25}')
QA_REASONS = JsonText(
    '[{"check": "side_conflict", "label": "Left kidney", "limit": 10.0, '
    '"message": "found on the right", "value": 42.5}]'
)
ENCODINGS = JsonText(
    '{"1.2.840.10008.1.2.1": "7/seg.dcm", "1.2.840.10008.1.2.4.90": "7/seg.j2k.dcm"}'
)
PATHS = JsonText('{"results": ["3"], "spool": ["1.9/1.9.1/1.9.1.1.dcm"]}')
COMMITTED = JsonText('["1.2.3.9.1"]')
FAILED = JsonText('[["1.2.3.9.2", 272]]')
STUDY_DETAIL = JsonText('{"quarantine_id": 1, "reason": "identity", "sop": "1.2.3.6.1"}')
JOB_DETAIL = JsonText('{"by": "routing", "model": "torso"}')
ROUTING_FIRST = {"sop": "1.2.3.4.1", "number": 1, "calling_ae": None, "header": {"modality": "CT"}}

# One row for every table of schema 0008, every column given (None: SQL NULL).
ROWS: dict[str, list[dict[str, Any]]] = {
    "studies": [
        {
            "id": 1,
            "study_uid": "1.2.3",
            "patient_name": "Müller^Hans",
            "patient_id": "P1",
            "issuer_of_patient_id": "HOSP",
            "accession_number": "A1",
            "study_date": "20261201",
            "study_time": "103000",
            "study_description": "CT Thorax",
            "calling_ae": "SCANNER",
            "state": "stable",
            "first_received_at": Stamp(AT),
            "receiving_since": Stamp(AT),
            "last_received_at": Stamp(AT),
            "stable_at": Stamp(LATER),
            "reopened_count": 1,
            "duplicate_count": 2,
            "route_outcome": "routed",
            "routed_at": Stamp(LATER),
        }
    ],
    "series": [
        {
            "id": 1,
            "series_uid": "1.2.3.4",
            "study_id": 1,
            "modality": "CT",
            "series_number": 3,
            "series_description": "Thorax 1mm",
            "body_part": "CHEST",
            "first_received_at": Stamp(AT),
        }
    ],
    "instances": [
        {
            "id": 1,
            "sop_instance_uid": "1.2.3.4.1",
            "sop_class_uid": "1.2.840.10008.5.1.4.1.1.2",
            "series_id": 1,
            "instance_number": 1,
            "transfer_syntax_uid": "1.2.840.10008.1.2.1",
            "path": "1.2.3/1.2.3.4/1.2.3.4.1.dcm",
            "size_bytes": 525312,
            "calling_ae": "SCANNER",
            "received_at": Stamp(AT),
            "sha256": "ab" * 32,
        }
    ],
    "quarantine": [
        {
            "id": 1,
            "reason": "identity",
            "reason_text": "another patient in the same study",
            "study_uid": "1.2.3",
            "series_uid": "1.2.3.6",
            "sop_instance_uid": "1.2.3.6.1",
            "sop_class_uid": "1.2.840.10008.5.1.4.1.1.2",
            "transfer_syntax_uid": "1.2.840.10008.1.2.1",
            "collided_study_uid": "1.2.3",
            "patient_key": "HOSP/P2",
            "path": "quarantine/1.dcm",
            "size_bytes": 1024,
            "sha256": "cd" * 32,
            "calling_ae": "SCANNER",
            "received_at": Stamp(AT),
            "state": "released",
            "resolved_at": Stamp(LATER),
            "resolved_by": "dr.who",
            "resolved_study_uid": "1.2.3.7",
            "resolved_sop_instance_uid": "1.2.3.7.1",
        }
    ],
    "study_events": [
        {"id": 1, "study_id": 1, "at": Stamp(AT), "kind": "quarantined", "detail": STUDY_DETAIL},
        {"id": 2, "study_id": 1, "at": Stamp(LATER), "kind": "stable", "detail": None},
    ],
    "jobs": [
        {
            "id": 1,
            "study_id": 1,
            "rule": "ct-torso",
            "model": "torso",
            "series_uids": SERIES_UIDS,
            "destinations": DESTINATIONS,
            "state": "done",
            "attempts": 1,
            "progress": 1.0,
            "stage": "done",
            "timings": TIMINGS,
            "error": None,
            "claimed_by": "node/worker-1",
            "created_at": Stamp(AT),
            "started_at": Stamp(AT),
            "finished_at": Stamp(LATER),
            "qa_mode": "hold",
            "qa_verdict": "fail",
            "qa_reasons": QA_REASONS,
            "qa_decision": "released",
        }
    ],
    "job_events": [
        {"id": 1, "job_id": 1, "at": Stamp(AT), "kind": "queued", "detail": JOB_DETAIL},
        {"id": 2, "job_id": 1, "at": Stamp(LATER), "kind": "done", "detail": None},
    ],
    "results": [
        {
            "id": 1,
            "job_id": 1,
            "kind": "seg",
            "sop_class_uid": "1.2.840.10008.5.1.4.1.1.66.4",
            "sop_instance_uid": "1.2.3.9.1",
            "series_uid": "1.2.3.9",
            "encodings": ENCODINGS,
            "size_bytes": 4096,
            "patient_search": "Patient?identifier=HOSP|P1",
            "destination": "EHR",
            "created_at": Stamp(LATER),
        }
    ],
    "deliveries": [
        {
            "id": 1,
            "result_id": 1,
            "job_id": 1,
            "destination": "PACS",
            "state": "delivered",
            "attempts": 2,
            "next_attempt_at": Stamp(LATER),
            "last_error": "association rejected",
            "held_for": None,
            "transfer_syntax_uid": "1.2.840.10008.1.2.1",
            "created_at": Stamp(LATER),
            "updated_at": Stamp(LATER),
            "delivered_at": Stamp(LATER),
            "commitment": "committed",
            "commitment_uid": "2.25.1",
            "committed_at": Stamp(LATER),
            "commitment_ae": "PACS",
            "commitment_hosts": "127.0.0.1 ::1",
            "claimed_by": "node/outbox-1",
            "lease_expires_at": Stamp(LATER),
        }
    ],
    "purges": [
        {
            "id": 1,
            "study_uid": "1.9",
            "reason": "retention_days",
            "instances": 1,
            "size_bytes": 2048,
            "paths": PATHS,
            "purged_at": Stamp(AT),
            "files_removed_at": None,
        }
    ],
    "commitment_reports": [
        {
            "id": 1,
            "transaction_uid": "2.25.1",
            "calling_ae": "PACS",
            "peer_address": "127.0.0.1",
            "committed": COMMITTED,
            "failed": FAILED,
            "received_at": Stamp(LATER),
            "settled_at": Stamp(LATER),
            "refused_at": None,
        }
    ],
    "counters": [{"name": "duplicates", "value": 2}],
}


def _config() -> Config:
    cfg = Config()
    cfg.set_main_option("script_location", str(MIGRATIONS_DIR))
    return cfg


def _alembic(engine: Engine, step: str, revision: str) -> None:
    cfg = _config()
    with engine.begin() as connection:
        cfg.attributes["connection"] = connection
        getattr(command, step)(cfg, revision)


def _write_previous_release(engine: Engine, backend: str) -> None:
    """Plain SQL, as the previous release's catalog held it: JSON as text. Row ids come
    from the database (1, 2, ... as ``ROWS`` lists them), so its sequences stay in step."""
    with engine.begin() as connection:
        for table, rows in ROWS.items():
            for row in rows:
                given = {k: v for k, v in row.items() if k != "id"}
                names = ", ".join(given)
                marks = ", ".join(f":{name}" for name in given)
                values = {
                    k: v.sql(backend) if isinstance(v, Stamp) else v for k, v in given.items()
                }
                connection.execute(text(f"INSERT INTO {table} ({names}) VALUES ({marks})"), values)


def _expected(value: Any) -> Any:
    if isinstance(value, Stamp):
        return value.when
    if isinstance(value, JsonText):
        return json.loads(value)
    return value


def _json_text(engine: Engine) -> dict[tuple[str, int, str], str | None]:
    """Every JSON column's stored text, by (table, row id, column)."""
    found: dict[tuple[str, int, str], str | None] = {}
    with engine.connect() as connection:
        for table, rows in ROWS.items():
            for row in rows:
                for column, value in row.items():
                    if isinstance(value, JsonText) or (column == "detail" and value is None):
                        stored = connection.execute(
                            text(f"SELECT {column} FROM {table} WHERE id = :id"), {"id": row["id"]}
                        ).scalar_one()
                        found[(table, row["id"], column)] = stored
    return found


@pytest.mark.parametrize("backend", ["sqlite", "postgresql"])
def test_a_previous_release_catalog_upgrades_with_every_value_kept(
    backend: str, tmp_path: Path, request: pytest.FixtureRequest
) -> None:
    url = (
        f"sqlite:///{tmp_path / 'catalog.sqlite'}"
        if backend == "sqlite"
        else request.getfixturevalue("postgres_url")
    )
    engine = create_catalog_engine(url)  # foreign keys on, as the node opens it
    try:
        _alembic(engine, "upgrade", PREVIOUS)
        tables = set(inspect(engine).get_table_names()) - {"alembic_version"}
        assert tables == set(ROWS)  # the test fills every table the previous release has
        _write_previous_release(engine, backend)
        before = _json_text(engine)
        assert before[("jobs", 1, "series_uids")] == SERIES_UIDS

        migrate(engine)  # what `pacs-node serve` does at start

        models = {mapper.class_.__tablename__: mapper.class_ for mapper in Base.registry.mappers}
        with Session(engine) as session:
            for table, rows in ROWS.items():
                model = models[table]
                stored = session.scalars(select(model)).all()
                assert len(stored) == len(rows), table  # nothing cascaded away
                for row, obj in zip(rows, sorted(stored, key=_key), strict=True):
                    for column, value in row.items():
                        assert getattr(obj, column) == _expected(value), (table, column)
            job = session.get_one(Job, 1)
            assert job.destinations == {"pdf": ["SOURCE"], "seg": ["PACS", "ARCHIVE"]}
            assert list(session.get_one(models["results"], 1).encodings) == [
                "1.2.840.10008.1.2.1",  # the preferred encoding stays first
                "1.2.840.10008.1.2.4.90",
            ]
            assert session.get_one(models["commitment_reports"], 1).failed == [["1.2.3.9.2", 272]]
            # a series recorded before its routing headers were kept has none: routing reads
            # its files (routing.facts); the new release records them as JSON
            series = session.get_one(models["series"], 1)
            assert (series.routing_first, series.routing_last) == (None, None)
            series.routing_first = ROUTING_FIRST
            # the new release writes through the models; SQL NULL stays NULL
            job.timings = {**job.timings, "store_s": 1.5}
            session.add(JobEvent(job_id=1, at=utcnow(), kind="retried", detail=None))
            session.add(JobEvent(job_id=1, at=utcnow(), kind="noted", detail={"by": "dr.who"}))
            session.commit()
        with Session(engine) as session:
            assert session.get_one(models["series"], 1).routing_first == ROUTING_FIRST

        _alembic(engine, "downgrade", PREVIOUS)
        after = _json_text(engine)
        changed = {("jobs", 1, "timings")}
        assert {k: v for k, v in after.items() if k not in changed} == {
            k: v for k, v in before.items() if k not in changed
        }
        with engine.connect() as connection:
            timings = connection.execute(text("SELECT timings FROM jobs")).scalar_one()
            details = connection.execute(
                text("SELECT kind, detail FROM job_events WHERE id > 2 ORDER BY id")
            ).all()
        assert isinstance(timings, str)
        assert json.loads(timings) == {"build_s": 0.5, "total_s": 12.25, "store_s": 1.5}
        assert [(kind, detail) for kind, detail in details] == [
            ("retried", None),
            ("noted", '{"by": "dr.who"}'),
        ]
        assert "routing_first" not in {c["name"] for c in inspect(engine).get_columns("series")}
        _alembic(engine, "upgrade", "head")  # and up again, as a rolled-back release would
        with Session(engine) as session:
            assert session.get_one(Job, 1).qa_reasons == json.loads(QA_REASONS)
            assert session.get_one(models["series"], 1).routing_first is None
    finally:
        engine.dispose()


def _key(obj: Any) -> Any:
    return getattr(obj, "id", None) or getattr(obj, "name", "")
