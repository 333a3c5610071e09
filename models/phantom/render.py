"""Images of one seeded patient: CT in HU, MR-like T1/T2 contrasts, and radiographs.

Every acquisition choice (slice thickness, field of view, noise, contrast phase, artefacts) is
drawn from a :class:`Ranges` object by the same seed, so a training set and a robustness set
differ only in the ranges they pass. Labels are the anatomy at the voxel (or pixel) centres of
the image's own grid; partial volume is in the image only, as on a scanner.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from itertools import pairwise
from typing import Any, Literal

import numpy as np
from numpy.typing import NDArray
from scipy import ndimage  # type: ignore[import-untyped,unused-ignore]

from phantom.anatomy import LABEL_VALUE, Anatomy, Tissue, sample_anatomy
from phantom.raster import AxialGrid, rasterise

F32 = NDArray[np.float32]
Range = tuple[float, float]


@dataclass(frozen=True)
class Ranges:
    """Acquisition parameters are drawn uniformly from these ranges (low, high)."""

    thickness_mm: Range = (1.0, 5.0)  # slice thickness = slice spacing
    pixel_mm: Range = (0.9, 1.8)  # in-plane pixel size (CT, MR) or detector pixel (radiograph)
    fov_scale: Range = (0.85, 1.35)  # reconstruction diameter / body width (< 1 truncates)
    noise: Range = (4.0, 30.0)  # CT: HU; MR: percent of the mean tissue signal; XR: 1000/dose
    coverage_mm: Range = (220.0, 420.0)  # cranio-caudal length of a CT/MR series
    max_slices: int = 160
    metal: bool = True
    table: bool = True
    size: Range | None = None  # patient size factor; None: the anatomy's own draw
    # CT and MR: the share of cases with what a real table holds besides the trunk (arms at the
    # sides, a cradle table, a mattress, a strap) and stored with flipped rows or columns; from
    # a random stream of its own, so at 0 a seed gives the same series as before
    context: float = 0.0
    # MR: the share of series written as other sequences and scanners write them (fat-suppressed,
    # contrast-enhanced, opposed-phase; surface-coil shading, wrap-around, vendor scales); own
    # random stream too
    mr_sequences: float = 0.0
    # radiographs only: the share of cases with the extra projected anatomy (clavicles,
    # scapulae, arms, breasts) and with what departments add (photometric interpretation,
    # processing, grid lines, shutters, markers, tilt, portable views, unknown spacing); both
    # come from their own random stream, so at 0 a seed gives the same image as before
    xr_anatomy: float = 0.0
    xr_department: float = 0.0


TRAINING = Ranges()
"""The ranges the built-in CT and radiograph models were trained on."""
TRAINING_MR = replace(TRAINING, thickness_mm=(2.5, 6.0))
"""MR series are thicker-sliced; the MR model's training ranges."""
DEFAULTS: dict[str, Ranges] = {"CT": TRAINING, "MR": TRAINING_MR, "DX": TRAINING}


@dataclass(frozen=True)
class Case:
    """One rendered image with labels on the same grid (z, y, x) and how it was acquired."""

    image: F32
    labels: NDArray[np.uint8]
    spacing: tuple[float, float, float]
    origin: tuple[float, float, float]
    modality: Literal["CT", "MR", "DX"]
    seed: int
    settings: dict[str, Any] = field(default_factory=dict)
    # rows run to the patient's front, columns to the patient's right (stored flipped, as
    # feet-first and prone series and some reformats are); ``origin`` is the first voxel's centre
    flips: tuple[bool, bool] = (False, False)

    @property
    def label_names(self) -> dict[int, str]:
        """Value -> vocabulary name of the labels this modality carries."""
        if self.modality == "DX":
            return {1: "lung_left", 2: "lung_right"}
        return {v: n for n, v in LABEL_VALUE.items()}


def _u(rng: np.random.Generator, r: Range) -> float:
    return float(rng.uniform(r[0], r[1]))


def _smooth_noise(rng: np.random.Generator, shape: tuple[int, ...], sigma: float) -> F32:
    """Unit-variance Gaussian noise correlated over ``sigma`` voxels."""
    n = ndimage.gaussian_filter(rng.normal(0.0, 1.0, shape).astype(np.float32), sigma)
    std = float(n.std()) or 1.0
    return np.asarray(n / std, dtype=np.float32)


def _smooth_field(rng: np.random.Generator, shape: tuple[int, ...], coarse: int = 4) -> F32:
    """A slowly varying field in [-1, 1]-ish over the whole grid (bias field, textures)."""
    small = rng.normal(0.0, 1.0, tuple(min(coarse, s) for s in shape)).astype(np.float32)
    zoom = [s / c for s, c in zip(shape, small.shape, strict=True)]
    big = ndimage.zoom(small, zoom, order=3, mode="nearest", grid_mode=True)
    return np.asarray(big[tuple(slice(0, s) for s in shape)], dtype=np.float32)


