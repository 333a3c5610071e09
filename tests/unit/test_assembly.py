"""Catalog recording and study assembly against a real SQLite catalog (no sockets)."""

from __future__ import annotations

from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest

from pacs_node.assembly import Assembly
from pacs_node.catalog.db import Catalog, open_catalog
from pacs_node.catalog.studies import list_studies, record_instances
from pacs_node.config import NodeOptions, PeerConfig, Settings
from pacs_node.refs import InstanceHeader, InstanceRef
from tests.conftest import wait_for

T0 = datetime(2026, 1, 1, 12, 0, tzinfo=UTC)


@pytest.fixture(params=["sqlite", "postgresql"])
def catalog(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Catalog]:
    """The same tests on the default SQLite catalog and on PostgreSQL (scale-out)."""
    if request.param == "sqlite":
        url = f"sqlite:///{tmp_path / 'catalog.sqlite'}"
    else:
        url = request.getfixturevalue("postgres_url")
    cat = open_catalog(url)
    yield cat
    cat.dispose()


def _settings() -> Settings:
    return Settings(
        node=NodeOptions(quiet_period_s=30, max_wait_s=600),
        peers=(PeerConfig(ae_title="FAST", quiet_period_s=5),),
    )


def _ref(
    n: int, at: datetime, study: str = "1.2.3", ae: str = "CT1", series: str = "1"
) -> InstanceRef:
    header = InstanceHeader(
        study_uid=study,
        series_uid=f"{study}.{series}",
        sop_instance_uid=f"{study}.{series}.{n}",
        sop_class_uid="1.2.840.10008.5.1.4.1.1.2",
        modality="CT",
        patient_name="Yamada^Tarou=山田^太郎=やまだ^たろう",
    )
    return InstanceRef(
        header=header,
        transfer_syntax_uid="1.2.840.10008.1.2.1",
        path=f"{study}/{study}.{series}/{study}.{series}.{n}.dcm",
        size_bytes=100,
        received_at=at,
        calling_ae=ae,
    )


def _record(catalog: Catalog, *refs: InstanceRef) -> None:
    with catalog.sessions.begin() as session:
        record_instances(session, refs)


def _state(catalog: Catalog) -> tuple[str, int, int]:
    with catalog.sessions() as session:
        (study,) = list_studies(session)
    return study.state, study.instances, study.reopened_count


def test_recording_is_idempotent_and_counts_series(catalog: Catalog) -> None:
    refs = [_ref(i, T0, series="1") for i in range(3)] + [_ref(9, T0, series="2")]
    _record(catalog, *refs)
    _record(catalog, *refs)  # a replay (reconciliation) changes nothing
    with catalog.sessions() as session:
        (study,) = list_studies(session)
    assert study.instances == 4
    assert sorted(s.instances for s in study.series) == [1, 3]
    assert study.patient_name == "Yamada^Tarou=山田^太郎=やまだ^たろう"
    assert study.duplicate_count == 0


# Times of the process's choosing: on PostgreSQL arrivals take the database's clock
# (tests/unit/test_timer_lease.py checks that).
@pytest.mark.parametrize("catalog", ["sqlite"], indirect=True)
def test_quiet_period_then_reopen(catalog: Catalog) -> None:
    assembly = Assembly(catalog, _settings())
    _record(catalog, _ref(1, T0), _ref(2, T0 + timedelta(seconds=10)))
    assert not assembly.check("1.2.3", 30, now=T0 + timedelta(seconds=39))
    assert _state(catalog)[0] == "receiving"
    assert assembly.check("1.2.3", 30, now=T0 + timedelta(seconds=40))
    assert _state(catalog) == ("stable", 2, 0)

    _record(catalog, _ref(3, T0 + timedelta(seconds=100)))
    assert _state(catalog) == ("receiving", 3, 1)
    assert assembly.check("1.2.3", 30, now=T0 + timedelta(seconds=130))
    assert _state(catalog) == ("stable", 3, 1)


# Times of the process's choosing: on PostgreSQL arrivals take the database's clock
# (tests/unit/test_timer_lease.py checks that).
@pytest.mark.parametrize("catalog", ["sqlite"], indirect=True)
def test_max_wait_caps_a_study_that_never_goes_quiet(catalog: Catalog) -> None:
    assembly = Assembly(catalog, _settings())
    for second in range(0, 660, 20):
        _record(catalog, _ref(second, T0 + timedelta(seconds=second)))
        now = T0 + timedelta(seconds=second)
        if assembly.check("1.2.3", 30, now=now):
            break
    assert _state(catalog)[0] == "stable"
    assert now == T0 + timedelta(seconds=600)


def test_timers_are_rebuilt_from_the_catalog(catalog: Catalog) -> None:
    now = datetime.now(UTC)
    _record(catalog, _ref(1, now - timedelta(seconds=60), ae="FAST"))
    assembly = Assembly(catalog, _settings())
    seen: list[str] = []
    assembly.add_listener(seen.append)
    assembly.start()
    try:
        wait_for(lambda: seen, 10, what="the rebuilt timer to fire")
    finally:
        assembly.stop()
    assert seen == ["1.2.3"]
    assert _state(catalog)[0] == "stable"
