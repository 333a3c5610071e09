"""A seeded torso: organ shapes and positions drawn once, then rasterised onto any grid.

Coordinates are patient LPS in mm (x to the patient's left, y posterior, z superior), with the
origin near the centre of the torso at the level of the diaphragm. Shapes are analytic
(deformed superellipsoids, tubes along centre lines, a segmented spine) so the same patient can
be rasterised at 4 mm for training and at 0.7 mm for evaluation, and labels on each grid are
exact at the voxel centres. Irregular surfaces come from two smooth random displacement fields
(long and short wavelength) applied to the sampling coordinates of every structure.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from enum import IntEnum

import numpy as np
from numpy.typing import NDArray
from scipy import ndimage  # type: ignore[import-untyped,unused-ignore]

F32 = NDArray[np.float32]

LABELS: tuple[str, ...] = (
    "body",
    "lung_left",
    "lung_right",
    "liver",
    "spleen",
    "kidney_left",
    "kidney_right",
    "spine",
    "ribs",
    "heart",
    "aorta",
)
"""Label values 1..11 (0 is background), named from the node's vocabulary."""

LABEL_VALUE: dict[str, int] = {name: i + 1 for i, name in enumerate(LABELS)}


class Tissue(IntEnum):
    """What fills a voxel; renderers turn each into an intensity (HU, T1/T2-like, attenuation)."""

    AIR = 0
    SKIN = 1
    FAT = 2
    MUSCLE = 3
    VISCERAL_FAT = 4
    LUNG = 5
    PULMONARY_VESSEL = 6
    AIRWAY = 7
    LIVER = 8
    SPLEEN = 9
    KIDNEY_CORTEX = 10
    KIDNEY_MEDULLA = 11
    MYOCARDIUM = 12
    HEART_BLOOD = 13
    ARTERY = 14
    VEIN = 15
    CORTICAL_BONE = 16
    CANCELLOUS_BONE = 17
    DISC = 18
    CSF = 19
    BOWEL_WALL = 20
    BOWEL_CONTENT = 21
    GAS = 22
    TABLE_SHELL = 23
    TABLE_FOAM = 24
    METAL = 25
    PAD = 26  # a mattress or gel pad between the table and the patient
    STRAP = 27  # a restraint strap over the patient


@dataclass(frozen=True)
class Organ:
    """A deformed, rotated superellipsoid: centre and semi-axes in mm, rotation about z then y
    (radians), exponent (2 = ellipsoid, larger = boxier), taper along the local z axis."""

    centre: tuple[float, float, float]
    axes: tuple[float, float, float]
    rot_z: float = 0.0
    rot_y: float = 0.0
    power: float = 2.0
    taper: float = 0.0


@dataclass(frozen=True)
class Tube:
    """A centre line (n, 3) in mm with a radius per point and the tissue / label it paints."""

    points: NDArray[np.float64]
    radius: NDArray[np.float64]
    tissue: Tissue
    label: int


@dataclass(frozen=True)
class Anatomy:
    """Every random choice of one patient; rasterising is deterministic given this."""

    seed: int
    body_a: float  # lateral semi-axis of the skin outline (mm)
    body_b: float  # antero-posterior semi-axis
    body_harmonics: NDArray[np.float64]  # (k, 4): amplitude of cos/sin k*theta at 2 heights
    body_shift_y: float
    fat: float  # subcutaneous fat thickness (mm)
    muscle: float  # abdominal / thoracic wall muscle thickness
    z_low: float  # caudal end of the torso (pelvis)
    z_apex: float  # lung apices
    dome_right: float  # height of the right hemidiaphragm dome
    dome_left: float
    lung_half: tuple[float, float]  # lateral and AP semi-axes of each lung
    liver: Organ
    spleen: Organ
    kidney_left: Organ
    kidney_right: Organ
    heart: Organ
    spine_y: float
    spine_curve: NDArray[np.float64]  # (2,): lateral and AP sway amplitudes (mm)
    vertebra_period: float
    vertebra_phase: float
    disc: float
    tubes: tuple[Tube, ...]
    rotation: float  # patient roll about z (radians)
    offset: tuple[float, float]  # patient centre off the isocentre (x, y mm)
    table_y: float  # table top, mm posterior of the skin
    metal: tuple[float, float, float] | None  # a spinal screw position, if any
    warp: tuple[NDArray[np.float32], NDArray[np.float32]] = field(repr=False, default=None)  # type: ignore[assignment]
    warp_amplitude: tuple[float, float] = (6.0, 2.0)
    warp_wavelength: tuple[float, float] = (90.0, 30.0)
    # what surrounds the patient on a real table (drawn by the renderer, never by the anatomy's
    # own random stream, so a seed's patient stays the same):
    arms: tuple[float, float, float] | None = None  # arms beside the trunk: radius, gap, AP (mm)
    table_curve_mm: float = 0.0  # radius of a curved (cradle) table top; 0: flat
    pad_mm: float = 0.0  # mattress thickness on the table top
    strap: tuple[float, float] | None = None  # a strap over the trunk: z centre, width (mm)


