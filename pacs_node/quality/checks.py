"""The gate's checks: pure, computed from what :mod:`pacs_node.results.measurements` already
measured (one :class:`Finding` per label) plus the input volume.

Each failed check has a stable id, the label, the measured value, the limit and a sentence a
radiologist understands. A value that could not be measured (no pixel spacing, a label not
found) is never a failure: the gate only judges what it can see.

Check ids::

    side_conflict     a lateralised label's centre on the other side of the patient (always)
    size_range        volume (mL) or area (cm2) outside the label's normal range
    pair_balance      left/right pair: larger over smaller above ``pair_ratio_max``, or one
                      side found whole and the other not at all
    position_side     centre on the other side of the patient's midline than ``sides`` says
                      (within the midline band passes: a large organ may reach it)
    position_order    ``upper``'s centre not superior to ``lower``'s (``order``, 3D series)
    fragmented        more separate pieces than ``max_components``
    coverage_slices   a label in fewer than ``min_slices`` inner slices of a long series
    coverage_image    a label (not the body) covering more than ``max_image_fraction``
    input_intensity   the input's percentiles far from the training renders' (``intensity``)

A 3D label that touches a face of the imaged volume (the series' first or last slice, or the
first or last row or column: the edge of the field of view, whatever the series' orientation)
is a part of the organ: pairs and positions are not judged on it, nor is its size against the
range's floor (a part may be any size; the ceiling still holds).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np
from numpy.typing import NDArray

from pacs_node.imaging.volume import Volume, VolumeKind
from pacs_node.quality.limits import Intensity, QualityLimits

if TYPE_CHECKING:  # measurements imports the results package, which runs the gate
    from pacs_node.inference.labelmap import Labelmap
    from pacs_node.results.measurements import Finding

BODY = "body"
_PAIRS = ("_left", "_right")


@dataclass(frozen=True)
class FailedCheck:
    """One check a result failed."""

    check: str  # stable id (see the module docstring)
    label: str  # the label's vocabulary name, "" for a check on the input
    value: str  # what was measured, with its unit
    limit: str  # the limit it broke
    message: str  # one sentence for a radiologist

    def as_json(self) -> dict[str, str]:
        return {
            "check": self.check,
            "label": self.label,
            "value": self.value,
            "limit": self.limit,
            "message": self.message,
        }


@dataclass(frozen=True)
class Verdict:
    """The gate's answer for one result: passed, or the checks it failed."""

    failures: tuple[FailedCheck, ...] = ()

    @property
    def passed(self) -> bool:
        return not self.failures

    @property
    def status(self) -> str:
        return "pass" if self.passed else "fail"

    def sentences(self) -> list[str]:
        return [f.message for f in self.failures]

    def labels(self) -> set[str]:
        return {f.label for f in self.failures if f.label}

    def as_json(self) -> dict[str, Any]:
        return {"verdict": self.status, "failures": [f.as_json() for f in self.failures]}

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> Verdict:
        return cls(tuple(FailedCheck(**item) for item in data.get("failures", [])))


def cut_by_volume(volume: Volume, finding: Finding) -> bool:
    """Whether a face of a 3D series' voxel grid cuts the label (its first or last slice, row
    or column: the series' ends or the field's edge, along whichever patient axis each runs):
    its size and centre are then of a part, so pairs and positions are not judged on it."""
    if volume.kind is not VolumeKind.SERIES or finding.index_box is None:
        return False
    return any(
        first == 0 or last >= size - 1
        for (first, last), size in zip(finding.index_box, volume.shape, strict=True)
    )


def _size(finding: Finding) -> tuple[float, str] | None:
    if finding.volume_ml is not None:
        return finding.volume_ml, "mL"
    if finding.area_cm2 is not None:
        return finding.area_cm2, "cm2"
    return None


def _sizes(volume: Volume, findings: Sequence[Finding], limits: QualityLimits) -> list[FailedCheck]:
    out = []
    for finding in findings:
        normal = limits.sizes.get(finding.segment.name)
        size = _size(finding)
        if normal is None or size is None or not finding.present:
            continue
        value, unit = size
        part = cut_by_volume(volume, finding)
        low = normal.min is not None and value < normal.min and not part
        high = normal.max is not None and value > normal.max
        if low or high:
            word = "smaller" if low else "larger"
            out.append(
                FailedCheck(
                    "size_range",
                    finding.segment.name,
                    f"{value:.1f} {unit}",
                    f"{normal.text()} {unit}",
                    f"{finding.label} measures {value:.1f} {unit}, {word} than the normal range "
                    f"{normal.text()} {unit}: check the segmentation",
                )
            )
    return out


