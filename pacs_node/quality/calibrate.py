"""``python -m pacs_node.quality.calibrate``: derive a model's default gate limits from its own
results on phantom renders, and measure how often the gate holds a held-out phantom result.

Limits come from the model's output on seeds it was not trained on (the recipe's validation
range), never typed by hand, so a re-run gives the same numbers::

    python -m pacs_node.quality.calibrate MODEL MODALITY FIRST LAST [M F L]... [--write]
    python -m pacs_node.quality.calibrate MODEL MODALITY FIRST LAST [M F L]... --check

The first form renders seeds FIRST..LAST-1 with the training ranges (``phantom.render``; each
further triple adds a set, e.g. ``demo 100 106``: the short studies ``pacs-node demo`` sends),
runs the model on each through the DICOM path the node uses, and prints the limits (``--write``
stores them under ``pacs_node.quality`` in the bundle's ``configs/metadata.json``). The second
runs the gate with the bundle's stored limits on the seeds given (the held-out set of ``make
eval``) and prints how many results it would hold (the false-hold rate: every phantom result
is a plausible one; ``MODALITY:SET`` renders one of ``python -m phantom``'s sets, such as
``MR:sequences``) and keeps the report in the bundle's ``eval/gate/`` for its model card;
MODALITY ``demo`` checks the studies ``pacs-node demo`` sends. Needs
``models/`` on ``PYTHONPATH`` for the phantom generator.

How each limit follows from what the model gave (``n`` seeds):

- ``sizes``: per label, [0.25 x the smallest whole one, 1.5 x the largest]: the floor only
  from results the series did not cut (a cut organ is exempt from it, see
  :mod:`~pacs_node.quality.checks`), none when every result was cut; the ceiling from all
  (it catches a lung in the air outside the patient);
- ``pair_ratio_max``: 1.5 x the largest left/right ratio seen between pairs the series did not
  cut (see :func:`cut_by_volume`), at least 3;
- ``sides``: an unpaired label whose centre lay on the same side of the midline in every seed;
- ``order``: (upper, lower) among lungs, heart, liver, spleen and kidneys whose centres lay at
  least 20 mm apart in that order in every seed where the series cut neither (at least 3);
- ``max_components``: 2 x the most pieces seen plus 1, for structures that are one piece;
- ``min_slices``: 2 on 3D series (a label in one inner slice of a long series is no organ);
- ``max_image_fraction``: 2 x the largest fraction of the image any label but the body
  covered, at most 0.9;
- ``intensity``: the median over seeds of the input's 5th, 50th and 95th percentiles inside
  the body, with a tolerance of 3 x the largest deviation seen (floor: 50 HU on CT, 0.1
  otherwise).
"""

from __future__ import annotations

import json
import statistics
import sys
import tempfile
from collections import Counter
from collections.abc import Iterable
from dataclasses import replace
from pathlib import Path
from typing import Any

from pacs_node.imaging.volume import Volume, VolumeKind, load_series
from pacs_node.inference.labelmap import Labelmap
from pacs_node.inference.registry import METADATA, Registry
from pacs_node.inference.runner import Runner
from pacs_node.quality.checks import cut_by_volume, input_percentiles, run_checks
from pacs_node.quality.limits import QUALITY_KEY, QualityLimits
from pacs_node.results.measurements import Finding, measure_labelmap

PERCENTILES = (5.0, 50.0, 95.0)
ORDER_CANDIDATES = ("lung_left", "lung_right", "heart", "liver", "spleen", "kidney_left",
                    "kidney_right")  # fmt: skip
ORDER_GAP_MM = 20.0
ORDER_MIN_CASES = 3


