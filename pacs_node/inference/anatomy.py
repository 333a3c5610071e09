"""Anatomical limits on a learned model's labels, declared per bundle (``pacs_node.anatomy``).

A network trained on phantoms has never seen a CT table, an arm beside the torso or the air
around a real patient, and may call any of them an organ. These rules make such labels
impossible whatever the network learned; they run on the source grid, before the per-label
clean-up, so a largest-component step cannot keep a blob the rules removed:

- **body inside the patient, and the patient all body** (CT, ``exclude_table``): the
  network's body is kept only within the classical patient mask
  (:func:`~pacs_node.inference.classical.patient_mask`: tissue above -500 HU, holes filled per
  slice, the table and head rest removed by their thinness). That
  mask is intersected as it is, not widened: its -500 HU boundary is the partial-volume midpoint
  between air and skin on the source grid, sharper than the network's 4 mm grid (on held-out
  phantoms the body's Dice rose from 0.977 to 0.979, where a 3 mm margin left it unchanged).
  Tissue (above -500 HU) the mask holds and no label claims becomes body
  (:data:`PATIENT_ADDED`; never air, so a lung the network missed is not hidden as body): arms
  at the sides, which no training phantom had, and the skin's partial-volume band (on phantoms with
  arms the outline's Dice rose from 0.935 to 0.975; without, from 0.998 to 1.000);
- **organs inside the body** (``confine_to_body``): the patient's outline is the union of body
  and organ labels, hole-filled per slice (on CT within the patient mask); of its connected
  parts only those holding at least :data:`KEEP_FRACTION` of the largest part's body voxels
  count (the trunk, and a limb next to it). An organ blob can still touch the body at one edge
  (a "lung" in the air beside the arm), so each connected piece of organ labels must also be
  enclosed: at most :data:`MAX_OPEN_SHARE` of the voxels around it in-plane may be background
  (an organ inside the patient is surrounded by body and other organs; one at the skin line
  still mostly is). Other labels outside the outline, and unenclosed pieces, become
  background. The body label itself is left to the rule above (an arm apart from the trunk
  is still the patient);
- **lungs hold air** (CT, ``air_only``): a declared label keeps only voxels below
  ``air_hu_max`` after a 3 x 3 in-plane mean, plus what they enclose in a slice (vessels inside
  a lung stay lung); the rest becomes body, or background outside the outline. MR has no HU:
  there the lungs are only confined to the body.

Each rule reports what it removed per label (:class:`Removal`), so a user sees why a volume
changed. A bundle that declares nothing is left as it is.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

import numpy as np
from numpy.typing import NDArray
from scipy import ndimage  # type: ignore[import-untyped,unused-ignore]

from pacs_node.imaging.postprocess import label_sizes
from pacs_node.inference.classical import AIR_BODY_HU, fill_slices, patient_mask

PATIENT_WORK_MM = 3.0  # the patient mask's decision grid: a 120-slice CT in about 3 s, not 9
KEEP_FRACTION = 0.10
MAX_OPEN_SHARE = 0.5
AIR_SMOOTHING_PIXELS = 3

Spacing = tuple[float, float, float]
Box = tuple[slice, ...]

OUTSIDE_PATIENT = "outside the patient"
OUTSIDE_BODY = "outside the body"
NOT_AIR = "not air"
PATIENT_ADDED = "inside the patient, added"  # the one rule that adds (to the body label)


@dataclass(frozen=True, slots=True)
class AnatomyRules:
    """What a bundle declares: ``body`` is the body's label value; ``air_only`` label values."""

    body: int
    confine_to_body: bool = True
    air_only: tuple[int, ...] = ()
    air_hu_max: float = -400.0
    exclude_table: bool = False

    @property
    def needs_hu(self) -> bool:
        return self.exclude_table or bool(self.air_only)


@dataclass(frozen=True, slots=True)
class Removal:
    """Voxels of label ``value`` one rule took away (``rule`` says which, in words), or, for
    :data:`PATIENT_ADDED`, gave the body."""

    value: int
    rule: str
    voxels: int
    ml: float


def _box(mask: NDArray[np.bool_], pad: tuple[int, int, int] = (0, 0, 0)) -> Box | None:
    """The bounding box of a mask's voxels widened by ``pad`` (within the array); None if empty."""
    (found,) = ndimage.find_objects(mask.view(np.uint8)) or [None]
    if found is None:
        return None
    return tuple(
        slice(max(0, int(b.start) - p), min(n, int(b.stop) + p))
        for b, p, n in zip(found, pad, mask.shape, strict=True)
    )


