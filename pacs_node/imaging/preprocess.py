"""What a model bundle declares it needs before inference: a grid (spacing and axis orientation)
and an intensity recipe (window, range scaling, z-score, optional smoothing).

Resampling goes through :class:`~pacs_node.imaging.volume.Grid` affines only, so the way back
(:mod:`pacs_node.imaging.postprocess`) uses the very same geometry and is exact. Work is done in
slabs of output slices so memory stays near the size of the output array.
"""

from __future__ import annotations

from typing import Any, Literal

import numpy as np
from numpy.typing import NDArray
from scipy import ndimage  # type: ignore[import-untyped,unused-ignore]

from pacs_node.errors import VolumeError
from pacs_node.imaging.volume import Grid, Volume

_AXIS = {
    "L": (1.0, 0.0, 0.0),
    "R": (-1.0, 0.0, 0.0),
    "P": (0.0, 1.0, 0.0),
    "A": (0.0, -1.0, 0.0),
    "S": (0.0, 0.0, 1.0),
    "I": (0.0, 0.0, -1.0),
}
_PAIRS = ("LR", "PA", "SI")
SLAB_VOXELS = 4_000_000  # output voxels per slab: bounds the coordinate work per step


def orientation_matrix(code: str) -> NDArray[np.float64]:
    """Direction matrix (columns x, y, z in LPS) for a three-letter axis code.

    Letters say where the x (column), y (row) and z (slice) indices point, as nibabel's axcodes
    do for an (x, y, z) array: ``"LPS"`` is the identity, ``"RAS"`` flips x and y (MONAI's
    ``Orientation("RAS")`` on the transposed array).
    """
    letters = code.upper()
    if len(letters) != 3 or any(c not in _AXIS for c in letters):
        raise ValueError(f"orientation code {code!r}: need three letters from L/R, P/A, S/I")
    if sorted(next(i for i, p in enumerate(_PAIRS) if c in p) for c in letters) != [0, 1, 2]:
        raise ValueError(f"orientation code {code!r}: each of L/R, P/A, S/I exactly once")
    return np.array([_AXIS[c] for c in letters], dtype=np.float64).T


def target_grid(
    source: Grid,
    spacing: tuple[float, float, float] | None = None,
    orientation: str | NDArray[np.float64] | None = None,
) -> Grid:
    """The grid a model sees: ``spacing`` (z, y, x mm; None keeps the source's) along axes of
    ``orientation`` (an axis code, a 3x3 direction matrix with columns x, y, z, or None to keep
    the source axes), covering the whole field of view of ``source`` and centred on it."""
    if orientation is None:
        axes = source.affine[:3, :3] / np.linalg.norm(source.affine[:3, :3], axis=0)
    elif isinstance(orientation, str):
        axes = orientation_matrix(orientation)[:, ::-1]  # array order z, y, x
    else:
        matrix = np.asarray(orientation, dtype=np.float64)
        if matrix.shape != (3, 3) or not np.allclose(matrix.T @ matrix, np.eye(3), atol=1e-6):
            raise ValueError("orientation matrix must be 3x3 with orthonormal columns")
        axes = matrix[:, ::-1]
    step = np.asarray(source.spacing if spacing is None else spacing, dtype=np.float64)
    if step.shape != (3,) or np.any(step <= 0):
        raise ValueError(f"target spacing must be three positive numbers, got {spacing}")
    # Corners of the source field of view (voxel edges, not centres) in the target axes.
    shape = np.array(source.shape, dtype=np.float64)
    corners = np.array(
        [[a, b, c] for a in (-0.5, shape[0] - 0.5) for b in (-0.5, shape[1] - 0.5)
         for c in (-0.5, shape[2] - 0.5)]
    )  # fmt: skip
    projected = source.index_to_patient(corners) @ axes
    low, high = projected.min(axis=0), projected.max(axis=0)
    counts = np.maximum(1, np.ceil((high - low) / step - 1e-6)).astype(int)
    centre = (low + high) / 2.0
    first = centre - (counts - 1) / 2.0 * step
    affine = np.eye(4)
    affine[:3, :3] = axes * step
    affine[:3, 3] = axes @ first
    affine.setflags(write=False)
    return Grid((int(counts[0]), int(counts[1]), int(counts[2])), affine)