def _series_grid(
    anatomy: Anatomy, rng: np.random.Generator, ranges: Ranges, modality: str
) -> tuple[AxialGrid, float, int]:
    """The series geometry: square field of view round the isocentre, slices along z.
    Returns the grid, the reconstruction diameter (mm) and the sub-slice oversampling."""
    thickness = _u(rng, ranges.thickness_mm)
    pixel = _u(rng, ranges.pixel_mm)
    half = anatomy.body_a
    if anatomy.arms is not None:  # arms at the sides: the field is set to hold them, mostly
        radius, gap, _ = anatomy.arms
        half += (2 * radius + gap) * float(np.random.default_rng(anatomy.seed).uniform(0.7, 1.1))
    diameter = 2.0 * half * _u(rng, ranges.fov_scale)
    matrix = max(32, round(diameter / pixel))
    pixel = diameter / matrix
    coverage = min(_u(rng, ranges.coverage_mm), ranges.max_slices * thickness)
    low, high = anatomy.z_low + 20.0, anatomy.z_apex + 20.0
    start = float(rng.uniform(low, max(low, high - coverage)))
    slices = max(8, round(min(coverage, high - start) / thickness))
    sub = 2 if thickness > 2.5 else 1
    origin = (-diameter / 2 + pixel / 2, -diameter / 2 + pixel / 2, start)
    grid = AxialGrid((slices, matrix, matrix), (thickness, pixel, pixel), origin)
    return grid, diameter, sub


def _subsampled(grid: AxialGrid, sub: int) -> AxialGrid:
    """The grid with ``sub`` samples across each slice's thickness (partial volume along z)."""
    if sub == 1:
        return grid
    dz = grid.spacing[0] / sub
    origin = (grid.origin[0], grid.origin[1], grid.origin[2] - dz * (sub - 1) / 2)
    return AxialGrid((grid.shape[0] * sub, *grid.shape[1:]), (dz, *grid.spacing[1:]), origin)


# (native, arterial, portal venous, delayed) HU of the tissues that enhance
_ENHANCING: dict[Tissue, tuple[float, float, float, float]] = {
    Tissue.LIVER: (55, 75, 110, 85),
    Tissue.SPLEEN: (45, 110, 120, 85),
    Tissue.KIDNEY_CORTEX: (32, 190, 170, 130),
    Tissue.KIDNEY_MEDULLA: (30, 80, 160, 210),
    Tissue.MYOCARDIUM: (40, 100, 90, 75),
    Tissue.HEART_BLOOD: (40, 280, 160, 110),
    Tissue.ARTERY: (40, 300, 170, 110),
    Tissue.VEIN: (40, 110, 160, 110),
    Tissue.PULMONARY_VESSEL: (40, 250, 150, 105),
    Tissue.BOWEL_WALL: (40, 80, 90, 70),
}
_FIXED_HU: dict[Tissue, Range] = {
    Tissue.AIR: (-1000, -1000),
    Tissue.SKIN: (20, 50),
    Tissue.FAT: (-115, -80),
    Tissue.MUSCLE: (40, 60),
    Tissue.VISCERAL_FAT: (-110, -75),
    Tissue.LUNG: (-900, -780),
    Tissue.AIRWAY: (-1000, -980),
    Tissue.CORTICAL_BONE: (700, 1300),
    Tissue.CANCELLOUS_BONE: (150, 320),
    Tissue.DISC: (70, 110),
    Tissue.CSF: (5, 20),
    Tissue.BOWEL_CONTENT: (5, 40),
    Tissue.GAS: (-1000, -950),
    Tissue.TABLE_SHELL: (200, 500),
    Tissue.TABLE_FOAM: (-950, -850),
    Tissue.METAL: (3000, 3071),
}
PHASES = ("native", "arterial", "portal", "delayed")


def ct_hu_table(rng: np.random.Generator, phase: int) -> F32:
    """HU per tissue for one patient and contrast phase (liver and spleen ranges overlap)."""
    table = np.zeros(len(Tissue), dtype=np.float32)
    for tissue, r in _FIXED_HU.items():
        table[tissue] = _u(rng, r)
    for tissue, values in _ENHANCING.items():
        table[tissue] = values[phase] * _u(rng, (0.85, 1.15))
    if rng.random() < 0.15:  # positive oral contrast
        table[Tissue.BOWEL_CONTENT] = _u(rng, (150, 350))
    return table


def _metal_streaks(
    image: F32, tissue: NDArray[np.uint8], rng: np.random.Generator, pixel: float
) -> None:
    """Bright and dark streaks radiating from metal, slice by slice (in place)."""
    ny, nx = image.shape[1:]
    yy, xx = np.mgrid[0:ny, 0:nx].astype(np.float32)
    angles = rng.uniform(0, np.pi, 10)
    amps = rng.uniform(150, 500, 10) * rng.choice([-1.0, 1.0], 10)
    for k in np.nonzero((tissue == Tissue.METAL).any(axis=(1, 2)))[0]:
        cy, cx = (float(v.mean()) for v in np.nonzero(tissue[k] == Tissue.METAL))
        for ang, amp in zip(angles, amps, strict=True):
            perp = np.abs((xx - cx) * np.sin(ang) - (yy - cy) * np.cos(ang)) * pixel
            along = np.hypot(xx - cx, yy - cy) * pixel
            image[k] += np.float32(amp) * np.exp(-perp / 1.5) * np.exp(-along / 150.0)


def _with_context(
    anatomy: Anatomy, rng: np.random.Generator, share: float
) -> tuple[Anatomy, dict[str, Any]]:
    """The patient on a real table: arms at the sides (half the cases), a cradle or flat table,
    a mattress, a strap over the trunk; and which way the series is stored."""
    if rng.random() >= share:
        return anatomy, {}
    arms = None
    if rng.random() < 0.5:
        arms = (_u(rng, (35.0, 50.0)), _u(rng, (0.0, 20.0)), _u(rng, (-30.0, 30.0)))
    curve = _u(rng, (300.0, 600.0)) if rng.random() < 0.5 else 0.0
    pad = _u(rng, (20.0, 60.0)) if rng.random() < 0.6 else 0.0
    strap = None
    if rng.random() < 0.4:
        strap = (_u(rng, (anatomy.z_low + 40.0, anatomy.z_apex - 40.0)), _u(rng, (40.0, 70.0)))
    flips = (bool(rng.random() < 0.35), bool(rng.random() < 0.35))
    anatomy = replace(anatomy, arms=arms, table_curve_mm=curve, pad_mm=pad, strap=strap)
    context = {
        "arms": arms is not None,
        "table": "cradle" if curve else "flat",
        "pad_mm": round(pad, 1),
        "strap": strap is not None,
        "flipped_rows": flips[0],
        "flipped_columns": flips[1],
    }
    return anatomy, context


