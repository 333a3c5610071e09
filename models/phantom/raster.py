"""Rasterise an :class:`~phantom.anatomy.Anatomy` onto an axial LPS grid: a tissue index and a
label value per voxel, both sampled at the voxel centres.

The grid is axis aligned (rows along +y, columns along +x, slices along +z), the layout of an
axial CT or MR series; ``origin`` is the LPS centre of voxel ``[0, 0, 0]``. Work is restricted
to each structure's bounding box, so a 1.6 M-voxel training grid takes well under a second and a
20 M-voxel evaluation grid a few seconds.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from numpy.typing import NDArray
from scipy import ndimage  # type: ignore[import-untyped,unused-ignore]
from scipy.spatial import cKDTree  # type: ignore[import-untyped,unused-ignore]

from phantom.anatomy import LABEL_VALUE, Anatomy, Organ, Tissue

F32 = NDArray[np.float32]
_BOX = ((-260.0, 260.0), (-220.0, 220.0), (-420.0, 320.0))  # warp field extent (x, y, z mm)


@dataclass(frozen=True)
class AxialGrid:
    """Shape (z, y, x), spacing (dz, dy, dx) mm and LPS origin of voxel [0, 0, 0]."""

    shape: tuple[int, int, int]
    spacing: tuple[float, float, float]
    origin: tuple[float, float, float]

    def axis(self, i: int) -> NDArray[np.float64]:
        """World coordinate (mm) of each index along array axis ``i`` (0 = z, 1 = y, 2 = x)."""
        return np.arange(self.shape[i], dtype=np.float64) * self.spacing[i] + self.origin[2 - i]


@dataclass(frozen=True)
class Raster:
    """Tissue indices and label values on one grid."""

    grid: AxialGrid
    tissue: NDArray[np.uint8]
    labels: NDArray[np.uint8]


def _rbf_weights(
    coords: NDArray[np.float64], low: float, high: float, n: int
) -> NDArray[np.float32]:
    """Gaussian interpolation weights of coordinates onto n nodes: a smooth field from a coarse
    random lattice without the kinks of linear interpolation."""
    nodes = np.linspace(low, high, n)
    width = (high - low) / (n - 1)
    w = np.exp(-0.5 * ((coords[:, None] - nodes[None, :]) / width) ** 2)
    w /= w.sum(axis=1, keepdims=True) + 1e-12
    return np.asarray(w, dtype=np.float32)


def _field(
    lattice: NDArray[np.float32],
    xs: NDArray[np.float64],
    ys: NDArray[np.float64],
    zs: NDArray[np.float64],
) -> F32:
    """Separable evaluation of a (3, nx, ny, nz) lattice on the outer product of 1D coordinates;
    returns (3, len(zs), len(ys), len(xs))."""
    wx = _rbf_weights(xs, *_BOX[0], lattice.shape[1])
    wy = _rbf_weights(ys, *_BOX[1], lattice.shape[2])
    wz = _rbf_weights(zs, *_BOX[2], lattice.shape[3])
    out = np.einsum("cabd,xa->cxbd", lattice, wx)
    out = np.einsum("cxbd,yb->cxyd", out, wy)
    out = np.einsum("cxyd,zd->czyx", out, wz)
    return np.asarray(out, dtype=np.float32)


def _field_at(lattice: NDArray[np.float32], points: NDArray[np.float64]) -> NDArray[np.float64]:
    """The same field at scattered points (n, 3) -> (n, 3)."""
    wx = _rbf_weights(points[:, 0], *_BOX[0], lattice.shape[1])
    wy = _rbf_weights(points[:, 1], *_BOX[1], lattice.shape[2])
    wz = _rbf_weights(points[:, 2], *_BOX[2], lattice.shape[3])
    out: NDArray[np.float64] = np.einsum("cabd,na,nb,nd->nc", lattice, wx, wy, wz).astype(
        np.float64
    )
    return out


class _Coords:
    """Anatomical coordinates of every voxel: world minus patient offset, un-rolled, warped."""

    def __init__(self, anatomy: Anatomy, grid: AxialGrid) -> None:
        zs, ys, xs = grid.axis(0), grid.axis(1), grid.axis(2)
        ox, oy = anatomy.offset
        c, s = np.cos(anatomy.rotation), np.sin(anatomy.rotation)
        xw = (xs - ox)[None, None, :].astype(np.float32)
        yw = (ys - oy)[None, :, None].astype(np.float32)
        shape = grid.shape
        self.x = np.broadcast_to(c * xw + s * yw, shape).astype(np.float32)
        self.y = np.broadcast_to(-s * xw + c * yw, shape).astype(np.float32)
        self.z = np.broadcast_to(zs[:, None, None].astype(np.float32), shape).astype(np.float32)
        for lattice, amp in zip(anatomy.warp, anatomy.warp_amplitude, strict=True):
            d = _field(lattice, xs - ox, ys - oy, zs) * np.float32(amp)
            self.x += d[0]
            self.y += d[1]
            self.z += d[2]

    def box(self, lo: NDArray[np.float64], hi: NDArray[np.float64]) -> tuple[slice, slice, slice]:
        """Index box of voxels whose anatomical coordinates may fall in [lo, hi] (x, y, z)."""
        sl: list[slice] = []
        for arr_axis, coord in ((0, self.z), (1, self.y), (2, self.x)):
            k = 2 - arr_axis
            other = tuple(a for a in range(3) if a != arr_axis)
            cmin = coord.min(axis=other)
            cmax = coord.max(axis=other)
            inside = np.nonzero((cmax >= lo[k]) & (cmin <= hi[k]))[0]
            sl.append(slice(int(inside[0]), int(inside[-1]) + 1) if inside.size else slice(0, 0))
        return (sl[0], sl[1], sl[2])


def _organ(coords: _Coords, organ: Organ, margin: float = 1.35) -> tuple[tuple[slice, ...], F32]:
    """The superellipsoid function f (< 1 inside) on the organ's bounding box."""
    centre = np.asarray(organ.centre)
    reach = max(organ.axes) * margin * (1 + abs(organ.taper))
    box = coords.box(centre - reach, centre + reach)
    x = coords.x[box] - np.float32(centre[0])
    y = coords.y[box] - np.float32(centre[1])
    z = coords.z[box] - np.float32(centre[2])
    cz, sz = np.float32(np.cos(organ.rot_z)), np.float32(np.sin(organ.rot_z))
    x, y = cz * x + sz * y, -sz * x + cz * y
    cy, sy = np.float32(np.cos(organ.rot_y)), np.float32(np.sin(organ.rot_y))
    x, z = cy * x - sy * z, sy * x + cy * z
    w = z / np.float32(organ.axes[2])
    shrink = np.maximum(np.float32(0.3), 1 + np.float32(organ.taper) * w)
    u = x / np.float32(organ.axes[0]) / shrink
    v = y / np.float32(organ.axes[1]) / shrink
    p = np.float32(organ.power)
    f = np.abs(u) ** p + np.abs(v) ** p + np.abs(w) ** p
    return box, np.asarray(f, dtype=np.float32)


