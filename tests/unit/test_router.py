"""The router on a real catalog and spool: which series and models a stable study gets."""

from __future__ import annotations

import shutil
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path

import pydicom
import pytest
from pydicom.dataset import Dataset
from sqlalchemy import select

from pacs_node.catalog.db import Catalog, open_catalog
from pacs_node.catalog.models import Job, RouteOutcome, Study, StudyState
from pacs_node.catalog.studies import list_studies, record_instances
from pacs_node.config import NodeOptions, Settings
from pacs_node.errors import BundleError, ConfigError
from pacs_node.ingest.header import read_header
from pacs_node.ingest.routing_header import read_routing_header
from pacs_node.ingest.spool import Spool
from pacs_node.refs import InstanceRef
from pacs_node.routing.router import Router, check_models
from pacs_node.routing.rules import RoutesFile
from tests.dicom_factory import (
    ROUTING_EXPECTED,
    new_uid,
    restyle,
    write_routing_cases,
    write_series,
)

MODELS = Path(__file__).resolve().parents[2] / "models"

ROUTES = RoutesFile.model_validate(
    {
        "rules": [
            {
                "name": "ct",
                "when": {
                    "modality": "CT",
                    "image_type": {"not_contains": "LOCALIZER"},
                    "slices": {"min": 10},
                },
                "models": ["ct-torso-organs", "ct-classical"],
                "send": {"seg": ["PACS"]},
            },
            {
                "name": "chest-xr",
                "when": {"modality": ["CR", "DX"]},
                "models": ["xr-chest-lungs"],
                "on_change": "ignore",
            },
        ]
    }
)


@pytest.fixture
def catalog(tmp_path: Path) -> Iterator[Catalog]:
    cat = open_catalog(f"sqlite:///{tmp_path / 'catalog.sqlite'}")
    yield cat
    cat.dispose()


def _spool_and_record(catalog: Catalog, spool: Spool, paths: list[Path]) -> None:
    refs = []
    for path in paths:
        ds = pydicom.dcmread(path)
        header = read_header(ds)
        stored = spool.store(
            header.study_uid, header.series_uid, header.sop_instance_uid, [path.read_bytes()]
        )
        refs.append(
            InstanceRef(
                header=header,
                transfer_syntax_uid=str(ds.file_meta.TransferSyntaxUID),
                path=stored.relpath,
                size_bytes=stored.size_bytes,
                received_at=datetime.now(UTC),
                calling_ae="CT1",
                routing=read_routing_header(ds),
            )
        )
    with catalog.sessions.begin() as session:
        record_instances(session, refs)
        for study in session.scalars(select(Study)):
            study.state = StudyState.STABLE
            study.stable_at = datetime.now(UTC)


def _jobs(catalog: Catalog) -> list[tuple[str, str, list[str]]]:
    with catalog.sessions() as session:
        return [
            (job.rule or "", job.model, job.series_uids)
            for job in session.scalars(select(Job).order_by(Job.id))
        ]


def test_thin_axial_series_wins_over_thick_and_localizer(catalog: Catalog, tmp_path: Path) -> None:
    study = new_uid()
    localizer = restyle(
        write_series(tmp_path / "loc", slices=2, study_uid=study, series_number=1),
        ImageType=["ORIGINAL", "PRIMARY", "LOCALIZER"],
    )
    thick = write_series(
        tmp_path / "thick", slices=12, study_uid=study, series_number=2, spacing=(5.0, 0.8, 0.8)
    )
    thin = write_series(
        tmp_path / "thin", slices=30, study_uid=study, series_number=3, spacing=(1.0, 0.8, 0.8)
    )
    spool = Spool(tmp_path / "spool")
    _spool_and_record(catalog, spool, localizer + thick + thin)
    router = Router(catalog, spool, ROUTES)
    router.on_stable(study)
    thin_uid = pydicom.dcmread(thin[0]).SeriesInstanceUID
    assert _jobs(catalog) == [
        ("ct", "ct-torso-organs", [thin_uid]),
        ("ct", "ct-classical", [thin_uid]),
    ]
    with catalog.sessions() as session:
        (summary,) = list_studies(session)
        assert summary.status == "queued"
        assert summary.route_outcome == "routed"
        job = session.scalars(select(Job)).first()
        assert job is not None
        assert job.destinations == {"seg": ["PACS"]}


def _stable_again(catalog: Catalog) -> None:
    with catalog.sessions.begin() as session:
        for study in session.scalars(select(Study)):
            study.stable_at = datetime.now(UTC)