def _u(rng: np.random.Generator, low: float, high: float) -> float:
    return float(rng.uniform(low, high))


def _rib_tubes(
    rng: np.random.Generator, a: float, b: float, spine_y: float, z_top: float, period: float
) -> list[Tube]:
    """Twelve pairs of ribs: from the transverse processes round the chest wall, sloping down."""
    tubes: list[Tube] = []
    drop = _u(rng, 0.6, 1.1)
    for i in range(12):
        z0 = z_top - 15.0 - i * period
        reach = np.pi * (0.78 - 0.02 * i) if i < 10 else np.pi * _u(rng, 0.35, 0.5)
        radius = _u(rng, 4.0, 5.5) * (0.8 if i in (0, 11) else 1.0)
        # lower ribs sweep wider: the rib cage is barrel shaped
        width = 0.65 + 0.25 * np.sin(np.pi * min(1.0, (i + 2) / 12.0))
        for side in (-1.0, 1.0):
            phi = np.linspace(0.12 * np.pi, reach, 90)
            x = side * (12.0 + (a * width - 12.0) * np.sin(phi) ** 0.8)
            y = spine_y + 10.0 - (b * 0.9 + 10.0) * (1 - np.cos(phi)) / 2 * 1.1
            z = z0 - drop * 45.0 * (1 - np.cos(phi)) / 2 - 8.0 * np.sin(phi)
            pts = np.stack([x, y, z], axis=1)
            tubes.append(
                Tube(pts, np.full(len(pts), radius), Tissue.CORTICAL_BONE, LABEL_VALUE["ribs"])
            )
    return tubes


def _branch(
    rng: np.random.Generator,
    start: NDArray[np.float64],
    direction: NDArray[np.float64],
    radius: float,
    depth: int,
    out: list[Tube],
) -> None:
    """A pulmonary vessel tree: each branch splits in two with a random turn."""
    length = _u(rng, 25.0, 45.0) * (0.85**depth)
    steps = np.linspace(0.0, 1.0, 12)[:, None]
    end = start + direction * length
    out.append(Tube(start + steps * (end - start), np.full(12, radius), Tissue.PULMONARY_VESSEL, 0))
    if depth >= 4 or radius < 1.2:
        return
    for _ in range(2):
        turn = rng.normal(0.0, 0.55, 3)
        child = direction + turn
        child /= np.linalg.norm(child)
        _branch(rng, end, child, radius * 0.72, depth + 1, out)


def _polyline(points: list[tuple[float, float, float]], n: int) -> NDArray[np.float64]:
    """A smooth centre line through control points (piecewise linear, densely resampled)."""
    ctrl = np.asarray(points, dtype=np.float64)
    seg = np.linalg.norm(np.diff(ctrl, axis=0), axis=1)
    t = np.concatenate([[0.0], np.cumsum(seg)])
    s = np.linspace(0.0, t[-1], n)
    line = np.stack([np.interp(s, t, ctrl[:, k]) for k in range(3)], axis=1)
    return np.asarray(ndimage.gaussian_filter1d(line, 3.0, axis=0, mode="nearest"))


