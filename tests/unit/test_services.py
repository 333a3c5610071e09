"""The service layer on a real SQLite catalog and spool: one way to queue a job whoever asks,
the router's series selection for a model named by hand, and every command's actor on one
study timeline."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
import yaml
from sqlalchemy import select, update

from pacs_node.actor import ROUTING, Actor, ActorKind
from pacs_node.catalog.db import Catalog, open_catalog
from pacs_node.catalog.models import Delivery, DeliveryState, Job, JobState
from pacs_node.catalog.quality import hold_for_quality
from pacs_node.catalog.results import StoredEncoding
from pacs_node.config import NodeOptions, Settings, load_settings
from pacs_node.errors import RequestError
from pacs_node.ingest.spool import Spool
from pacs_node.routing.router import Router
from pacs_node.routing.rules import RoutesFile, SeriesFacts
from pacs_node.services import deliveries, jobs, studies
from pacs_node.services.timeline import SubjectKind, TimelineEvent
from tests.catalog_factory import ingest, queue_stored_results
from tests.conftest import run_cli
from tests.dicom_factory import new_uid, write_series

ROOT = Path(__file__).parents[2]
RULE: dict[str, object] = {
    "name": "ct",
    "when": {"modality": "CT"},
    "models": ["ct-classical"],
    "send": {"seg": ["PACS"], "sr": ["PACS", "EHR"]},
}


@pytest.fixture
def catalog(tmp_path: Path) -> Iterator[Catalog]:
    cat = open_catalog(f"sqlite:///{(tmp_path / 'var' / 'catalog.sqlite').resolve()}")
    yield cat
    cat.dispose()


def _settings(tmp_path: Path, rules: list[dict[str, object]]) -> Settings:
    node = NodeOptions(data_dir=tmp_path / "var", models_dir=ROOT / "models", fsync=False)
    return Settings(node=node, routes=RoutesFile.model_validate({"rules": rules}))


def _queued(events: tuple[TimelineEvent, ...]) -> list[TimelineEvent]:
    return [e for e in events if e.kind == "queued"]


def test_a_job_queued_by_routing_and_one_queued_from_the_cli_record_the_same_events(
    tmp_path: Path,
) -> None:
    config = tmp_path / "cfg"
    config.mkdir()
    data = tmp_path / "var"
    node = {"data_dir": str(data), "models_dir": str(ROOT / "models"), "fsync": False}
    (config / "node.yaml").write_text(yaml.safe_dump(node))
    (config / "peers.yaml").write_text("peers:\n  - {ae_title: CT1, host: 127.0.0.1}\n")
    (config / "routes.yaml").write_text(yaml.safe_dump({"rules": [RULE]}))
    settings = load_settings(config)
    catalog = open_catalog(settings.node.catalog_url)
    try:
        paths = write_series(tmp_path / "in", slices=6, rows=16, columns=16)
        _, study_uid, _ = ingest(catalog, settings.node.spool_dir, paths, "CT1")

        Router(catalog, Spool(settings.node.spool_dir), settings.routes).on_stable(study_uid)
        run_cli("run", study_uid, "--config", str(config))  # queues; no --wait

        detail = studies.study_detail(catalog, study_uid)
        with catalog.sessions() as session:
            rows = [
                (job.rule, job.model, job.series_uids, job.destinations)
                for job in session.scalars(select(Job).order_by(Job.id))
            ]
    finally:
        catalog.dispose()
    assert detail is not None
    by_routing, by_cli = _queued(detail.timeline)
    assert (by_routing.subject.kind, by_cli.subject.kind) == (SubjectKind.JOB, SubjectKind.JOB)
    assert by_routing.subject != by_cli.subject
    assert by_routing.detail == by_cli.detail == {"model": "ct-classical", "rule": "ct"}
    assert by_routing.actor == ROUTING
    assert by_cli.actor is not None
    assert by_cli.actor.kind is ActorKind.USER
    # the jobs themselves are the same: rule, model, series and destinations serialised alike
    assert rows[0] == rows[1]
    assert rows[0][3] == {"seg": ["PACS"], "sr": ["PACS", "EHR"]}
    # the events around them are the same kinds, in the same shape, whoever queued
    kinds = [(e.kind, e.subject.kind) for e in detail.timeline if e.subject.kind != "study"]
    assert kinds == [("queued", SubjectKind.JOB)] * 2


def _facts(uid: str, slices: int, modality: str = "CT", *, ours: bool = False) -> SeriesFacts:
    return SeriesFacts(series_uid=uid, modality=modality, slices=slices, produced_by_node=ours)


def test_choice_follows_the_rules_then_the_routers_selection_for_a_named_model(
    tmp_path: Path,
) -> None:
    facts = [_facts("small", 20), _facts("large", 90), _facts("mr", 200, "MR")]
    routed = _settings(tmp_path, [RULE])
    (by_rule,) = jobs.choose_jobs(routed, facts)
    assert (by_rule.rule, by_rule.model, by_rule.series_uids) == ("ct", "ct-classical", ("large",))
    assert jobs.choose_jobs(routed, facts, series=["small"])[0].series_uids == ("small",)

    unrouted = _settings(tmp_path, [])
    assert jobs.choose_jobs(unrouted, facts) == []
    # a model no rule names: the largest series of its modality (the MR series is larger)
    (by_hand,) = jobs.choose_jobs(unrouted, facts, "ct-classical")
    assert (by_hand.rule, by_hand.series_uids) == (None, ("large",))
    assert by_hand.send["seg"] == ("SOURCE",)
    # this node's own output is never chosen, by a rule or by hand
    own = [_facts("ours", 500, ours=True), _facts("theirs", 10)]
    assert jobs.choose_jobs(unrouted, own, "ct-classical")[0].series_uids == ("theirs",)
    assert jobs.choose_jobs(unrouted, [_facts("mr", 50, "MR")], "ct-classical") == []


def test_queue_refuses_an_unknown_study_and_a_study_nothing_fits(
    catalog: Catalog, tmp_path: Path
) -> None:
    settings = _settings(tmp_path, [])
    alice = Actor.user("alice")
    with pytest.raises(RequestError, match=r"no study 1\.2\.3 in the catalog"):
        jobs.queue_processing(catalog, settings, "1.2.3", alice)
    paths = write_series(tmp_path / "in", slices=4, rows=16, columns=16)
    _, study_uid, _ = ingest(catalog, settings.node.spool_dir, paths)
    with pytest.raises(RequestError, match="nothing to run"):
        jobs.queue_processing(catalog, settings, study_uid, alice)


def test_every_command_names_its_actor_on_one_timeline(catalog: Catalog, tmp_path: Path) -> None:
    settings = _settings(tmp_path, [])
    alice, bob = Actor.user("alice"), Actor.user("bob")
    paths = write_series(tmp_path / "in", slices=4, rows=16, columns=16, study_uid=new_uid())
    _, study_uid, _ = ingest(catalog, settings.node.spool_dir, paths)
    (job_id,) = jobs.queue_processing(catalog, settings, study_uid, alice, model="ct-classical")
    assert jobs.cancel_job(catalog, job_id, bob)
    assert not jobs.cancel_job(catalog, job_id, bob)  # cancelled already: nothing recorded
    assert jobs.retry_job(catalog, job_id, alice)

    item = StoredEncoding("seg", "1.2.840.10008.5.1.4.1.1.66.4", new_uid(), None, "1.2", b"x")
    held_uid = new_uid()
    with catalog.sessions.begin() as session:
        held_job, _ = queue_stored_results(
            session, tmp_path / "results", [item], {"seg": ["PACS"]}, study_uid=held_uid
        )
        hold_for_quality(session, held_job, [{"check": "c", "label": "l", "message": "m"}])
        # a result is judged once its job is done
        session.execute(update(Job).where(Job.id == held_job).values(state=JobState.DONE))
    assert deliveries.release_result(catalog, held_job, bob) == 1
    assert deliveries.reject_result(catalog, held_job, bob) == 0  # released: nothing held now
    (delivery,) = deliveries.list_deliveries(catalog)
    assert not deliveries.retry_delivery(catalog, delivery.id, alice)  # pending: not retried
    with catalog.sessions.begin() as session:
        session.execute(update(Delivery).values(state=DeliveryState.DEAD))
    assert deliveries.retry_delivery(catalog, delivery.id, alice)
    held = studies.study_detail(catalog, held_uid)
    assert held is not None
    assert [(e.kind, str(e.subject), str(e.actor)) for e in held.timeline] == [
        ("queued", f"job {held_job}", str(ROUTING)),  # the factory queues as routing would
        ("quality_held", f"job {held_job}", "None"),
        ("quality_released", f"job {held_job}", "user:bob"),
        ("delivery_retry", f"delivery {delivery.id}", "user:alice"),
    ]
    assert [r.kind for r in held.results] == ["seg"]
    assert [d.id for d in held.deliveries] == [delivery.id]

    detail = studies.study_detail(catalog, study_uid)
    assert detail is not None
    assert [j.id for j in detail.jobs] == [job_id]
    shape = [(e.kind, str(e.subject), str(e.actor) if e.actor else None) for e in detail.timeline]
    assert shape == [
        ("receiving", f"study {study_uid}", None),
        ("queued", f"job {job_id}", "user:alice"),
        ("cancelled", f"job {job_id}", "user:bob"),
        ("queued", f"job {job_id}", "user:alice"),
    ]
    assert detail.timeline[-1].detail == {"by": "retry"}
    assert [e.at for e in detail.timeline] == sorted(e.at for e in detail.timeline)
    assert studies.study_detail(catalog, "9.9.9") is None


def test_actor_text_round_trips() -> None:
    for actor in (Actor.user("dr.who"), Actor.peer("CT1"), ROUTING):
        assert Actor.parse(str(actor)) == actor
    assert str(Actor.peer("CT1")) == "peer:CT1"
    with pytest.raises(ValueError, match="not an actor"):
        Actor.parse("nobody")