def _flipped(case: Case, rows: bool, columns: bool) -> Case:
    """The case stored with its rows and/or columns reversed: same patient, same labels."""
    if not (rows or columns):
        return case
    index = (
        slice(None),
        slice(None, None, -1 if rows else 1),
        slice(None, None, -1 if columns else 1),
    )
    _, dy, dx = case.spacing
    ny, nx = case.image.shape[1:]
    origin = (
        case.origin[0] + (nx - 1) * dx * columns,
        case.origin[1] + (ny - 1) * dy * rows,
        case.origin[2],
    )
    return replace(
        case,
        image=np.ascontiguousarray(case.image[index]),
        labels=np.ascontiguousarray(case.labels[index]),
        origin=origin,
        flips=(rows, columns),
    )


def render_ct(seed: int, ranges: Ranges = TRAINING) -> Case:
    """An axial CT series in HU with labels: random phase, noise, slice thickness, field of view,
    beam-hardening cupping and, in some patients, a spinal screw with metal streaks."""
    anatomy = sample_anatomy(
        seed, size=None if ranges.size is None else _u(np.random.default_rng(seed), ranges.size)
    )
    context_rng = np.random.default_rng(seed + 31_337)
    anatomy, context = _with_context(anatomy, context_rng, ranges.context)
    rng = np.random.default_rng(seed + 7_919)
    grid, diameter, sub = _series_grid(anatomy, rng, ranges, "CT")
    if not ranges.metal:
        anatomy = replace(anatomy, metal=None)
    if not ranges.table:
        anatomy = replace(anatomy, table_y=1e4)
    fine = rasterise(anatomy, _subsampled(grid, sub))
    phase = int(rng.integers(0, 4))
    table = ct_hu_table(rng, phase)
    if context:
        gel = context_rng.random() < 0.3  # a gel pad; most mattresses are foam
        table[Tissue.PAD] = _u(context_rng, (-60.0, 30.0) if gel else (-900.0, -700.0))
        table[Tissue.STRAP] = _u(context_rng, (0.0, 200.0))
    hu = table[fine.tissue]
    # organ texture and lung parenchyma heterogeneity
    hu += _smooth_noise(rng, hu.shape, 2.0) * np.where(
        fine.tissue == Tissue.LUNG, 25.0, 6.0
    ).astype(np.float32)
    if anatomy.metal is not None and ranges.metal:
        _metal_streaks(hu, fine.tissue, rng, grid.spacing[1])
    if sub > 1:
        hu = hu.reshape(grid.shape[0], sub, *grid.shape[1:]).mean(axis=1)
        labels = fine.labels[sub // 2 :: sub]
    else:
        labels = fine.labels
    ys = grid.axis(1)[:, None]
    xs = grid.axis(2)[None, :]
    ox, oy = anatomy.offset
    r2 = ((xs - ox) / anatomy.body_a) ** 2 + ((ys - oy) / anatomy.body_b) ** 2
    cupping = _u(rng, (0.0, 30.0)) * np.clip(1 - r2, 0, None).astype(np.float32)
    hu -= cupping[None]
    psf = _u(rng, (0.4, 0.9))
    hu = ndimage.gaussian_filter(hu, (0.0, psf, psf))
    size = anatomy.body_a / 160.0
    noise = _u(rng, ranges.noise) * size
    hu += _smooth_noise(rng, hu.shape, 0.7) * np.float32(noise)
    outside = (xs**2 + ys**2) > (diameter / 2) ** 2
    hu[:, outside] = -1024.0
    labels = labels.copy()
    labels[:, outside] = 0
    hu = np.clip(hu, -1024, 3071).astype(np.float32)
    settings = {
        "thickness_mm": grid.spacing[0],
        "pixel_mm": grid.spacing[1],
        "matrix": grid.shape[1],
        "slices": grid.shape[0],
        "phase": PHASES[phase],
        "noise_hu": round(noise, 1),
        "fov_mm": round(diameter, 1),
        "truncated": bool(diameter < 2 * (anatomy.body_a + abs(anatomy.offset[0]))),
        "metal": anatomy.metal is not None,
        **context,
    }
    case = Case(hu, labels, grid.spacing, grid.origin, "CT", seed, settings)
    return _flipped(case, bool(context.get("flipped_rows")), bool(context.get("flipped_columns")))


# Relative signal of each tissue: (T1-weighted, T2-weighted); vessels and heart blood are given
# per case (bright or dark blood).
_MR: dict[Tissue, tuple[float, float]] = {
    Tissue.AIR: (0.0, 0.0),
    Tissue.SKIN: (0.5, 0.4),
    Tissue.FAT: (1.0, 0.85),
    Tissue.MUSCLE: (0.35, 0.2),
    Tissue.VISCERAL_FAT: (0.95, 0.8),
    Tissue.LUNG: (0.04, 0.05),
    Tissue.AIRWAY: (0.0, 0.0),
    Tissue.LIVER: (0.55, 0.25),
    Tissue.SPLEEN: (0.4, 0.6),
    Tissue.KIDNEY_CORTEX: (0.47, 0.55),
    Tissue.KIDNEY_MEDULLA: (0.3, 0.75),
    Tissue.MYOCARDIUM: (0.4, 0.3),
    Tissue.CORTICAL_BONE: (0.04, 0.04),
    Tissue.CANCELLOUS_BONE: (0.75, 0.55),
    Tissue.DISC: (0.35, 0.7),
    Tissue.CSF: (0.15, 1.0),
    Tissue.BOWEL_WALL: (0.4, 0.35),
    Tissue.BOWEL_CONTENT: (0.3, 0.7),
    Tissue.GAS: (0.0, 0.0),
    Tissue.TABLE_SHELL: (0.0, 0.0),
    Tissue.TABLE_FOAM: (0.0, 0.0),
    Tissue.METAL: (0.0, 0.0),
}
_BLOOD = (Tissue.HEART_BLOOD, Tissue.ARTERY, Tissue.VEIN, Tissue.PULMONARY_VESSEL)


# Relative signal of each tissue in sequences beyond plain T1/T2 (fat suppressed, after
# gadolinium): (T1 fat-sat arterial, T1 fat-sat portal venous, T2 fat-sat)
_MR_SEQUENCES = ("T1 FS arterial", "T1 FS portal", "T2 FS", "T1 opposed phase")
_MR_FS: dict[Tissue, tuple[float, float, float]] = {
    Tissue.SKIN: (0.35, 0.35, 0.3),
    Tissue.FAT: (0.1, 0.1, 0.08),
    Tissue.VISCERAL_FAT: (0.1, 0.1, 0.08),
    Tissue.MUSCLE: (0.3, 0.35, 0.15),
    Tissue.LUNG: (0.03, 0.04, 0.05),
    Tissue.LIVER: (0.45, 0.7, 0.2),
    Tissue.SPLEEN: (0.6, 0.75, 0.55),
    Tissue.KIDNEY_CORTEX: (1.0, 0.85, 0.6),
    Tissue.KIDNEY_MEDULLA: (0.35, 0.8, 0.8),
    Tissue.MYOCARDIUM: (0.55, 0.5, 0.25),
    Tissue.HEART_BLOOD: (0.95, 0.8, 0.05),
    Tissue.ARTERY: (1.0, 0.75, 0.05),
    Tissue.VEIN: (0.4, 0.85, 0.05),
    Tissue.PULMONARY_VESSEL: (0.9, 0.7, 0.05),
    Tissue.CORTICAL_BONE: (0.03, 0.03, 0.03),
    Tissue.CANCELLOUS_BONE: (0.25, 0.3, 0.2),
    Tissue.DISC: (0.2, 0.25, 0.6),
    Tissue.CSF: (0.08, 0.08, 1.0),
    Tissue.BOWEL_WALL: (0.5, 0.6, 0.3),
    Tissue.BOWEL_CONTENT: (0.15, 0.15, 0.8),
}


def _mr_sequence(
    rng: np.random.Generator, table: F32, tissue: NDArray[np.uint8]
) -> tuple[F32, str, NDArray[np.bool_] | None]:
    """Another sequence: its tissue signal (in place of ``table``), its name, and for opposed
    phase the voxels of ``tissue`` where fat meets water (dark there: the India-ink edge)."""
    kind = int(rng.integers(0, len(_MR_SEQUENCES)))
    if kind < 3:
        table = np.zeros_like(table)
        for t, values in _MR_FS.items():
            table[t] = values[kind] * _u(rng, (0.85, 1.15))
        return table, _MR_SEQUENCES[kind], None
    table = table.copy()  # a T1 gradient echo: T1 contrast whatever the base weighting
    for t, (t1, _) in _MR.items():
        if t not in _BLOOD:
            table[t] = t1 * _u(rng, (0.9, 1.1))
    fat = np.isin(tissue, (Tissue.FAT, Tissue.VISCERAL_FAT))
    water = ~fat & (table[tissue] > 0.1)
    edge = np.zeros(tissue.shape, dtype=bool)
    for k in range(tissue.shape[0]):
        edge[k] = (ndimage.binary_dilation(fat[k]) & water[k]) | (
            ndimage.binary_dilation(water[k]) & fat[k]
        )
    return table, _MR_SEQUENCES[kind], edge


def _coil_shading(
    rng: np.random.Generator, shape: tuple[int, ...], ys: NDArray[np.float64], body_b: float
) -> F32:
    """Anterior and posterior surface coils: signal falling with depth from both."""
    reach = _u(rng, (40.0, 90.0))
    gain = _u(rng, (0.5, 2.0))
    front = np.exp(-np.clip(ys + body_b, 0, None) / reach)
    back = np.exp(-np.clip(body_b - ys, 0, None) / reach)
    profile = (1 + gain * (front + back)).astype(np.float32)
    return np.broadcast_to(profile[None, :, None], shape)


def _wrapped(
    image: F32, labels: NDArray[np.uint8], share: float, axis: int
) -> tuple[F32, NDArray[np.uint8], int]:
    """Wrap-around along ``axis`` (1 rows, 2 columns): a phase field of view ``share`` smaller,
    so what lies beyond each edge folds onto the opposite edge. Returns the cropped image and
    labels and how many pixels were cut from the start."""
    n = image.shape[axis]
    cut = max(1, round(n * share / 2))

    def part(start: int, stop: int) -> tuple[slice, ...]:
        index = [slice(None)] * 3
        index[axis] = slice(start, stop)
        return tuple(index)

    folded = image[part(cut, n - cut)].copy()
    m = folded.shape[axis]
    folded[part(m - cut, m)] += image[part(0, cut)]
    folded[part(0, cut)] += image[part(n - cut, n)]
    return folded, np.ascontiguousarray(labels[part(cut, n - cut)]), cut


def render_mr(seed: int, ranges: Ranges = TRAINING_MR) -> Case:
    """An axial MR-like series: T1- or T2-like tissue signal, bright or dark blood, a smooth
    multiplicative bias field, Rician noise and an arbitrary scanner scale."""
    anatomy = sample_anatomy(seed)
    anatomy, context = _with_context(anatomy, np.random.default_rng(seed + 31_337), ranges.context)
    rng = np.random.default_rng(seed + 15_485)
    grid, diameter, sub = _series_grid(anatomy, rng, ranges, "MR")
    anatomy = replace(anatomy, metal=None)
    fine = rasterise(anatomy, _subsampled(grid, sub))
    weighting = int(rng.integers(0, 2))
    table = np.array(
        [_MR.get(Tissue(i), (0.0, 0.0))[weighting] for i in range(len(Tissue))], dtype=np.float32
    )
    # one draw per tissue up to the table accessories (invisible on MR), so each seed keeps the
    # contrast it had before they existed
    drawn = int(Tissue.PAD)
    table[:drawn] *= rng.uniform(0.9, 1.1, drawn).astype(np.float32)
    blood = _u(rng, (0.05, 0.2)) if rng.random() < 0.5 else _u(rng, (0.7, 1.0))
    for t in _BLOOD:
        table[t] = blood
    # other sequences and scanners, from a stream of their own
    scanner = np.random.default_rng(seed + 92_821)
    written = scanner.random() < ranges.mr_sequences
    sequence = ("T1", "T2")[weighting]
    edge = None
    if written:
        table, sequence, edge = _mr_sequence(scanner, table, fine.tissue)
    signal = table[fine.tissue]
    if edge is not None:
        signal[edge] *= np.float32(0.15)
    signal *= 1 + _smooth_noise(rng, signal.shape, 1.5) * np.float32(0.04)
    if sub > 1:
        signal = signal.reshape(grid.shape[0], sub, *grid.shape[1:]).mean(axis=1)
        labels = fine.labels[sub // 2 :: sub].copy()
    else:
        labels = fine.labels.copy()
    bias_strength = _u(rng, (0.1, 0.45))
    signal *= np.exp(_smooth_field(rng, signal.shape, 3) * np.float32(bias_strength))
    if written and scanner.random() < 0.6:
        signal *= _coil_shading(
            scanner, signal.shape, grid.axis(1) - anatomy.offset[1], anatomy.body_b
        )
    sigma = (
        _u(rng, ranges.noise)
        / 30.0
        * 0.05
        * float(signal[labels > 0].mean() if (labels > 0).any() else 1.0)
    )
    n1 = rng.normal(0.0, sigma, signal.shape).astype(np.float32)
    n2 = rng.normal(0.0, sigma, signal.shape).astype(np.float32)
    signal = np.sqrt((signal + n1) ** 2 + n2**2)
    scale = _u(rng, (300.0, 3000.0))
    if written:  # vendors' scales: from tens to tens of thousands
        scale = float(np.exp(scanner.uniform(np.log(40.0), np.log(30000.0))))
    image = (signal * np.float32(scale)).astype(np.float32)
    ys = grid.axis(1)[:, None]
    xs = grid.axis(2)[None, :]
    outside = (xs**2 + ys**2) > (diameter / 2) ** 2
    labels[:, outside] = 0
    image[:, outside] = 0.0
    origin = grid.origin
    wrap = 0.0
    if written and scanner.random() < 0.4:
        wrap = _u(scanner, (0.12, 0.3))
        axis = int(scanner.integers(1, 3))
        image, labels, cut = _wrapped(image, labels, wrap, axis)
        shift = cut * grid.spacing[axis]
        origin = (origin[0] + shift * (axis == 2), origin[1] + shift * (axis == 1), origin[2])
    settings = {
        "thickness_mm": grid.spacing[0],
        "pixel_mm": grid.spacing[1],
        "matrix": grid.shape[1],
        "slices": grid.shape[0],
        "weighting": ("T1", "T2")[weighting],
        "sequence": sequence,
        "wrap": round(wrap, 2),
        "blood": "bright" if blood > 0.5 else "dark",
        "bias": round(bias_strength, 2),
        "noise_sigma": round(sigma * scale, 2),
        "fov_mm": round(diameter, 1),
        **context,
    }
    case = Case(image, labels, grid.spacing, origin, "MR", seed, settings)
    return _flipped(case, bool(context.get("flipped_rows")), bool(context.get("flipped_columns")))


def _mu(hu: F32) -> F32:
    """Linear attenuation (1/mm) at a chest-radiograph effective energy from HU."""
    return np.asarray(np.clip(0.0195 * (1.0 + hu / 1000.0), 0.0, None), dtype=np.float32)


_MU_SOFT, _MU_BONE = 0.0205, 0.042  # 1/mm: soft tissue and a cortical/cancellous mix


def _tube_path(zz: F32, xx: F32, points: NDArray[np.float64], radius: float) -> F32:
    """Chord length (mm) through a round tube along ``points`` (z, x), as projected."""
    best = np.full(zz.shape, np.inf, dtype=np.float32)
    for (za, xa), (zb, xb) in pairwise(points):
        dz, dx = zb - za, xb - xa
        t = np.clip(((zz - za) * dz + (xx - xa) * dx) / max(dz * dz + dx * dx, 1e-6), 0, 1)
        best = np.minimum(best, np.hypot(zz - za - t * dz, xx - xa - t * dx))
    return np.asarray(2 * np.sqrt(np.clip(radius**2 - best**2, 0, None)), dtype=np.float32)


def _extra_anatomy(
    rng: np.random.Generator,
    anatomy: Anatomy,
    shape: tuple[int, ...],
    corner: tuple[float, float],
    step: float,
) -> F32:
    """Attenuation line integrals (z, x) of what the torso model lacks and every chest film
    shows: clavicles, scapulae, arms beside the chest or raised out of the field, shoulder and
    breast soft tissue (symmetric about the midline), and gas below the diaphragm (the
    stomach's bubble on the patient's left, as in life)."""
    zz = (corner[0] + (np.arange(shape[0], dtype=np.float32) + 0.5) * step)[:, None]
    xx = (corner[1] + (np.arange(shape[1], dtype=np.float32) + 0.5) * step)[None, :]
    zz, xx = np.broadcast_arrays(zz, xx)
    cx = anatomy.offset[0]
    half = anatomy.body_a
    apex = anatomy.z_apex
    dome = max(anatomy.dome_left, anatomy.dome_right)
    out = np.zeros(shape, dtype=np.float32)
    arms_in = rng.random() < 0.5
    tilt = _u(rng, (-0.08, 0.08))  # shoulders not level
    breasts = _u(rng, (30.0, 80.0)) if rng.random() < 0.45 else 0.0
    for side in (-1.0, 1.0):
        lift = side * tilt * half
        # clavicle: sternal end to the acromion, gently S-shaped, rising laterally
        notch = apex + _u(rng, (-5.0, 25.0)) + lift * 0.3
        rise = _u(rng, (5.0, 40.0))
        xs = np.linspace(0.12, 0.95, 6) * half
        bend = np.array([0, 4, 6, 3, -2, -6], dtype=np.float64) * _u(rng, (0.5, 1.5))
        points = np.stack([notch + rise * (xs / half) ** 1.5 + bend + lift, cx + side * xs], 1)
        out += _tube_path(zz, xx, points, _u(rng, (6.0, 9.0))) * _MU_BONE
        # scapula: a thin plate whose medial border lies over the lateral lung (arms in) or
        # rotated out beyond it (arms raised, the PA position)
        medial = half * (_u(rng, (0.45, 0.6)) if arms_in else _u(rng, (0.7, 0.85)))
        top, bottom = notch + rise * 0.6, notch - _u(rng, (120.0, 160.0))
        frac = np.clip((zz - bottom) / max(top - bottom, 1.0), 0, 1)
        inner = medial + (1 - frac) * half * 0.15
        outer = half * (0.75 + 0.35 * frac)  # narrowing to the inferior angle
        plate = (zz > bottom) & (zz < top) & (side * (xx - cx) > inner) & (side * (xx - cx) < outer)
        edge = np.clip((side * (xx - cx) - inner) / 6.0, 0, 1)
        out += plate * (_u(rng, (4.0, 8.0)) * _MU_BONE + 20.0 * _MU_SOFT) * (0.5 + 0.5 * edge)
        # shoulder soft tissue over the apex
        shoulder = np.clip(1 - ((xx - cx - side * half * 0.7) / (half * 0.5)) ** 2, 0, None)
        out += (shoulder * np.clip((zz - notch + 10) / 40.0, 0, 1) * 60.0 * _MU_SOFT).astype(
            np.float32
        )
        if arms_in:
            radius = _u(rng, (35.0, 50.0))
            centre = cx + side * (half + radius + _u(rng, (0.0, 25.0)))
            arm = np.asarray(2 * np.sqrt(np.clip(radius**2 - (xx - centre) ** 2, 0, None)))
            bone = np.asarray(2 * np.sqrt(np.clip(12.0**2 - (xx - centre) ** 2, 0, None)))
            below = (zz < notch + 20).astype(np.float32)
            out += (arm * _MU_SOFT + bone * (_MU_BONE - _MU_SOFT)) * below
        if breasts:  # soft tissue fading upward, with a sharp lower edge (the fold)
            bz = dome + _u(rng, (-10.0, 40.0))
            bx = cx + side * half * _u(rng, (0.5, 0.62))
            r = _u(rng, (40.0, 65.0))
            d = ((xx - bx) / r) ** 2 + ((zz - bz) / (r * np.where(zz > bz, 1.6, 0.7))) ** 2
            fold = zz > bz - r * 0.5
            out += np.sqrt(np.clip(1 - d, 0, None)) * breasts * _MU_SOFT * fold
    # gas below the diaphragm: the stomach's bubble under the left dome and the colon's
    # flexures, as dark as lung but outside every lung field
    blobs = [(anatomy.dome_left - _u(rng, (45.0, 75.0)), half * _u(rng, (0.2, 0.5)))]
    blobs = blobs if rng.random() < 0.7 else []
    for _ in range(int(rng.integers(0, 4))):
        blobs.append((dome - _u(rng, (40.0, 120.0)), half * _u(rng, (-0.7, 0.7))))
    for gz, gx in blobs:
        rx, rz = _u(rng, (15.0, 45.0)), _u(rng, (10.0, 30.0))
        d = ((xx - cx - gx) / rx) ** 2 + ((zz - gz) / rz) ** 2
        out -= np.sqrt(np.clip(1 - d, 0, None)) * _u(rng, (30.0, 80.0)) * _MU_SOFT
    return np.asarray(out, dtype=np.float32)


# 5 x 3 glyphs of the burned-in side markers and a few characters of annotation text
_GLYPHS = {
    "L": ["100", "100", "100", "100", "111"],
    "R": ["110", "101", "110", "101", "101"],
    "A": ["010", "101", "111", "101", "101"],
    "P": ["110", "101", "110", "100", "100"],
    "T": ["111", "010", "010", "010", "010"],
    "E": ["111", "100", "110", "100", "111"],
    "1": ["010", "110", "010", "010", "111"],
    "0": ["111", "101", "101", "101", "111"],
}


def _burn(image: F32, text: str, row: int, col: int, size: int, value: float) -> None:
    """Burn ``text`` into ``image`` in place (block glyphs, ``size`` pixels a dot)."""
    for k, char in enumerate(text):
        glyph = np.array([[c == "1" for c in line] for line in _GLYPHS.get(char, _GLYPHS["T"])])
        block = np.kron(glyph, np.ones((size, size), dtype=bool))
        r0, c0 = row, col + k * 4 * size
        r1, c1 = min(r0 + block.shape[0], image.shape[0]), min(c0 + block.shape[1], image.shape[1])
        if r0 < 0 or c0 < 0 or r1 <= r0 or c1 <= c0:
            continue
        image[r0:r1, c0:c1][block[: r1 - r0, : c1 - c0]] = value


def _department(
    rng: np.random.Generator, image: F32, labels: NDArray[np.uint8], settings: dict[str, Any]
) -> tuple[F32, NDArray[np.uint8]]:
    """What a department's equipment adds to a projection (``image`` 0..4095, bright where
    attenuation is high, as the node reads either photometric interpretation): portable AP
    views, processing (gamma, contrast curve, edge enhancement), grid lines, a tilted patient,
    collimation shutters, burned-in side markers and text, and how the file is written
    (photometric interpretation, stored bits, pixel spacing zero or absent)."""
    value = np.asarray(image, dtype=np.float32) / 4095.0
    portable = rng.random() < 0.3
    if portable:
        settings["view"] = "AP"
        settings["portable"] = True
        # no grid, more scatter: a veil that flattens the contrast
        veil = _u(rng, (0.1, 0.35))
        value = value * (1 - veil) + veil * float(value.mean())
    # processing: gamma, a sigmoid contrast curve, unsharp-mask edge enhancement
    value = np.clip(value, 0, 1) ** _u(rng, (0.6, 1.6))
    if rng.random() < 0.6:
        gain = _u(rng, (3.0, 8.0))
        mid = _u(rng, (0.35, 0.65))
        curve = 1 / (1 + np.exp(-gain * (value - mid)))
        low, high = 1 / (1 + np.exp(gain * mid)), 1 / (1 + np.exp(-gain * (1 - mid)))
        value = (curve - low) / (high - low)
    if rng.random() < 0.6:
        blur = ndimage.gaussian_filter(value, _u(rng, (5.0, 20.0)))
        value = value + _u(rng, (0.3, 1.2)) * (value - blur)
    if not portable and rng.random() < 0.5:  # an anti-scatter grid's lines
        period = _u(rng, (2.2, 5.0))
        axis = int(rng.integers(0, 2))
        phase = np.arange(value.shape[axis], dtype=np.float32) * 2 * np.pi / period
        stripes = _u(rng, (0.01, 0.04)) * np.sin(phase)
        value = value + (stripes[None, :] if axis == 1 else stripes[:, None])
    value = value + rng.normal(0, _u(rng, (0.0, 0.02)), value.shape).astype(np.float32)
    # a tilted patient (or detector): image and labels turn together
    angle = _u(rng, (-8.0, 8.0)) if rng.random() < 0.6 else 0.0
    if angle:
        fill = float(np.percentile(value, 2))
        value = ndimage.rotate(value, angle, reshape=False, order=1, mode="constant", cval=fill)
        labels = ndimage.rotate(labels, angle, reshape=False, order=0, mode="constant", cval=0)
    settings["tilt_deg"] = round(angle, 1)
    # collimation shutters: unexposed detector, bright, where nothing of the patient is seen
    ny, nx = value.shape
    if rng.random() < 0.7:
        top, bottom = (int(_u(rng, (0.0, 0.12)) * ny) for _ in range(2))
        left, right = (int(_u(rng, (0.0, 0.12)) * nx) for _ in range(2))
        shutter = np.ones((ny, nx), dtype=bool)
        shutter[top : ny - bottom, left : nx - right] = False
        if rng.random() < 0.5:
            turned = ndimage.rotate(
                shutter.astype(np.uint8), _u(rng, (-4.0, 4.0)), reshape=False, order=0, cval=1
            )
            shutter = turned > 0
        value[shutter] = _u(rng, (0.85, 1.05))
        labels = np.where(shutter, 0, labels).astype(np.uint8)
        settings["shutters"] = True
    # burned-in side marker (on the patient's side it names) and annotation text
    size = max(2, round(min(ny, nx) / _u(rng, (60.0, 110.0))))
    bright = _u(rng, (0.95, 1.2))
    if rng.random() < 0.8:
        row = int(_u(rng, (0.03, 0.25)) * ny)
        if rng.random() < 0.5:  # columns run toward the patient's left: L on the right
            _burn(value, "L", row, int(nx * _u(rng, (0.8, 0.93))), size, bright)
        else:
            _burn(value, "R", row, int(nx * _u(rng, (0.03, 0.15))), size, bright)
    if rng.random() < 0.7:
        words = ["AP", "PA", "ERECT", "TE10", "AP10"]
        text = str(words[int(rng.integers(0, len(words)))])
        row = int(_u(rng, (0.01, 0.06)) * ny) if rng.random() < 0.5 else int(ny * 0.92)
        _burn(value, text, row, int(_u(rng, (0.02, 0.5)) * nx), max(1, size - 1), bright)
    value = np.clip(value, 0, 1.2) / 1.2
    # how the file is written
    bits = int(rng.choice([10, 12, 14, 15]))
    settings["bits"] = bits
    settings["photometric"] = "MONOCHROME1" if rng.random() < 0.5 else "MONOCHROME2"
    settings["spacing"] = str(rng.choice(["known", "known", "zero", "missing"]))
    scaled = np.rint(value * (2**bits - 1)).astype(np.float32)
    return scaled, np.ascontiguousarray(labels)


def render_xr(seed: int, ranges: Ranges = TRAINING) -> Case:
    """A frontal chest radiograph: the CT anatomy projected antero-posteriorly, scatter,
    quantum noise at a random dose, detector blur and collimation. Labels are the lung fields
    (lung_left = 1, lung_right = 2): pixels whose ray crosses at least 10 mm of that lung."""
    anatomy = sample_anatomy(seed)
    rng = np.random.default_rng(seed + 104_729)
    step = 2.5
    x0, x1 = -anatomy.body_a - 40 + anatomy.offset[0], anatomy.body_a + 40 + anatomy.offset[0]
    z1 = anatomy.z_apex + _u(rng, (30.0, 80.0))
    z0 = min(anatomy.dome_left, anatomy.dome_right) - _u(rng, (80.0, 150.0))
    y0, y1 = -anatomy.body_b - 40 + anatomy.offset[1], anatomy.body_b + 80 + anatomy.offset[1]
    shape = (round((z1 - z0) / step), round((y1 - y0) / step), round((x1 - x0) / step))
    supine = rng.random() < 0.4
    if not supine or not ranges.table:
        anatomy = replace(anatomy, table_y=1e4)
    anatomy = replace(anatomy, metal=None)
    raster = rasterise(anatomy, AxialGrid(shape, (step, step, step), (x0, y0, z0)))
    hu = ct_hu_table(rng, 0)[raster.tissue]
    path = _mu(hu).sum(axis=1) * step  # (z, x)
    lung_l = (raster.labels == LABEL_VALUE["lung_left"]).sum(axis=1) * step
    lung_r = (raster.labels == LABEL_VALUE["lung_right"]).sum(axis=1) * step
    # detector grid: rows top (head) to bottom, columns to the patient's left
    pixel = _u(rng, ranges.pixel_mm)
    zoom = step / pixel
    extra = np.random.default_rng(seed + 7_919_311)  # the realism draws' own stream
    realistic = extra.random() < ranges.xr_anatomy
    department = extra.random() < ranges.xr_department
    if realistic:
        path = path + _extra_anatomy(extra, anatomy, path.shape, (z0, x0), step)
    path = ndimage.zoom(path[::-1], zoom, order=1)
    lung_l = ndimage.zoom(lung_l[::-1], zoom, order=1)
    lung_r = ndimage.zoom(lung_r[::-1], zoom, order=1)
    scatter = _u(rng, (0.0, 0.08))
    dose = 1000.0 / max(_u(rng, ranges.noise), 1e-3) * 200.0
    primary = np.exp(-path) + scatter * float(np.exp(-path).mean())
    counts = rng.poisson(np.clip(primary * dose, 0, None)).astype(np.float32) + 1.0
    counts = ndimage.gaussian_filter(counts, _u(rng, (0.5, 1.2)))
    signal = np.log(dose / counts)
    gamma = _u(rng, (0.8, 1.2))
    lo, hi = np.percentile(signal, [0.5, 99.5])
    image = np.clip((signal - lo) / max(hi - lo, 1e-3), 0, 1) ** gamma * 4095.0
    labels = np.zeros(image.shape, dtype=np.uint8)
    labels[lung_l >= 10.0] = 1
    labels[lung_r >= 10.0] = 2
    # collimation: crop a random margin on each side
    ny, nx = image.shape
    top, bottom = (int(rng.uniform(0, 0.08) * ny) for _ in range(2))
    left, right = (int(rng.uniform(0, 0.1) * nx) for _ in range(2))
    image = image[top : ny - bottom, left : nx - right]
    labels = labels[top : ny - bottom, left : nx - right]
    settings: dict[str, Any] = {
        "pixel_mm": round(pixel, 3),
        "rows": image.shape[0],
        "columns": image.shape[1],
        "view": "AP" if supine else "PA",
        "dose": round(dose, 1),
        "scatter": round(scatter, 3),
    }
    if department:
        image, labels = _department(extra, image, labels, settings)
    return Case(
        image[None].astype(np.float32),
        np.ascontiguousarray(labels[None]),
        (1.0, pixel, pixel),
        (0.0, 0.0, 0.0),
        "DX",
        seed,
        settings,
    )


RENDERERS = {"CT": render_ct, "MR": render_mr, "DX": render_xr}


def modality_key(modality: str) -> str:
    """CT, MR, or DX for any radiograph (DX, CR, XR)."""
    key = "DX" if modality.upper() in ("DX", "CR", "XR") else modality.upper()
    if key not in RENDERERS:
        raise ValueError(f"no phantom renderer for modality {modality!r} (CT, MR, DX, CR)")
    return key


def render(modality: str, seed: int, ranges: Ranges | None = None) -> Case:
    """One case of ``modality`` (CT, MR, or DX / CR for a radiograph); ``ranges`` default to
    that modality's training ranges."""
    key = modality_key(modality)
    return RENDERERS[key](seed, DEFAULTS[key] if ranges is None else ranges)