def _dome(anatomy: Anatomy, x: F32, y: F32) -> F32:
    """Height of the diaphragm (mm) under each (x, y): two domes, deeper recesses posteriorly."""
    la, lb = anatomy.lung_half
    out = np.empty_like(x)
    right = x < 0
    for side, height, mask in ((-1.0, anatomy.dome_right, right), (1.0, anatomy.dome_left, ~right)):
        cx = side * (anatomy.body_a - anatomy.fat - anatomy.muscle - la - 8.0)
        r2 = ((x - cx) / la) ** 2 + (y / lb) ** 2
        out[mask] = (height - 45.0 * r2 - 18.0 * np.clip(y / lb, 0, None))[mask]
    return out


def _tubes(
    anatomy: Anatomy, coords: _Coords, grid: AxialGrid
) -> tuple[NDArray[np.intp], NDArray[np.float32], NDArray[np.int64]]:
    """Voxels within any tube: flat voxel indices, distance to the nearest centre-line point
    (mm, in anatomical coordinates) and that point's index into the stacked tube points."""
    pts = np.concatenate([t.points for t in anatomy.tubes])
    radius = np.concatenate([t.radius for t in anatomy.tubes])
    # world positions of the centre lines: first-order inverse of the warp, then roll and offset
    q = pts.copy()
    for lattice, amp in zip(anatomy.warp, anatomy.warp_amplitude, strict=True):
        q -= _field_at(lattice, pts) * amp
    c, s = np.cos(anatomy.rotation), np.sin(anatomy.rotation)
    wx = c * q[:, 0] - s * q[:, 1] + anatomy.offset[0]
    wy = s * q[:, 0] + c * q[:, 1] + anatomy.offset[1]
    idx = np.stack(
        [
            np.rint((q[:, 2] - grid.origin[2]) / grid.spacing[0]),
            np.rint((wy - grid.origin[1]) / grid.spacing[1]),
            np.rint((wx - grid.origin[0]) / grid.spacing[2]),
        ],
        axis=1,
    ).astype(np.int64)
    margin = (radius.max() + 3.0) / np.asarray(grid.spacing)
    lo = np.maximum(0, np.floor(idx.min(axis=0) - margin)).astype(int)
    hi = np.minimum(grid.shape, np.ceil(idx.max(axis=0) + margin + 1)).astype(int)
    empty = (np.zeros(0, np.intp), np.zeros(0, np.float32), np.zeros(0, np.int64))
    if np.any(hi <= lo):
        return empty
    sub = tuple(int(h - low) for h, low in zip(hi, lo, strict=True))
    seeds = np.ones(sub, dtype=bool)
    local = idx - lo
    ok = np.all((local >= 0) & (local < np.asarray(sub)), axis=1)
    seeds[tuple(local[ok].T)] = False
    dist = ndimage.distance_transform_edt(seeds, sampling=grid.spacing)
    diag = float(np.linalg.norm(grid.spacing))
    cand = np.nonzero(dist <= radius.max() + diag)
    flat = np.ravel_multi_index(tuple(c + low for c, low in zip(cand, lo, strict=True)), grid.shape)
    xyz = np.stack([coords.x.ravel()[flat], coords.y.ravel()[flat], coords.z.ravel()[flat]], 1)
    d, nearest = cKDTree(pts).query(xyz, distance_upper_bound=float(radius.max()))
    inside = d <= radius[np.minimum(nearest, len(pts) - 1)]
    return flat[inside], d[inside].astype(np.float32), nearest[inside]


