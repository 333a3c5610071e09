"""Overlap and surface-distance metrics of one label, in mm on the source grid.

HD95 is the larger of the two directed 95th-percentile surface distances (as MONAI's
``compute_hausdorff_distance(percentile=95)``); ASD is the mean of both directed distance sets.
Either is undefined when the prediction or the truth is empty: reported as None and counted,
never replaced by an invented number.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

import numpy as np
from numpy.typing import NDArray
from scipy import ndimage  # type: ignore[import-untyped,unused-ignore]


@dataclass(frozen=True)
class LabelMetrics:
    dice: float
    iou: float
    precision: float | None
    recall: float | None
    hd95_mm: float | None
    asd_mm: float | None
    volume_ml: float
    truth_volume_ml: float
    volume_error_pct: float | None

    def as_json(self) -> dict[str, Any]:
        return {k: (None if v is None else round(float(v), 4)) for k, v in asdict(self).items()}


def _surface(mask: NDArray[np.bool_]) -> NDArray[np.bool_]:
    eroded = ndimage.binary_erosion(mask, border_value=0)
    return np.asarray(mask & ~eroded)


def surface_distances(
    pred: NDArray[np.bool_], truth: NDArray[np.bool_], spacing: tuple[float, ...]
) -> tuple[NDArray[np.float64], NDArray[np.float64]] | None:
    """Distances (mm) from each predicted surface voxel to the truth surface and back; None
    when either mask is empty."""
    if not pred.any() or not truth.any():
        return None
    both = pred | truth
    lo = [max(0, int(i.min()) - 2) for i in np.nonzero(both)]
    hi = [int(i.max()) + 3 for i in np.nonzero(both)]
    box = tuple(slice(a, b) for a, b in zip(lo, hi, strict=True))
    p = np.pad(pred[box], 1)
    t = np.pad(truth[box], 1)
    sp, st = _surface(p), _surface(t)
    to_truth = ndimage.distance_transform_edt(~st, sampling=spacing)
    to_pred = ndimage.distance_transform_edt(~sp, sampling=spacing)
    return np.asarray(to_truth[sp], dtype=np.float64), np.asarray(to_pred[st], dtype=np.float64)


def label_metrics(
    pred: NDArray[np.bool_], truth: NDArray[np.bool_], spacing: tuple[float, float, float]
) -> LabelMetrics:
    """All metrics of one label. A one-slice grid (a radiograph) is measured in 2D."""
    if pred.shape != truth.shape:
        raise ValueError(f"prediction {pred.shape} and truth {truth.shape} differ in shape")
    voxel_ml = float(np.prod(spacing)) / 1000.0
    sp: tuple[float, ...] = spacing
    if pred.ndim == 3 and pred.shape[0] == 1:
        pred, truth, sp = pred[0], truth[0], spacing[1:]
        voxel_ml = float(np.prod(sp)) / 1000.0  # mm^2 / 1000: "area" on a radiograph
    inter = int(np.count_nonzero(pred & truth))
    n_pred, n_truth = int(np.count_nonzero(pred)), int(np.count_nonzero(truth))
    union = n_pred + n_truth - inter
    dice = 1.0 if n_pred + n_truth == 0 else 2.0 * inter / (n_pred + n_truth)
    iou = 1.0 if union == 0 else inter / union
    distances = surface_distances(pred, truth, sp)
    hd95 = asd = None
    if distances is not None:
        a, b = distances
        hd95 = float(max(np.percentile(a, 95), np.percentile(b, 95)))
        asd = float(np.concatenate([a, b]).mean())
    return LabelMetrics(
        dice=dice,
        iou=iou,
        precision=inter / n_pred if n_pred else None,
        recall=inter / n_truth if n_truth else None,
        hd95_mm=hd95,
        asd_mm=asd,
        volume_ml=n_pred * voxel_ml,
        truth_volume_ml=n_truth * voxel_ml,
        volume_error_pct=100.0 * (n_pred - n_truth) / n_truth if n_truth else None,
    )