def test_a_stable_study_is_routed_once_however_often_asked(
    catalog: Catalog, tmp_path: Path
) -> None:
    study = new_uid()
    paths = restyle(write_series(tmp_path / "cr", slices=1, study_uid=study), Modality="CR")
    spool = Spool(tmp_path / "spool")
    _spool_and_record(catalog, spool, paths)
    _stable_again(catalog)
    router = Router(catalog, spool, ROUTES)
    router.on_stable(study)
    router.on_stable(study)  # a second node, or catch-up beside the timer: no second job
    assert router.catch_up() == 0
    assert len(_jobs(catalog)) == 1


def test_cr_chest_goes_to_the_radiograph_model_once(catalog: Catalog, tmp_path: Path) -> None:
    study = new_uid()
    paths = restyle(write_series(tmp_path / "cr", slices=1, study_uid=study), Modality="CR")
    spool = Spool(tmp_path / "spool")
    _spool_and_record(catalog, spool, paths)
    router = Router(catalog, spool, ROUTES)
    router.on_stable(study)
    assert [model for _, model, _ in _jobs(catalog)] == ["xr-chest-lungs"]
    _stable_again(catalog)  # the study changed and became stable again: on_change ignore
    router.on_stable(study)
    assert len(_jobs(catalog)) == 1
    with catalog.sessions() as session:
        outcome = session.scalar(select(Study.route_outcome))
    assert outcome is RouteOutcome.IGNORED


def test_unknown_modality_is_unrouted_and_explained(catalog: Catalog, tmp_path: Path) -> None:
    study = new_uid()
    paths = restyle(write_series(tmp_path / "xa", slices=3, study_uid=study), Modality="XA")
    spool = Spool(tmp_path / "spool")
    _spool_and_record(catalog, spool, paths)
    router = Router(catalog, spool, ROUTES)
    router.on_stable(study)
    assert _jobs(catalog) == []
    with catalog.sessions() as session:
        (summary,) = list_studies(session)
        assert summary.status == "unrouted"
        verdicts = router.explain(session, study)
    ct = verdicts[0]
    assert not ct.matched
    (modality,) = [c for c in ct.series[0].checks if c.attribute == "modality"]
    assert "'XA' does not match CT" in modality.reason


def test_objects_the_node_produced_are_never_routed(catalog: Catalog, tmp_path: Path) -> None:
    study = new_uid()
    paths = _ours(write_series(tmp_path / "ours", slices=20, study_uid=study))
    spool = Spool(tmp_path / "spool")
    _spool_and_record(catalog, spool, paths)
    Router(catalog, spool, ROUTES).on_stable(study)
    assert _jobs(catalog) == []
    with catalog.sessions() as session:
        assert session.scalar(select(Study.route_outcome)) is RouteOutcome.OWN_OUTPUT


def test_catch_up_routes_stable_studies_left_unrouted(catalog: Catalog, tmp_path: Path) -> None:
    study = new_uid()
    spool = Spool(tmp_path / "spool")
    _spool_and_record(catalog, spool, write_series(tmp_path / "ct", slices=12, study_uid=study))
    router = Router(catalog, spool, ROUTES)
    assert router.catch_up() == 1
    assert router.catch_up() == 0
    assert len(_jobs(catalog)) == 2


def test_a_route_to_a_missing_model_stops_the_node_at_start(tmp_path: Path) -> None:
    shutil.copytree(MODELS / "ct-classical", tmp_path / "models" / "ct-classical")
    settings = Settings(
        node=NodeOptions(models_dir=tmp_path / "models"), routes=ROUTES, config_dir=tmp_path
    )
    with pytest.raises(ConfigError) as caught:
        check_models(settings)
    assert caught.value.source == str(tmp_path / "routes.yaml")
    assert caught.value.key == "rules[0].models"
    assert "'ct-torso-organs' is not installed" in caught.value.reason


def test_route_limits_for_a_label_the_model_lacks_stop_the_node_at_start(tmp_path: Path) -> None:
    shutil.copytree(MODELS / "ct-classical", tmp_path / "models" / "ct-classical")
    rule = {"name": "ct", "models": ["ct-classical"], "qa": "flag"}
    good = RoutesFile.model_validate(
        {"rules": [{**rule, "qa_limits": {"sizes": {"bone": [1, 9]}}}]}
    )
    bad = RoutesFile.model_validate(
        {"rules": [{**rule, "qa_limits": {"sides": {"liver": "right"}}}]}
    )
    node = NodeOptions(models_dir=tmp_path / "models")
    check_models(Settings(node=node, routes=good, config_dir=tmp_path))
    with pytest.raises(ConfigError) as caught:
        check_models(Settings(node=node, routes=bad, config_dir=tmp_path))
    assert caught.value.key == "rules[0].qa_limits"
    assert "has no label liver" in caught.value.reason


