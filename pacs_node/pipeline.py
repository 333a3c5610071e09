"""One series through the model: spooled files -> :class:`Volume` -> model -> results.

The same chain for every caller: the job worker (which keeps the catalog's books around it),
``pacs-node segment`` (which writes files) and any later runner of jobs. It touches no catalog
and no network: paths, a :class:`Runner` and options in; the Volume, the segmentation, the
result objects, the quality gate's verdict and the seconds of each stage out.

The quality gate's limits are the model's with a route's overrides; they are looked up only
after the model ran, so a job for an unknown model fails in ``infer`` as it always did. The
heavy modules (pixel decoding, torch, highdicom) are imported on the first run, so that a
process that only supervises workers never loads them.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

from pacs_node.errors import PacsNodeError

if TYPE_CHECKING:
    from pacs_node.imaging.volume import Volume
    from pacs_node.inference.runner import Runner, Segmentation
    from pacs_node.quality import QualityLimits
    from pacs_node.quality.checks import Verdict
    from pacs_node.results import PrimaryResults, ResultOptions, ResultSet

DECODE, INFER, BUILD = "decode", "infer", "build"
# Where each stage starts, as a share of one series' run (the rest is the caller's: storing).
STAGE_SHARE: dict[str, float] = {DECODE: 0.0, INFER: 0.1, BUILD: 0.6}

StageHook = Callable[[str], None]  # called as each stage starts; may raise to abandon the run
Progress = Callable[[str], None]  # the model's own steps (load, preprocess, infer, postprocess)


def _no_hook(_stage: str) -> None:
    """For a caller that does not follow the stages."""


@dataclass
class Stopwatch:
    """Seconds per stage, in the order stages ran."""

    seconds: dict[str, float] = field(default_factory=dict)

    def add(self, stage: str, value: float) -> None:
        self.seconds[stage] = round(self.seconds.get(stage, 0.0) + value, 4)

    def as_json(self) -> dict[str, float]:
        total = sum(v for k, v in self.seconds.items() if k != "queued_s")
        return {**self.seconds, "total_s": round(total, 4)}


@dataclass(frozen=True)
class Gate:
    """The quality gate to apply: the model's limits with ``overrides`` (a route's
    ``qa_limits``); ``flag`` names a failed check in the SR, the PDF and the FHIR report."""

    overrides: Mapping[str, Any] | None = None
    flag: bool = False


@dataclass(frozen=True)
class SeriesRun:
    """What one series gave."""

    series_uid: str
    volume: Volume
    segmentation: Segmentation  # its timings include ``decode``
    results: ResultSet | None  # None when no results were asked for; the SEG and SR only
    # with ``extras_later`` (then :func:`build_extras_of` builds the rest)
    limits: QualityLimits | None  # the gate's, None without a gate
    verdict: Verdict | None  # the gate's, None without a gate
    primary: PrimaryResults | None = None  # with ``extras_later``: what the extras go on from


def run_series(
    runner: Runner,
    model: str,
    series_uid: str,
    paths: Sequence[Path],
    options: ResultOptions | None,
    *,
    gate: Gate | None = None,
    on_stage: StageHook = _no_hook,
    progress: Progress | None = None,
    timings: Stopwatch | None = None,
    extras_later: bool = False,
) -> SeriesRun:
    """Decode ``paths``, run ``model``, then build the result objects with ``options`` (None:
    only the gate's verdict, from the findings); with ``extras_later`` only the measurements,
    the gate, the SEG and the SR, so that the caller can send those before it builds the rest
    with :func:`build_extras_of`. Stage seconds go to ``timings`` as each stage
    ends (``decode_s``, the model's ``load_s`` .. ``postprocess_s``, ``build_s``), so a run cut
    short still shows where its time went."""
    from pacs_node.imaging.volume import load_series
    from pacs_node.quality import merge_limits

    watch = timings if timings is not None else Stopwatch()
    on_stage(DECODE)
    if not paths:
        raise PacsNodeError(f"series {series_uid} has no stored instances")
    started = time.perf_counter()
    volume = load_series(paths)
    decode = time.perf_counter() - started
    watch.add("decode_s", decode)
    on_stage(INFER)
    segmentation = runner.segment(model, volume, progress=progress)
    segmentation.timings.decode = decode
    for name, seconds in segmentation.timings.as_json().items():
        if name not in ("decode_s", "total_s"):
            watch.add(name, seconds)
    on_stage(BUILD)
    limits = None
    if gate is not None:
        overrides = dict(gate.overrides) if gate.overrides is not None else None
        limits = merge_limits(runner.registry.get(model).quality, overrides)
    started = time.perf_counter()
    built: ResultSet | None = None
    verdict: Verdict | None = None
    primary: PrimaryResults | None = None
    if options is not None:
        from pacs_node.results import build_primary, build_results

        if limits is not None and gate is not None:
            # held ones too: released later, they reach the PACS with the failed checks named
            options = replace(options, quality=limits, quality_flag=gate.flag)
        if extras_later:
            primary = build_primary(volume, segmentation.labelmap, segmentation.model, options)
            built = primary.results
        else:
            built = build_results(volume, segmentation.labelmap, segmentation.model, options)
        verdict = built.verdict
    elif limits is not None:
        from pacs_node.quality.checks import run_checks
        from pacs_node.results import measure_labelmap

        findings = measure_labelmap(volume, segmentation.labelmap)
        verdict = run_checks(volume, findings, limits, segmentation.labelmap)
    watch.add("build_s", time.perf_counter() - started)
    return SeriesRun(series_uid, volume, segmentation, built, limits, verdict, primary)


def build_extras_of(run: SeriesRun, timings: Stopwatch | None = None) -> ResultSet:
    """The presentation state, key images, PDF and FHIR Bundles of a run made with
    ``extras_later``; their seconds are added to ``build_s``."""
    from pacs_node.results import build_extras

    if run.primary is None:
        raise PacsNodeError(f"series {run.series_uid} was not run with extras_later")
    started = time.perf_counter()
    extras = build_extras(run.volume, run.segmentation.labelmap, run.primary)
    if timings is not None:
        timings.add("build_s", time.perf_counter() - started)
    return extras
