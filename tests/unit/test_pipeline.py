"""One series through ct-classical with :func:`run_series`: the stages in order with their
seconds, the gate's limits and verdict with and without result objects, and a run abandoned
or failed in the stage where it stopped."""

from __future__ import annotations

from pathlib import Path

import pytest

from pacs_node.errors import PacsNodeError, UnknownModel
from pacs_node.inference.registry import Registry
from pacs_node.inference.runner import Runner
from pacs_node.pipeline import BUILD, DECODE, INFER, Gate, Stopwatch, build_extras_of, run_series
from pacs_node.results import OutputKind, ResultOptions
from tests.ct_phantom import make_ct_phantom, write_phantom_series

MODELS = Path(__file__).resolve().parents[2] / "models"
MODEL = "ct-classical"
TOO_SMALL = {"sizes": {"body": {"max": 0.001}}}  # a route's override no body can meet


@pytest.fixture(scope="module")
def series(tmp_path_factory: pytest.TempPathFactory) -> list[Path]:
    phantom = make_ct_phantom(21, shape=(12, 128, 128), spacing=(5.0, 3.0, 3.0))
    return write_phantom_series(phantom, tmp_path_factory.mktemp("series"))


@pytest.fixture(scope="module")
def runner() -> Runner:
    return Runner(Registry(MODELS), device="cpu", threads=1)


class _Stages:
    def __init__(self, stop_at: str | None = None) -> None:
        self.seen: list[str] = []
        self.stop_at = stop_at

    def __call__(self, stage: str) -> None:
        self.seen.append(stage)
        if stage == self.stop_at:
            raise RuntimeError(f"abandoned at {stage}")


def test_a_series_becomes_results_with_the_gate_verdict_and_stage_seconds(
    series: list[Path], runner: Runner
) -> None:
    stages, steps, watch = _Stages(), _Stages(), Stopwatch({"queued_s": 1.0})
    run = run_series(
        runner,
        MODEL,
        "1.2.3",
        series,
        ResultOptions(),
        gate=Gate(TOO_SMALL, flag=True),
        on_stage=stages,
        progress=steps,
        timings=watch,
    )
    assert stages.seen == [DECODE, INFER, BUILD]
    assert "infer" in steps.seen  # the model's own steps reach the caller
    assert list(watch.seconds) == [
        "queued_s",
        "decode_s",
        "load_s",
        "preprocess_s",
        "infer_s",
        "postprocess_s",
        "build_s",
    ]
    assert all(seconds >= 0 for seconds in watch.seconds.values())
    assert round(run.segmentation.timings.decode, 4) == watch.seconds["decode_s"] > 0
    assert run.volume.voxels.shape == (12, 128, 128)
    assert run.results is not None
    assert {o.kind for o in run.results.dicom} >= {OutputKind.SEG, OutputKind.SR}
    # the route's override on the model's limits, and the failure named in the outputs
    assert run.limits is not None
    assert run.limits.sizes["body"].max == 0.001
    assert run.verdict is run.results.verdict
    assert run.verdict is not None
    assert [(f.check, f.label) for f in run.verdict.failures if f.label == "body"]


def test_without_results_the_gate_still_judges_and_without_a_gate_nothing_is_judged(
    series: list[Path], runner: Runner
) -> None:
    judged = run_series(runner, MODEL, "1.2.3", series, None, gate=Gate(TOO_SMALL))
    assert judged.results is None
    assert judged.verdict is not None
    assert not judged.verdict.passed
    assert "body" in judged.verdict.labels()
    model_limits = run_series(runner, MODEL, "1.2.3", series, None, gate=Gate())
    assert model_limits.limits == runner.registry.get(MODEL).quality
    assert model_limits.verdict is not None
    assert model_limits.verdict.passed

    unjudged = run_series(runner, MODEL, "1.2.3", series, ResultOptions())
    assert (unjudged.limits, unjudged.verdict) == (None, None)
    assert unjudged.results is not None
    assert unjudged.results.verdict is None


def test_a_run_stops_in_the_stage_that_failed(series: list[Path], runner: Runner) -> None:
    watch = Stopwatch()
    stages = _Stages(stop_at=INFER)
    with pytest.raises(RuntimeError, match="abandoned at infer"):
        run_series(runner, MODEL, "1.2.3", series, ResultOptions(), on_stage=stages, timings=watch)
    assert list(watch.seconds) == ["decode_s"]  # what ran before is kept

    stages = _Stages()
    with pytest.raises(UnknownModel):
        run_series(runner, "no-such-model", "1.2.3", series, None, gate=Gate(), on_stage=stages)
    assert stages.seen == [DECODE, INFER]  # an unknown model fails in infer, not before

    stages = _Stages()
    with pytest.raises(PacsNodeError, match=r"series 9\.9 has no stored instances"):
        run_series(runner, MODEL, "9.9", [], None, on_stage=stages)
    assert stages.seen == [DECODE]


def test_extras_later_builds_the_seg_and_sr_first_then_the_rest(
    series: list[Path], runner: Runner
) -> None:
    watch = Stopwatch()
    run = run_series(
        runner,
        MODEL,
        "1.2.3",
        series,
        ResultOptions(),
        gate=Gate(TOO_SMALL, flag=True),
        timings=watch,
        extras_later=True,
    )
    assert run.results is not None
    assert run.primary is not None
    assert [o.kind for o in run.results.dicom] == [OutputKind.SEG, OutputKind.SR]
    assert run.verdict is not None
    assert not run.verdict.passed
    first = watch.seconds["build_s"]
    extras = build_extras_of(run, watch)
    assert {o.kind for o in extras.dicom} == {
        OutputKind.GSPS,
        OutputKind.KEY_IMAGES,
        OutputKind.PDF,
    }
    assert extras.fhir_bundle
    assert extras.verdict is run.verdict
    assert watch.seconds["build_s"] > first  # the extras' seconds are build seconds too

    whole = run_series(runner, MODEL, "1.2.3", series, ResultOptions())
    with pytest.raises(PacsNodeError, match="extras_later"):
        build_extras_of(whole)