def test_route_limits_are_checked_merged_with_the_models_own(tmp_path: Path) -> None:
    """A partial override (only the intensity tolerance) is valid once merged with the model's
    limits; a wrong value stops the node at start, naming the route's key."""
    shutil.copytree(MODELS / "ct-torso-organs", tmp_path / "models" / "ct-torso-organs")
    rule = {"name": "ct", "models": ["ct-torso-organs"]}
    node = NodeOptions(models_dir=tmp_path / "models")
    tolerance = {"rules": [{**rule, "qa_limits": {"intensity": {"tolerance": 50}}}]}
    check_models(
        Settings(node=node, routes=RoutesFile.model_validate(tolerance), config_dir=tmp_path)
    )
    inverted = {"rules": [{**rule, "qa_limits": {"sizes": {"liver": [9, 1]}}}]}
    with pytest.raises(ConfigError) as caught:
        check_models(
            Settings(node=node, routes=RoutesFile.model_validate(inverted), config_dir=tmp_path)
        )
    assert caught.value.key == "rules[0].qa_limits"
    assert "min is larger than max" in caught.value.reason


def _ours(paths: list[Path]) -> list[Path]:
    for path in paths:
        ds = pydicom.dcmread(path)
        item = Dataset()
        item.Manufacturer = "pacs-node"
        purpose = Dataset()
        purpose.CodeValue = "Newcode1"
        purpose.CodingSchemeDesignator = "99IHE"
        purpose.CodeMeaning = "Processing Algorithm"
        item.PurposeOfReferenceCodeSequence = [purpose]
        ds.ContributingEquipmentSequence = [item]
        ds.save_as(path)
    return paths


def test_results_forwarded_back_start_no_second_job(catalog: Catalog, tmp_path: Path) -> None:
    study = new_uid()
    spool = Spool(tmp_path / "spool")
    _spool_and_record(catalog, spool, write_series(tmp_path / "ct", slices=12, study_uid=study))
    router = Router(catalog, spool, ROUTES)
    router.on_stable(study)
    assert len(_jobs(catalog)) == 2
    # A PACS sends our own results back into the study: no new job.
    returned = _ours(write_series(tmp_path / "seg", slices=1, study_uid=study, series_number=9))
    _spool_and_record(catalog, spool, returned)
    router.on_stable(study)
    assert len(_jobs(catalog)) == 2
    # A real change (a new series from the scanner) is processed again.
    late = write_series(tmp_path / "late", slices=12, study_uid=study, series_number=4)
    _spool_and_record(catalog, spool, late)
    router.on_stable(study)
    assert len(_jobs(catalog)) == 4


def test_a_broken_bundle_stops_the_node_at_start(tmp_path: Path) -> None:
    configs = tmp_path / "models" / "broken" / "configs"
    configs.mkdir(parents=True)
    (configs / "metadata.json").write_text('{"version": "1.0", "network_data_format": 3}')
    settings = Settings(node=NodeOptions(models_dir=tmp_path / "models"), config_dir=tmp_path)
    with pytest.raises(BundleError) as caught:
        check_models(settings)
    assert "metadata.json" in str(caught.value)


def _shipped() -> RoutesFile:
    import yaml

    return RoutesFile.model_validate(
        yaml.safe_load((MODELS.parent / "ae_config" / "routes.yaml").read_text())
    )


def test_the_shipped_rules_route_torso_ct_and_mr_by_body_region(
    catalog: Catalog, tmp_path: Path
) -> None:
    studies = write_routing_cases(tmp_path / "cases")
    spool = Spool(tmp_path / "spool")
    router = Router(catalog, spool, _shipped())
    for name, study in studies.items():
        _spool_and_record(catalog, spool, sorted((tmp_path / "cases" / name).glob("*.dcm")))
        router.on_stable(study)
    routed = {}
    with catalog.sessions() as session:
        for uid, rule, model in session.execute(
            select(Study.study_uid, Job.rule, Job.model).join(Study, Study.id == Job.study_id)
        ):
            routed[uid] = (rule, model)
        status = {s.study_uid: s.status for s in list_studies(session)}
        reasons = {}
        for name in ("ct-head-body-part", "ct-head-geometry", "mr-torso-geometry"):
            verdicts = {v.rule: v for v in router.explain(session, studies[name])}
            rule = "ct-body" if name.startswith("ct") else "mr-body"
            (series,) = verdicts[rule].series
            reasons[name] = {c.attribute: c for c in series.checks}["body_region"]
    assert {name: routed.get(uid) for name, uid in studies.items()} == ROUTING_EXPECTED
    for name, expected in ROUTING_EXPECTED.items():
        assert status[studies[name]] == ("queued" if expected else "unrouted"), name
    assert not any(check.passed for check in reasons.values())
    assert reasons["ct-head-body-part"].reason.startswith("HEAD (Body Part Examined 'HEAD')")
    assert reasons["ct-head-geometry"].reason.startswith(
        "HEAD (no body part or description; z extent 100 mm, field 230 mm)"
    )
    assert reasons["mr-torso-geometry"].reason.startswith("TORSO (no body part or description")