def resample(
    array: NDArray[Any],
    source: Grid,
    target: Grid,
    *,
    order: Literal[0, 1, 3] = 1,
    fill: float = 0.0,
    dtype: np.dtype[Any] | type[Any] | None = None,
) -> NDArray[Any]:
    """Values of ``array`` (on ``source``) at the voxel centres of ``target``.

    ``order`` 0 is nearest neighbour (labels), 1 trilinear, 3 cubic spline. Points outside the
    source get ``fill``. Processed slab by slab along the target's first axis.
    """
    if array.shape != source.shape:
        raise ValueError(f"array shape {array.shape} does not match its grid {source.shape}")
    # target index -> source index
    matrix = np.asarray(np.linalg.solve(source.affine, target.affine), dtype=np.float64)
    out_dtype = np.dtype(dtype) if dtype is not None else array.dtype
    out = np.empty(target.shape, dtype=out_dtype)
    # Interpolation writes float32 slabs straight from the source: no full-size converted copy
    # (cubic splines excepted: scipy prefilters the whole input once).
    part_dtype = array.dtype if order == 0 else np.dtype(np.float32)
    per_slice = max(1, target.shape[1] * target.shape[2])
    slab = max(1, SLAB_VOXELS // per_slice)
    for z0 in range(0, target.shape[0], slab):
        z1 = min(target.shape[0], z0 + slab)
        offset = matrix[:3, 3] + matrix[:3, 0] * z0
        part = ndimage.affine_transform(
            array,
            matrix[:3, :3],
            offset=offset,
            output_shape=(z1 - z0, target.shape[1], target.shape[2]),
            order=order,
            mode="nearest",
            prefilter=order > 1,
            output=part_dtype,
        )
        part[outside_mask(matrix, z0, part.shape, source.shape)] = fill
        if np.issubdtype(out_dtype, np.integer) and order > 0:
            part = np.rint(part)
        out[z0:z1] = part
    return out


def outside_mask(
    matrix: NDArray[np.float64], z0: int, shape: tuple[int, int, int], model: tuple[int, ...]
) -> NDArray[np.bool_]:
    """Output voxels of slab ``z0`` whose centre, mapped by ``matrix`` (output index to input
    index), falls outside the input grid's voxels (beyond half a voxel past the edge centres)."""
    z, y, x = np.meshgrid(
        np.arange(z0, z0 + shape[0], dtype=np.float64),
        np.arange(shape[1], dtype=np.float64),
        np.arange(shape[2], dtype=np.float64),
        indexing="ij",
        sparse=True,
    )
    result = np.zeros(shape, dtype=bool)
    for axis in range(3):
        coord = matrix[axis, 0] * z + matrix[axis, 1] * y + matrix[axis, 2] * x + matrix[axis, 3]
        result |= (coord < -0.5) | (coord > model[axis] - 0.5)
    return result


def resample_volume(
    volume: Volume,
    spacing: tuple[float, float, float] | None = None,
    orientation: str | NDArray[np.float64] | None = None,
    *,
    order: Literal[0, 1, 3] = 1,
    fill: float | None = None,
) -> tuple[NDArray[np.float32], Grid]:
    """The volume's voxels on the model's grid (float32) and that grid, for the inverse later.

    Outside the source the value is ``fill``, by default the volume's minimum (air on CT).
    """
    if volume.voxels.ndim != 3:
        raise VolumeError(f"resampling needs a 3D volume, got shape {volume.voxels.shape}")
    grid = target_grid(volume.grid, spacing, orientation)
    value = float(volume.voxels.min()) if fill is None else fill
    out = resample(volume.voxels, volume.grid, grid, order=order, fill=value, dtype=np.float32)
    return out, grid


def window(voxels: NDArray[Any], center: float, width: float) -> NDArray[np.float32]:
    """Clip to a display window (e.g. CT soft tissue 40/400) and scale it to [0, 1]."""
    if width <= 0:
        raise ValueError(f"window width must be positive, got {width}")
    low = center - width / 2.0
    return scale_intensity_range(voxels, low, low + width)


def scale_intensity_range(
    voxels: NDArray[Any],
    a_min: float,
    a_max: float,
    b_min: float = 0.0,
    b_max: float = 1.0,
    *,
    clip: bool = True,
) -> NDArray[np.float32]:
    """Linear map of [a_min, a_max] onto [b_min, b_max], as MONAI's ScaleIntensityRange."""
    if a_max == a_min:
        raise ValueError("a_min and a_max must differ")
    out = np.asarray(voxels, dtype=np.float32).copy()
    out -= np.float32(a_min)
    out *= np.float32((b_max - b_min) / (a_max - a_min))
    out += np.float32(b_min)
    if clip:
        np.clip(out, min(b_min, b_max), max(b_min, b_max), out=out)
    return out


def zscore(
    voxels: NDArray[Any], *, mask: NDArray[np.bool_] | None = None, nonzero: bool = False
) -> NDArray[np.float32]:
    """Zero mean, unit variance; statistics from ``mask`` (or the non-zero voxels) when given,
    as MR models usually expect, so background does not dominate."""
    out = np.asarray(voxels, dtype=np.float32).copy()
    select = mask if mask is not None else (out != 0 if nonzero else None)
    sample = out if select is None else out[select]
    if sample.size == 0:
        return out
    mean, std = float(sample.mean(dtype=np.float64)), float(sample.std(dtype=np.float64))
    out -= np.float32(mean)
    if std > 0:
        out /= np.float32(std)
    return out


def percentile_scale(
    voxels: NDArray[Any], lower: float = 1.0, upper: float = 99.0
) -> NDArray[np.float32]:
    """The image's own [lower, upper] percentiles mapped onto [0, 1], clipped: no absolute value
    matters (bit depth, exposure, a vendor's scale), and a few extreme pixels (shutters,
    burned-in text, metal) cannot stretch the rest as they do a mean and deviation."""
    out = np.asarray(voxels, dtype=np.float32).copy()
    if out.size == 0:
        return out
    lo, hi = (float(v) for v in np.percentile(out, [lower, upper]))
    if hi <= lo:
        return np.zeros_like(out)
    out -= np.float32(lo)
    out /= np.float32(hi - lo)
    np.clip(out, 0.0, 1.0, out=out)
    return out


def denoise(
    voxels: NDArray[Any], spacing: tuple[float, float, float], sigma_mm: float
) -> NDArray[np.float32]:
    """Gaussian smoothing with a physical width, so anisotropic voxels are smoothed evenly."""
    if sigma_mm <= 0:
        return np.asarray(voxels, dtype=np.float32).copy()
    sigma = [sigma_mm / s for s in spacing]
    result = ndimage.gaussian_filter(np.asarray(voxels, dtype=np.float32), sigma=sigma)
    return np.asarray(result, dtype=np.float32)