def render_volume(modality: str, seed: int) -> Volume:
    """One phantom render as the node loads it (DICOM files, then :func:`load_series`);
    modality ``demo``: the study ``pacs-node demo`` sends for that seed."""
    from phantom.render import render
    from phantom.writers import write_dicom

    with tempfile.TemporaryDirectory() as folder:
        if modality == "demo":
            from pacs_node.demo import make_study

            return load_series(make_study(Path(folder), seed)[1])
        if ":" in modality:  # MODALITY:SET, one of `python -m phantom`'s sets
            from phantom.__main__ import SETS
            from phantom.render import DEFAULTS, modality_key

            modality, name = modality.split(":", 1)
            ranges = replace(DEFAULTS[modality_key(modality)], **SETS[name])
            return load_series(write_dicom(render(modality, seed, ranges), Path(folder)))
        return load_series(write_dicom(render(modality, seed), Path(folder)))


def results(
    runner: Runner, model: str, modality: str, seeds: Iterable[int]
) -> list[tuple[Volume, Labelmap, tuple[Finding, ...]]]:
    """The model's result on each seed's render, measured as the node measures it."""
    out = []
    for seed in seeds:
        volume = render_volume(modality, seed)
        labelmap = runner.segment(model, volume).labelmap
        out.append((volume, labelmap, measure_labelmap(volume, labelmap)))
        sys.stderr.write(f"{model} seed {seed} done\n")
    return out


def _size(finding: Finding) -> float | None:
    return finding.volume_ml if finding.volume_ml is not None else finding.area_cm2


def derive(cases: list[tuple[Volume, Labelmap, tuple[Finding, ...]]]) -> dict[str, Any]:
    """The limits (as metadata.json holds them) from the model's results on ``cases``."""
    sizes: dict[str, list[float]] = {}
    whole_sizes: dict[str, list[float]] = {}
    sides: dict[str, set[str]] = {}
    pieces: dict[str, int] = {}
    ratios: list[float] = [1.0]
    fractions: list[float] = [0.0]
    gaps: dict[tuple[str, str], list[float]] = {}
    percentiles: list[list[float]] = []
    three_d = all(v.kind is VolumeKind.SERIES for v, _, _ in cases)
    ct = all(v.modality.upper() == "CT" for v, _, _ in cases)
    for volume, labelmap, findings in cases:
        present = {f.segment.name: f for f in findings if f.present}
        whole = {n: f for n, f in present.items() if not cut_by_volume(volume, f)}
        total = float(volume.voxels.size)
        for name, finding in present.items():
            size = _size(finding)
            if size is not None:
                sizes.setdefault(name, []).append(size)
                if name in whole:
                    whole_sizes.setdefault(name, []).append(size)
            side = finding.centroid_side
            if finding.segment.structure.laterality is None and name != "body":
                sides.setdefault(name, set()).add(side.value if side is not None else "?")
            if finding.segment.structure.one_piece:
                pieces[name] = max(pieces.get(name, 0), finding.components)
            if name != "body":
                fractions.append(finding.voxel_count / total)
        for name, left in whole.items():
            right = whole.get(name.removesuffix("_left") + "_right")
            if name.endswith("_left") and right is not None:
                a, b = _size(left), _size(right)
                if a and b:
                    ratios.append(max(a, b) / min(a, b))
        for upper in ORDER_CANDIDATES:
            for lower in ORDER_CANDIDATES:
                u, low = whole.get(upper), whole.get(lower)
                if upper == lower or u is None or low is None:
                    continue
                if u.centroid_lps is None or low.centroid_lps is None:
                    continue
                gaps.setdefault((upper, lower), []).append(u.centroid_lps[2] - low.centroid_lps[2])
        percentiles.append(input_percentiles(volume, labelmap, PERCENTILES))
    reference = [statistics.median(p[i] for p in percentiles) for i in range(len(PERCENTILES))]
    spread = max(abs(p[i] - reference[i]) for p in percentiles for i in range(len(PERCENTILES)))
    limits: dict[str, Any] = {
        "sizes": {
            name: {"max": round(1.5 * max(values), 1)}
            | ({"min": round(0.25 * min(whole_sizes[name]), 1)} if whole_sizes.get(name) else {})
            for name, values in sorted(sizes.items())
        },
        "pair_ratio_max": round(max(3.0, 1.5 * max(ratios)), 2),
        "sides": {
            name: next(iter(seen))
            for name, seen in sorted(sides.items())
            if len(seen) == 1 and next(iter(seen)) in ("left", "right")
        },
        "max_components": {name: 2 * most + 1 for name, most in sorted(pieces.items())},
        "max_image_fraction": round(min(0.9, 2 * max(fractions)), 3),
        "intensity": {
            "percentiles": list(PERCENTILES),
            "reference": [round(v, 3) for v in reference],
            "tolerance": round(max(50.0 if ct else 0.1, 3 * spread), 3),
        },
    }
    if three_d:
        limits["min_slices"] = 2
        limits["order"] = [
            {"upper": upper, "lower": lower}
            for (upper, lower), seen in sorted(gaps.items())
            if len(seen) >= ORDER_MIN_CASES and min(seen) >= ORDER_GAP_MM
        ]
    return QualityLimits.model_validate(limits).model_dump(mode="json", exclude_none=True)