def sample_anatomy(seed: int, *, size: float | None = None) -> Anatomy:
    """Draw one patient from ``seed``: size, shape, organ positions, vessels, implants."""
    rng = np.random.default_rng(seed)
    scale = size if size is not None else _u(rng, 0.82, 1.18)
    a = _u(rng, 150.0, 175.0) * scale
    b = _u(rng, 100.0, 125.0) * scale
    fat = _u(rng, 6.0, 32.0) * scale
    muscle = _u(rng, 7.0, 14.0)
    dome_r = _u(rng, 10.0, 30.0)
    dome_l = dome_r - _u(rng, 5.0, 22.0)
    z_apex = dome_r + _u(rng, 150.0, 195.0) * scale**0.5
    z_low = dome_l - _u(rng, 230.0, 280.0) * scale**0.5
    inner_a, inner_b = a - fat - muscle, b - fat - muscle
    lung = (inner_a * _u(rng, 0.36, 0.44), inner_b * _u(rng, 0.72, 0.85))
    liver = Organ(
        (-inner_a * _u(rng, 0.28, 0.42), -inner_b * _u(rng, 0.05, 0.25), dome_r - _u(rng, 60, 75)),
        (inner_a * _u(rng, 0.55, 0.68), inner_b * _u(rng, 0.62, 0.78), _u(rng, 65, 85)),
        rot_z=_u(rng, -0.2, 0.2),
        power=_u(rng, 2.0, 2.6),
        taper=_u(rng, 0.1, 0.35),
    )
    spleen = Organ(
        (inner_a * _u(rng, 0.5, 0.62), inner_b * _u(rng, 0.3, 0.5), dome_l - _u(rng, 45, 65)),
        (_u(rng, 20, 30), _u(rng, 45, 60), _u(rng, 40, 60)),
        rot_z=_u(rng, -0.9, -0.4),
        rot_y=_u(rng, -0.3, 0.3),
        power=2.2,
    )
    kz = liver.centre[2] - liver.axes[2] * _u(rng, 0.7, 1.0)
    ky = inner_b * _u(rng, 0.4, 0.55)
    kidneys = [
        Organ(
            (side * _u(rng, 60, 78) * scale, ky, kz + (20.0 if side > 0 else 0.0) + _u(rng, -8, 8)),
            (_u(rng, 24, 32), _u(rng, 20, 26), _u(rng, 45, 60)),
            rot_z=side * _u(rng, 0.3, 0.7),
            rot_y=side * _u(rng, 0.05, 0.25),
            power=2.0,
        )
        for side in (1.0, -1.0)
    ]
    heart = Organ(
        (_u(rng, 5, 30), -inner_b * _u(rng, 0.25, 0.4), dome_l + _u(rng, 40, 55)),
        (_u(rng, 55, 70) * scale**0.5, _u(rng, 42, 52) * scale**0.5, _u(rng, 48, 60)),
        rot_z=_u(rng, 0.3, 0.8),
        rot_y=_u(rng, -0.4, -0.1),
        power=2.0,
        taper=_u(rng, 0.1, 0.3),
    )
    spine_y = inner_b * _u(rng, 0.42, 0.55)
    period = _u(rng, 24.0, 30.0) * scale**0.5
    tubes: list[Tube] = []
    tubes += _rib_tubes(
        rng, inner_a + muscle * 0.5, inner_b + muscle * 0.5, spine_y, z_apex, period
    )
    # aorta: ascending from the heart, arch, descending left-anterior of the spine
    r_ao = _u(rng, 10.0, 14.0) * scale**0.5
    top = heart.centre[2] + heart.axes[2] * 0.9
    arch = min(top + _u(rng, 35, 55), z_apex - 25)
    aorta = _polyline(
        [
            (heart.centre[0] - 15, heart.centre[1] + 10, heart.centre[2] + 10),
            (5, heart.centre[1] + 5, top),
            (5, heart.centre[1] + 15, arch),
            (15, (heart.centre[1] + spine_y) / 2, arch + 8),
            (22, spine_y - 35, arch - 10),
            (20, spine_y - 32, dome_l - 40),
            (8, spine_y - 35, z_low + 25),
        ],
        240,
    )
    taper = np.linspace(1.0, 0.75, len(aorta))
    tubes.append(Tube(aorta, r_ao * taper, Tissue.ARTERY, LABEL_VALUE["aorta"]))
    # inferior vena cava: right of the spine, through the liver into the heart (unlabelled)
    ivc = _polyline(
        [
            (-25, spine_y - 30, z_low + 25),
            (-28, spine_y - 45, dome_r - 30),
            (-10, heart.centre[1], dome_r + 15),
        ],
        160,
    )
    tubes.append(Tube(ivc, np.full(len(ivc), _u(rng, 9, 13)), Tissue.VEIN, 0))
    # trachea and main bronchi (air, outside the lung labels)
    carina = np.array([0.0, heart.centre[1] + 40, heart.centre[2] + heart.axes[2] + 15])
    trachea = _polyline([(0.0, carina[1] - 25, z_apex + 40), tuple(carina)], 80)
    tubes.append(Tube(trachea, np.full(len(trachea), _u(rng, 8, 11)), Tissue.AIRWAY, 0))
    for side in (-1.0, 1.0):
        hilum = carina + np.array([side * lung[0] * 0.55, 5.0, -25.0])
        bronchus = _polyline([tuple(carina), tuple(hilum)], 40)
        tubes.append(Tube(bronchus, np.full(len(bronchus), 6.0), Tissue.AIRWAY, 0))
        vessels: list[Tube] = []
        for direction in (
            (side * 0.6, 0.2, 0.8),
            (side * 0.7, 0.3, -0.7),
            (side * 0.5, -0.6, -0.2),
        ):
            d = np.asarray(direction) / np.linalg.norm(direction)
            _branch(rng, hilum + np.array([0.0, -8.0, 0.0]), d, _u(rng, 4.5, 6.5), 0, vessels)
        tubes += vessels
    # bowel: a random walk through the lower abdomen
    walk = [np.array([_u(rng, -60, 60), -inner_b * 0.3, liver.centre[2] - liver.axes[2] * 0.8])]
    for _ in range(40):
        step = rng.normal(0.0, 1.0, 3) * np.array([30.0, 15.0, 12.0])
        nxt = walk[-1] + step
        nxt[0] = np.clip(nxt[0], -inner_a * 0.7, inner_a * 0.7)
        nxt[1] = np.clip(nxt[1], -inner_b * 0.75, inner_b * 0.2)
        nxt[2] = np.clip(nxt[2], z_low + 20, liver.centre[2] - liver.axes[2] * 0.6)
        walk.append(nxt)
    bowel = _polyline([tuple(p) for p in walk], 800)
    bowel_r = np.clip(ndimage.gaussian_filter1d(rng.uniform(7, 18, len(bowel)), 30), 7, 18)
    tubes.append(Tube(bowel, bowel_r, Tissue.BOWEL_CONTENT, 0))
    metal = None
    if rng.random() < 0.2:
        metal = (float(rng.choice([-18.0, 18.0])), spine_y + 5, _u(rng, z_low + 40, dome_l))
    warp = (rng.normal(0.0, 1.0, (3, 6, 6, 8)).astype(np.float32),
            rng.normal(0.0, 1.0, (3, 14, 14, 18)).astype(np.float32))  # fmt: skip
    return Anatomy(
        seed=seed,
        body_a=a,
        body_b=b,
        body_harmonics=rng.normal(0.0, 1.0, (4, 4)) * np.array([[0.0], [0.03], [0.04], [0.02]]),
        body_shift_y=_u(rng, -10, 10),
        fat=fat,
        muscle=muscle,
        z_low=z_low,
        z_apex=z_apex,
        dome_right=dome_r,
        dome_left=dome_l,
        lung_half=lung,
        liver=liver,
        spleen=spleen,
        kidney_left=kidneys[0],
        kidney_right=kidneys[1],
        heart=heart,
        spine_y=spine_y,
        spine_curve=rng.normal(0.0, 1.0, 2) * np.array([4.0, 8.0]),
        vertebra_period=period,
        vertebra_phase=_u(rng, 0, period),
        disc=_u(rng, 5.0, 8.0),
        tubes=tuple(tubes),
        rotation=_u(rng, -0.08, 0.08),
        offset=(_u(rng, -25, 25), _u(rng, -15, 15)),
        table_y=_u(rng, 0.0, 25.0),
        metal=metal,
        warp=warp,
        warp_amplitude=(_u(rng, 3.0, 8.0), _u(rng, 1.0, 3.0)),
    )