def _sides(findings: Sequence[Finding], limits: QualityLimits) -> list[FailedCheck]:
    out = []
    for finding in findings:
        side = finding.centroid_side
        if not finding.present or side is None:
            continue
        if finding.side_conflict:
            out.append(
                FailedCheck(
                    "side_conflict",
                    finding.segment.name,
                    side.value,
                    "the side in its name",
                    f"{finding.label} lies on the patient's {side.value}: a left/right swap or a "
                    "wrong image orientation",
                )
            )
            continue
        wanted = limits.sides.get(finding.segment.name)
        if wanted is not None and side.value in ("left", "right") and side.value != wanted:
            out.append(
                FailedCheck(
                    "position_side",
                    finding.segment.name,
                    side.value,
                    wanted,
                    f"{finding.label} lies on the patient's {side.value} side, where it is "
                    f"expected on the {wanted}",
                )
            )
    return out


def _missing_sides(findings: Sequence[Finding], whole: dict[str, Finding]) -> list[FailedCheck]:
    """One side of a pair found whole (the series covers its level) and the other not at all:
    the model missed it, or the patient lacks it; either way a person should look."""
    present = {f.segment.name for f in findings if f.present}
    named = {f.segment.name: f for f in findings}
    out = []
    for name, found in whole.items():
        for own, other in (_PAIRS, _PAIRS[::-1]):
            if not name.endswith(own):
                continue
            partner = name[: -len(own)] + other
            if partner in named and partner not in present:
                out.append(
                    FailedCheck(
                        "pair_balance",
                        name[: -len(own)],
                        "one side absent",
                        "both sides",
                        f"{found.label} was found but {named[partner].label} was not: "
                        "the model may have missed it",
                    )
                )
    return out


def _pairs(volume: Volume, findings: Sequence[Finding], limits: QualityLimits) -> list[FailedCheck]:
    if limits.pair_ratio_max is None:
        return []
    by_name = {f.segment.name: f for f in findings if f.present and not cut_by_volume(volume, f)}
    out = _missing_sides(findings, by_name)
    for name, left in by_name.items():
        if not name.endswith(_PAIRS[0]):
            continue
        stem = name[: -len(_PAIRS[0])]
        right = by_name.get(stem + _PAIRS[1])
        sizes = (_size(left), _size(right)) if right is not None else (None, None)
        if right is None or sizes[0] is None or sizes[1] is None:
            continue
        a, b = sizes[0][0], sizes[1][0]
        if min(a, b) <= 0:
            continue
        ratio = max(a, b) / min(a, b)
        if ratio > limits.pair_ratio_max:
            bigger = left if a > b else right
            out.append(
                FailedCheck(
                    "pair_balance",
                    stem,
                    f"{ratio:.2f}",
                    f"at most {limits.pair_ratio_max:g}",
                    f"{bigger.label} is {ratio:.1f} times the size of its pair "
                    f"(at most {limits.pair_ratio_max:g} expected): one side may be missed",
                )
            )
    return out


def _order(volume: Volume, findings: Sequence[Finding], limits: QualityLimits) -> list[FailedCheck]:
    if volume.kind is not VolumeKind.SERIES:
        return []
    by_name = {
        f.segment.name: f
        for f in findings
        if f.present and f.centroid_lps is not None and not cut_by_volume(volume, f)
    }
    out = []
    for rule in limits.order:
        upper, lower = by_name.get(rule.upper), by_name.get(rule.lower)
        top = upper.centroid_lps if upper is not None else None
        bottom = lower.centroid_lps if lower is not None else None
        if upper is None or lower is None or top is None or bottom is None:
            continue
        gap = top[2] - bottom[2]  # LPS: +z is superior
        if gap <= 0:
            out.append(
                FailedCheck(
                    "position_order",
                    rule.upper,
                    f"{gap:.0f} mm",
                    f"above {rule.lower}",
                    f"{upper.label} lies {abs(gap):.0f} mm below {lower.label}, where it is "
                    "expected above it",
                )
            )
    return out