def body_outline(
    labels: NDArray[Any], body: int, patient: NDArray[np.bool_] | None = None
) -> NDArray[np.bool_]:
    """Where the patient is, by the labels: see the module docstring (organs inside the body).
    The connected parts are labelled inside the outline's bounding box only (memory)."""
    filled = fill_slices(labels != 0)
    if patient is not None:
        filled &= patient
    box = _box(filled)
    if box is None:
        return filled
    parts, count = ndimage.label(filled[box])
    in_body = label_sizes(parts, count, labels[box] == body)
    in_body[0] = 0
    if in_body.max(initial=0) == 0:
        return filled  # no body found: nothing to confine to beyond the patient
    keep = in_body >= KEEP_FRACTION * in_body.max()
    keep[0] = False
    result = np.zeros(labels.shape, dtype=bool)
    result[box] = keep[parts]
    return result


def unenclosed(labels: NDArray[Any], body: int) -> NDArray[np.bool_]:
    """Pieces of organ labels (3D-connected, any non-body label) more than
    :data:`MAX_OPEN_SHARE` of whose in-plane surroundings are background. Worked out inside
    the organs' bounding box, one pixel wider in-plane (all the surroundings look at)."""
    organs = labels != 0
    organs &= labels != body
    result = np.zeros(labels.shape, dtype=bool)
    box = _box(organs, (0, 1, 1))
    if box is None:
        return result
    parts, count = ndimage.label(organs[box])
    del organs
    cross = np.zeros((1, 3, 3), dtype=bool)
    cross[0, 1, :] = cross[0, :, 1] = True
    around = ndimage.grey_dilation(parts, footprint=cross)
    shell = (parts == 0) & (around > 0)
    total = np.bincount(around[shell], minlength=count + 1)
    shell &= labels[box] == 0
    open_ = np.bincount(around[shell], minlength=count + 1)
    drop = open_ > MAX_OPEN_SHARE * np.maximum(total, 1)
    drop[0] = False
    result[box] = drop[parts]
    return result


def aerated(hu: NDArray[Any], air_hu_max: float) -> NDArray[np.bool_]:
    """Voxels that hold air after a light in-plane smoothing (one noisy voxel is not air)."""
    size = (1, AIR_SMOOTHING_PIXELS, AIR_SMOOTHING_PIXELS)
    mean = ndimage.uniform_filter(np.asarray(hu, dtype=np.float32), size=size, mode="nearest")
    result: NDArray[np.bool_] = mean < air_hu_max
    return result


def _record(
    removals: list[Removal], labels: NDArray[Any], dropped: NDArray[np.bool_], rule: str, ml: float
) -> None:
    values, counts = np.unique(labels[dropped], return_counts=True)
    for value, count in zip(values.tolist(), counts.tolist(), strict=True):
        if value:
            removals.append(Removal(int(value), rule, int(count), round(count * ml, 1)))


def apply_anatomy(
    labels: NDArray[Any],
    rules: AnatomyRules,
    spacing: Spacing,
    hu: NDArray[Any] | None = None,
) -> tuple[NDArray[Any], list[Removal]]:
    """The labels with the declared rules applied, and what each removed. ``hu`` is the source
    CT in HU on the labels' grid; without it (MR) the HU rules are skipped."""
    out = labels.copy()
    removals: list[Removal] = []
    voxel_ml = float(np.prod(spacing)) / 1000.0
    patient: NDArray[np.bool_] | None = None
    if hu is not None and (rules.exclude_table or rules.confine_to_body):
        patient = patient_mask(hu, spacing, PATIENT_WORK_MM)
    if rules.exclude_table and patient is not None:
        dropped = out == rules.body
        dropped &= ~patient
        _record(removals, out, dropped, OUTSIDE_PATIENT, voxel_ml)
        out[dropped] = 0
        del dropped
        added = out == 0
        added &= patient
        added &= np.asarray(hu) > AIR_BODY_HU  # tissue, never air
        out[added] = rules.body
        _record(removals, out, added, PATIENT_ADDED, voxel_ml)
        del added
    if rules.confine_to_body:
        outside = ~body_outline(out, rules.body, patient)
        outside |= unenclosed(out, rules.body)
        outside &= out != 0
        outside &= out != rules.body
        _record(removals, out, outside, OUTSIDE_BODY, voxel_ml)
        out[outside] = 0
        del outside
    if rules.air_only and hu is not None:
        air = aerated(hu, rules.air_hu_max)
        for value in rules.air_only:
            mask = out == value
            if not mask.any():
                continue
            dropped = mask & ~fill_slices(mask & air)
            _record(removals, out, dropped, NOT_AIR, voxel_ml)
            out[dropped] = rules.body  # inside the outline (the rule above): body tissue
    return out, removals


def describe(removals: Iterable[Removal], names: dict[int, str]) -> list[str]:
    """One line per removal, for notes: ``lung_right: 369.4 mL outside the body removed``."""
    return [
        f"{names.get(r.value, str(r.value))}: {r.ml:g} mL ({r.voxels} voxels) {r.rule}"
        + ("" if r.rule == PATIENT_ADDED else " removed")
        for r in removals
    ]