def rasterise(anatomy: Anatomy, grid: AxialGrid) -> Raster:
    """Tissue and label of every voxel centre of ``grid``."""
    coords = _Coords(anatomy, grid)
    t = np.zeros(grid.shape, dtype=np.uint8)
    lab = np.zeros(grid.shape, dtype=np.uint8)
    x, y, z = coords.x, coords.y, coords.z
    a = anatomy

    # body wall: skin, subcutaneous fat, muscle; the cavity holds visceral fat
    theta = np.arctan2(y, x)
    h = a.body_harmonics
    bulge = np.ones_like(x)
    blend = np.clip((z - a.z_low) / (a.z_apex - a.z_low), 0, 1)
    for k in range(1, h.shape[0]):
        ck = h[k, 0] * (1 - blend) + h[k, 2] * blend
        sk = h[k, 1] * (1 - blend) + h[k, 3] * blend
        bulge += np.float32(1) * (ck * np.cos(k * theta) + sk * np.sin(k * theta)).astype(
            np.float32
        )
    yy = y - np.float32(a.body_shift_y)
    post = yy > 0
    rho = np.sqrt(
        (x / a.body_a) ** 2 + np.where(post, np.abs(yy / a.body_b) ** 2.6, (yy / a.body_b) ** 2)
    )
    radius = np.sqrt(x**2 + yy**2) / np.maximum(rho, 1e-3)
    depth = (bulge - rho) * radius  # mm inside the skin, approximately
    del theta, rho, radius, bulge
    body = depth > 0
    t[body] = Tissue.VISCERAL_FAT
    t[body & (depth < a.fat + a.muscle)] = Tissue.MUSCLE
    t[body & (depth < a.fat)] = Tissue.FAT
    t[body & (depth < 2.0)] = Tissue.SKIN
    lab[body] = LABEL_VALUE["body"]
    cavity = depth > a.fat + a.muscle
    strap = np.zeros(grid.shape, dtype=bool)
    if a.strap is not None:  # over the front and sides, 2.5 mm thick on the skin
        strap = (depth <= 0) & (depth > -2.5) & (np.abs(z - a.strap[0]) < a.strap[1] / 2)
        strap &= y < a.body_b * 0.3
    del depth

    # spine centre line and paraspinal muscles
    xs = np.float32(a.spine_curve[0]) * np.sin(z / np.float32(200.0))
    ys = np.float32(a.spine_y) + np.float32(a.spine_curve[1]) * np.sin(
        (z - a.dome_left) / np.float32(250.0)
    )
    grow = 1 + 0.25 * np.clip((a.dome_left - z) / 200.0, -1, 1)
    t[cavity & (np.abs(x - xs) < 55 * grow) & (y > ys)] = Tissue.MUSCLE

    tissue_flat, label_flat = t.reshape(-1), lab.reshape(-1)
    cavity_flat = cavity.reshape(-1)

    # tubes: found once, painted in anatomical order below
    flat, dist, nearest = _tubes(a, coords, grid)
    owner = np.concatenate([np.full(len(tb.points), i) for i, tb in enumerate(a.tubes)])
    tube_of = owner[nearest] if len(nearest) else np.zeros(0, dtype=np.int64)
    kinds = np.array([tb.tissue for tb in a.tubes])
    pts = np.concatenate([tb.points for tb in a.tubes])

    def paint_tubes(kind: Tissue, allowed: NDArray[np.bool_] | None = None) -> NDArray[np.intp]:
        sel = kinds[tube_of] == kind if len(tube_of) else np.zeros(0, dtype=bool)
        where: NDArray[np.intp] = flat[sel]
        if allowed is not None:
            kept: NDArray[np.intp] = where[allowed[where]]
            return kept
        return where

    # bowel (gas on the anterior, non-dependent side of some loops)
    bowel_sel = kinds[tube_of] == Tissue.BOWEL_CONTENT if len(tube_of) else np.zeros(0, bool)
    bw = flat[bowel_sel]
    keep = cavity_flat[bw] & (tissue_flat[bw] == Tissue.VISCERAL_FAT)
    bw_d, bw_pt = dist[bowel_sel][keep], nearest[bowel_sel][keep]
    bw = bw[keep]
    rad = np.concatenate([tb.radius for tb in a.tubes])[bw_pt]
    tissue_flat[bw] = Tissue.BOWEL_CONTENT
    tissue_flat[bw[bw_d > rad - 2.5]] = Tissue.BOWEL_WALL
    gas_loop = (np.sin(bw_pt * 0.05 + a.seed) > 0.2) & (bw_d < rad - 2.5)
    above = y.reshape(-1)[bw] < pts[bw_pt, 1] - 0.2 * rad
    tissue_flat[bw[gas_loop & above]] = Tissue.GAS

    # solid organs (below the diaphragm), lungs (above), heart
    # The kidneys are retroperitoneal: perirenal fat (thicker in a fatter patient) keeps the liver
    # and spleen off them, so each kidney is painted last inside its own fat capsule.
    dome = _dome(a, x, y)
    perirenal_mm = 3.0 + 0.3 * a.fat
    for organ, tissue, name in (
        (a.spleen, Tissue.SPLEEN, "spleen"),
        (a.liver, Tissue.LIVER, "liver"),
        (a.kidney_left, Tissue.KIDNEY_CORTEX, "kidney_left"),
        (a.kidney_right, Tissue.KIDNEY_CORTEX, "kidney_right"),
    ):
        box, f = _organ(coords, organ)
        below = cavity[box] & (z[box] < dome[box] - 4.0)
        if tissue is Tissue.KIDNEY_CORTEX:
            capsule = (1 + perirenal_mm / np.mean(organ.axes[:2])) ** organ.power
            fat = (f < capsule) & below
            t[box][fat] = Tissue.VISCERAL_FAT
            lab[box][fat] = LABEL_VALUE["body"]
        inside = (f < 1) & below
        t[box][inside] = tissue
        lab[box][inside] = LABEL_VALUE[name]
        if tissue is Tissue.KIDNEY_CORTEX:
            t[box][inside & (f < 0.4)] = Tissue.KIDNEY_MEDULLA

    la, lb = a.lung_half
    zb = slice(None)
    for side, name in ((-1.0, "lung_right"), (1.0, "lung_left")):
        cx = side * (a.body_a - a.fat - a.muscle - la - 8.0)
        top = a.z_apex - 70.0
        prof = np.where(z[zb] < top, 1.0, np.sqrt(np.clip(1 - ((z[zb] - top) / 70.0) ** 2, 0, 1)))
        ell = ((x - cx) / la) ** 2 + ((y - 5.0) / lb) ** 2 < prof**2
        lung = ell & cavity & (side * x > 10.0) & (z > dome) & (z < a.z_apex)
        t[lung] = Tissue.LUNG
        lab[lung] = LABEL_VALUE[name]
    lungs = (t == Tissue.LUNG).reshape(-1)

    box, f = _organ(coords, a.heart)
    heart = (f < 1) & cavity[box] & (z[box] > dome[box] - 6.0)
    t[box][heart] = Tissue.MYOCARDIUM
    t[box][heart & (f < 0.55)] = Tissue.HEART_BLOOD
    lab[box][heart] = LABEL_VALUE["heart"]
    lungs &= tissue_flat == Tissue.LUNG

    tissue_flat[paint_tubes(Tissue.PULMONARY_VESSEL, lungs)] = Tissue.PULMONARY_VESSEL
    inner = body.reshape(-1)
    for kind in (Tissue.VEIN, Tissue.AIRWAY):
        where = paint_tubes(kind, inner)
        where = where[label_flat[where] != LABEL_VALUE["heart"]]
        tissue_flat[where] = kind
        label_flat[where] = LABEL_VALUE["body"]
    # the aorta begins at the aortic valve, on the heart's surface: the root inside the heart
    # is heart, as an annotator would draw it
    where = paint_tubes(Tissue.ARTERY, inner)
    where = where[label_flat[where] != LABEL_VALUE["heart"]]
    tissue_flat[where] = Tissue.ARTERY
    label_flat[where] = LABEL_VALUE["aorta"]

    # spine: vertebral bodies (cortical shell, cancellous core), discs, canal, arches
    reach = 60.0 * 1.3
    box = coords.box(
        np.array([-reach, a.spine_y - 40, -1e4]), np.array([reach, a.spine_y + 110, 1e4])
    )
    bx, by, bz = x[box], y[box], z[box]
    sx, sy, g = xs[box], ys[box], grow[box]
    ra, rb = 21.0 * g, 17.0 * g
    e = np.sqrt(((bx - sx) / ra) ** 2 + ((by - sy) / rb) ** 2)
    phase = np.mod(bz - a.vertebra_phase, a.vertebra_period)
    disc = phase < a.disc
    endplate = (phase < a.disc + 1.5) | (phase > a.vertebra_period - 1.5)
    vb = e < 1
    canal_y = sy + rb + 9.0
    rc = np.sqrt((bx - sx) ** 2 + (by - canal_y) ** 2)
    mid = (phase > a.disc + 2) & (phase < a.vertebra_period - 2)
    ring = (rc < 16.0 * g) & (rc >= 9.0) & ~disc & (by > sy)
    spinous = (np.abs(bx - sx) < 4.0) & (by > canal_y + 10) & (by < canal_y + 38 * g) & mid
    transverse = (np.abs(by - canal_y + 4) < 5.0) & (np.abs(bx - sx) < 36.0 * g) & mid
    arch = (ring | spinous | transverse) & ~vb
    tb, lb_ = t[box], lab[box]
    tb[vb] = Tissue.CANCELLOUS_BONE
    tb[vb & ((e > 1 - 2.0 / ra) | endplate)] = Tissue.CORTICAL_BONE
    tb[vb & disc] = Tissue.DISC
    tb[arch] = Tissue.CORTICAL_BONE
    tb[(rc < 9.0) & ~vb] = Tissue.CSF
    lb_[vb | arch] = LABEL_VALUE["spine"]
    lb_[(rc < 9.0) & ~vb] = LABEL_VALUE["body"]

    # ribs: cortical shell around marrow
    sel = kinds[tube_of] == Tissue.CORTICAL_BONE if len(tube_of) else np.zeros(0, bool)
    rib, rib_d, rib_pt = flat[sel], dist[sel], nearest[sel]
    keep = inner[rib]
    rib, rib_d, rib_pt = rib[keep], rib_d[keep], rib_pt[keep]
    rad = np.concatenate([tb_.radius for tb_ in a.tubes])[rib_pt]
    tissue_flat[rib] = np.where(rib_d > rad - 1.6, Tissue.CORTICAL_BONE, Tissue.CANCELLOUS_BONE)
    label_flat[rib] = LABEL_VALUE["ribs"]

    if a.metal is not None:
        mx, my, mz = a.metal
        screw = (np.sqrt((x - mx) ** 2 + (z - mz) ** 2) < 3.0) & (y > my - 35) & (y < my + 10)
        t[screw & body] = Tissue.METAL

    patient = body | _paint_arms(a, x, y, t, lab, body)
    t[strap & ~patient] = Tissue.STRAP

    # the table, in world coordinates under the patient: flat, or a cradle whose edges rise
    ys_world = grid.axis(1)[None, :, None]
    reach_b = a.body_b * (1 + float(np.abs(a.body_harmonics).sum())) + a.body_shift_y
    xs_world = grid.axis(2)[None, None, :]
    across = xs_world - a.offset[0]
    table_top = np.full(across.shape, a.offset[1] + reach_b + a.table_y)
    if a.table_curve_mm > 0:
        cradle = a.table_curve_mm
        table_top -= cradle - np.sqrt(np.clip(cradle**2 - across**2, 0, None))
    width = np.abs(across) < 230.0
    bed = (ys_world >= table_top) & (ys_world < table_top + 45.0) & width
    bed = np.broadcast_to(bed, grid.shape) & ~patient
    shell = bed & ((ys_world < table_top + 3.0) | (ys_world > table_top + 42.0))
    t[bed] = Tissue.TABLE_FOAM
    t[shell] = Tissue.TABLE_SHELL
    if a.pad_mm > 0:  # the mattress fills the gap and yields to the patient
        pad = (ys_world >= table_top - a.pad_mm) & (ys_world < table_top) & width
        t[np.broadcast_to(pad, grid.shape) & ~patient & (t == Tissue.AIR)] = Tissue.PAD
    return Raster(grid, t, lab)