def _components(findings: Sequence[Finding], limits: QualityLimits) -> list[FailedCheck]:
    out = []
    for finding in findings:
        most = limits.max_components.get(finding.segment.name)
        if most is not None and finding.present and finding.components > most:
            out.append(
                FailedCheck(
                    "fragmented",
                    finding.segment.name,
                    f"{finding.components} parts",
                    f"at most {most}",
                    f"{finding.label} is in {finding.components} separate parts (at most {most} "
                    "expected): read its numbers with care",
                )
            )
    return out


def _coverage(
    volume: Volume, findings: Sequence[Finding], limits: QualityLimits
) -> list[FailedCheck]:
    out = []
    slices = volume.shape[0]
    total = float(np.prod(volume.shape))
    for finding in findings:
        if not finding.present:
            continue
        name = finding.segment.name
        least = limits.min_slices
        if (
            least is not None
            and volume.kind is VolumeKind.SERIES
            and finding.slice_range is not None
            and slices >= 4 * least
            and finding.slice_range[0] > 0
            and finding.slice_range[1] < slices - 1  # one cut by the series' end may be small
        ):
            span = finding.slice_range[1] - finding.slice_range[0] + 1
            if span < least:
                out.append(
                    FailedCheck(
                        "coverage_slices",
                        name,
                        f"{span} of {slices} slices",
                        f"at least {least} slices",
                        f"{finding.label} is found in only {span} of {slices} slices: "
                        "too little to be the organ",
                    )
                )
        most = limits.max_image_fraction
        if most is not None and name != BODY:
            fraction = finding.voxel_count / total
            if fraction > most:
                out.append(
                    FailedCheck(
                        "coverage_image",
                        name,
                        f"{100 * fraction:.0f} %",
                        f"at most {100 * most:.0f} %",
                        f"{finding.label} covers {100 * fraction:.0f} % of the whole image: "
                        "the model did not find the anatomy",
                    )
                )
    return out


def input_percentiles(
    volume: Volume, labelmap: Labelmap | None, percentiles: Sequence[float]
) -> list[float]:
    """The input's intensity percentiles inside the body label (the whole image without one):
    raw values on CT (HU), else the image scaled to its own 1st-99th percentile range.

    The body's voxels are picked before they become float32 (the same values), so a CT is not
    copied whole."""
    raw = np.asarray(volume.voxels)
    inside: NDArray[np.float32] | None = None
    if labelmap is not None:
        body = [s.value for s in labelmap.segments if s.name == BODY]
        if body:
            picked = raw[labelmap.labels == body[0]]
            if picked.size:
                inside = picked.astype(np.float32)
    if volume.modality.upper() != "CT":
        voxels = np.asarray(raw, dtype=np.float32)
        low, high = np.percentile(voxels, [1.0, 99.0])
        inside = ((voxels if inside is None else inside) - low) / max(float(high - low), 1e-6)
    if inside is None:
        inside = np.asarray(raw, dtype=np.float32)
    return [float(v) for v in np.nanpercentile(inside, list(percentiles))]


def _intensity(
    volume: Volume, labelmap: Labelmap | None, rule: Intensity | None
) -> list[FailedCheck]:
    if rule is None or volume.voxels.size == 0:
        return []
    measured = input_percentiles(volume, labelmap, rule.percentiles)
    finite = all(np.isfinite(measured))
    worst = max(
        range(len(measured)),
        key=lambda i: abs(measured[i] - rule.reference[i]) if finite else 0.0,
        default=0,
    )
    off = abs(measured[worst] - rule.reference[worst])
    if finite and off <= rule.tolerance:  # no finite values at all: nothing the model knows
        return []
    p = rule.percentiles[worst]
    return [
        FailedCheck(
            "input_intensity",
            "",
            f"P{p:g} {measured[worst]:.3g}",
            f"{rule.reference[worst]:.3g} +/- {rule.tolerance:g}",
            f"the image's intensities (P{p:g} {measured[worst]:.3g}, training images "
            f"{rule.reference[worst]:.3g}) lie outside what the model was trained on: its "
            "result may not hold",
        )
    ]


def run_checks(
    volume: Volume,
    findings: Sequence[Finding],
    limits: QualityLimits,
    labelmap: Labelmap | None = None,
) -> Verdict:
    """Every check ``limits`` enables, on one result; a wrong side always counts."""
    failures = [
        *_sides(findings, limits),
        *_sizes(volume, findings, limits),
        *_pairs(volume, findings, limits),
        *_order(volume, findings, limits),
        *_components(findings, limits),
        *_coverage(volume, findings, limits),
        *_intensity(volume, labelmap, limits.intensity),
    ]
    return Verdict(tuple(failures))