def write_limits(bundle_root: Path, limits: dict[str, Any], source: str) -> None:
    """Store ``limits`` under ``pacs_node.quality`` in the bundle's metadata.json (only that key
    changes)."""
    path = bundle_root / METADATA
    data = json.loads(path.read_text(encoding="utf-8"))
    limits = {**limits, "intensity": {**limits["intensity"], "source": source}}
    node = data.setdefault("pacs_node", {})
    node[QUALITY_KEY] = limits
    node.pop("quality_note", None)  # limits carried from earlier weights: now these weights'
    path.write_text(json.dumps(data, indent=2) + "\n", encoding="utf-8")


def write_verdicts(bundle_root: Path, report: dict[str, Any]) -> Path:
    """Keep a ``--check`` report beside the bundle's evaluations (``eval/gate/``), where the
    model card reads the false-hold rates from."""
    name = "_".join(s.replace(" ", "-").replace(":", "-") for s in report["sets"])
    path = bundle_root / "eval" / "gate" / f"{name}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(report, indent=1) + "\n", encoding="utf-8")
    return path


def check(
    cases: list[tuple[Volume, Labelmap, tuple[Finding, ...]]], limits: QualityLimits
) -> dict[str, Any]:
    """How many of ``cases`` the gate would hold, and which checks failed."""
    failed = 0
    checks: Counter[str] = Counter()
    for volume, labelmap, findings in cases:
        verdict = run_checks(volume, findings, limits, labelmap)
        if not verdict.passed:
            failed += 1
            checks.update(f"{f.check}:{f.label}" for f in verdict.failures)
    return {
        "cases": len(cases),
        "held": failed,
        "false_hold_rate": round(failed / max(1, len(cases)), 3),
        "failed_checks": dict(checks),
    }


def main(argv: list[str]) -> int:
    args = [a for a in argv if not a.startswith("--")]
    if len(args) < 4 or (len(args) - 1) % 3:
        sys.stderr.write(
            "usage: python -m pacs_node.quality.calibrate MODEL MODALITY FIRST LAST "
            "[MODALITY FIRST LAST ...] [--write | --check]\n"
        )
        return 2
    model, sets = args[0], args[1:]
    registry = Registry(Path("models"))
    runner = Runner(registry)
    cases = []
    for at in range(0, len(sets), 3):
        modality, first, last = sets[at : at + 3]
        cases += results(runner, model, modality, range(int(first), int(last)))
    command = f"python -m pacs_node.quality.calibrate {' '.join(args)}"
    if "--check" in argv:
        report = check(cases, registry.get(model).quality)
        report["sets"] = [" ".join(sets[at : at + 3]) for at in range(0, len(sets), 3)]
        report["command"] = f"{command} --check"
        sys.stdout.write(json.dumps(report, indent=1) + "\n")
        write_verdicts(registry.get(model).root, report)
        return 0
    limits = derive(cases)
    sys.stdout.write(json.dumps(limits, indent=1) + "\n")
    if "--write" in argv:
        write_limits(registry.get(model).root, limits, f"{command} --write")
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