def _paint_arms(
    a: Anatomy,
    x: F32,
    y: F32,
    t: NDArray[np.uint8],
    lab: NDArray[np.uint8],
    body: NDArray[np.bool_],
) -> NDArray[np.bool_]:
    """Both arms beside the trunk along the whole series (skin, fat, muscle round a humerus
    with fatty marrow), labelled body: they are the patient. Returns where they are."""
    arms = np.zeros(t.shape, dtype=bool)
    if a.arms is None:
        return arms
    radius, gap, ap = a.arms
    for side in (-1.0, 1.0):  # gap 0: the arm rests on the trunk's widest point
        cx = side * (a.body_a + gap + radius)
        rho = np.sqrt(((x - cx) / (radius * 0.85)) ** 2 + ((y - ap) / radius) ** 2)
        depth = (1 - rho) * radius * 0.85  # mm inside the arm's skin, roughly
        arm = (depth > 0) & ~body
        bone = np.hypot(x - cx, y - ap)
        t[arm] = Tissue.MUSCLE
        t[arm & (depth < 8.0)] = Tissue.FAT
        t[arm & (depth < 2.0)] = Tissue.SKIN
        t[arm & (bone < 11.0)] = Tissue.CORTICAL_BONE
        t[arm & (bone < 8.0)] = Tissue.FAT  # fatty marrow of the shaft
        lab[arm] = LABEL_VALUE["body"]
        arms |= arm
    return arms
