"""Classical CT localisation of body, lungs (left and right) and bone: no learning, so it works on
any CT of any field of view and anchors what the learned models find.

Thresholds sit at the midpoint between the two tissues a boundary separates, so a voxel that is
half one tissue and half the other falls on the side the majority is on, and volumes carry no
partial-volume bias:

- body against air: air -1000 HU, soft tissue about 0 HU -> **-500 HU**;
- aerated lung against soft tissue: lung parenchyma about -850 HU, soft tissue about +40 HU; the
  boundary the eye and the reference masks draw is the pleura, at about -400..-500 -> **-500 HU**
  (one threshold for both, so the lung surface and the skin are treated alike);
- bone against soft tissue: soft tissue about +40 HU; a bone's outer layer at clinical
  resolution (a 1-2 mm cortex averaged with the marrow beside it inside one voxel) about
  +450..+600 HU -> **+250 HU**. A higher threshold (the midpoint to dense cortex, ~+500) breaks
  thin cortices into fragments and the marrow can then no longer be filled. Holes inside bone
  are filled when their mean is above +100 HU (red marrow, trabecular bone), so the spinal canal
  (CSF and cord, 0..+40 HU) stays out.

The patient table (and head rest) is removed by an in-plane opening of 5 mm radius before
components are taken: table tops, head rests and mattress shells are thin plates (carbon-fibre
skins of 1-3 mm around a foam core below -500 HU), the body is not. Decisions (components,
table, left/right) are made on a working grid of about 1.5 mm; the masks themselves are cut
from the full-resolution thresholds, so their boundaries are exact.

Labels are exclusive: ``body`` holds the body voxels no more specific label claims, so the body
outline is the union of all labels. Known limits: contrast-filled vessels, bowel and kidneys
above +250 HU are taken as bone; large bowel-gas pockets in an abdomen-only scan can be taken as
lung; a neck CT that holds only the lung apices, each under a tenth of the body's
cross-section, finds no lung; fatty marrow (long-bone shafts) is not filled; a cushion denser
than -500 HU that the patient lies in with no gap is part of the body.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import numpy as np
from numpy.typing import NDArray
from scipy import ndimage  # type: ignore[import-untyped,unused-ignore]

AIR_BODY_HU = -500.0
LUNG_HU = -500.0
BONE_HU = 250.0
MARROW_HU = 100.0
TABLE_OPENING_MM = 5.0
WORK_SPACING_MM = 1.5
KEEP_FRACTION = 0.10  # a body part (an arm) is kept when at least this fraction of the largest
LUNG_MIN_AREA_MM2 = 400.0  # a lung shows at least 4 cm2 in its largest slice
LUNG_MIN_VOLUME_ML = 15.0  # ... and, in a series thicker than 3 cm, at least this volume
# ... and fills at least this share of the body's cross-section there: a lung at its widest
# fills a third or more of the chest, the paranasal sinuses of a head CT (10-15 mL, 6-10 cm2)
# a twentieth of the head
LUNG_MIN_SECTION_SHARE = 0.10
BONE_MIN_VOLUME_ML = 0.05
FILL_SLAB = 32  # slices worked at once where slices are independent (memory, not results)
MAX_SPLIT_DEPTH_MM = 30.0

BODY, LUNG_LEFT, LUNG_RIGHT, BONE = 1, 2, 3, 4
LABELS: dict[int, str] = {
    BODY: "body",
    LUNG_LEFT: "lung_left",
    LUNG_RIGHT: "lung_right",
    BONE: "bone",
}

Spacing = tuple[float, float, float]


def _factors(spacing: Spacing, work_mm: float = WORK_SPACING_MM) -> tuple[int, int, int]:
    """Block sizes that bring each axis nearest to the working spacing (never finer)."""
    return (
        max(1, round(work_mm / spacing[0])),
        max(1, round(work_mm / spacing[1])),
        max(1, round(work_mm / spacing[2])),
    )


def _block_mean(array: NDArray[Any], f: tuple[int, int, int]) -> NDArray[np.float32]:
    """Mean over f-sized blocks (edges padded by replication), for the working grid. Worked
    a slab of whole blocks at a time, so the float copy is a slab's, not the series'."""
    if f == (1, 1, 1):
        return np.asarray(array, dtype=np.float32)
    step = f[0] * max(1, FILL_SLAB // f[0])
    slabs = [_slab_block_mean(array[z0 : z0 + step], f) for z0 in range(0, array.shape[0], step)]
    return np.concatenate(slabs, axis=0)


def _slab_block_mean(array: NDArray[Any], f: tuple[int, int, int]) -> NDArray[np.float32]:
    pad = [(0, (-n) % k) for n, k in zip(array.shape, f, strict=True)]
    padded = np.pad(np.asarray(array, dtype=np.float32), pad, mode="edge")
    z, y, x = (n // k for n, k in zip(padded.shape, f, strict=True))
    blocks = padded.reshape(z, f[0], y, f[1], x, f[2])
    return np.asarray(blocks.mean(axis=(1, 3, 5), dtype=np.float32))


def _upsample(array: NDArray[Any], f: tuple[int, int, int], shape: tuple[int, ...]) -> NDArray[Any]:
    """Nearest-neighbour inverse of :func:`_block_mean`'s grid."""
    if f == (1, 1, 1):
        return array
    out = array
    for axis, k in enumerate(f):
        if k > 1:
            out = np.repeat(out, k, axis=axis)
    return out[: shape[0], : shape[1], : shape[2]]


def _inplane_opening(mask: NDArray[np.bool_], spacing: Spacing, radius_mm: float) -> NDArray[Any]:
    """Opening slice by slice with a disk of ``radius_mm``, via distance transforms (exact disk,
    cost independent of the radius). A huge z sampling keeps the transform within each slice."""
    sampling = (1e6, spacing[1], spacing[2])
    eroded: NDArray[Any] = ndimage.distance_transform_edt(mask, sampling=sampling) > radius_mm
    if not eroded.any():
        return eroded
    result: NDArray[Any] = ndimage.distance_transform_edt(~eroded, sampling=sampling) <= radius_mm
    return result


def _dilate_mm(mask: NDArray[np.bool_], spacing: Spacing, radius_mm: float) -> NDArray[Any]:
    if not mask.any():
        return mask.copy()
    result: NDArray[Any] = ndimage.distance_transform_edt(~mask, sampling=spacing) <= radius_mm
    return result


def fill_slices(
    mask: NDArray[np.bool_],
    *,
    close_field_edge: bool = False,
    padded: NDArray[np.bool_] | None = None,
) -> NDArray[np.bool_]:
    """2D hole filling per axial slice: lungs, airways and gas are enclosed in a slice even where
    they reach the outside in 3D (the airway through the larynx). The background is labelled
    in-plane (4-connectivity, as ``binary_fill_holes``), :data:`FILL_SLAB` slices at a time so
    the labels' memory is a slab's, not the series': what does not reach a slice's edge is a
    hole.

    ``close_field_edge``: where the patient is cut by the reconstructed field (a targeted or
    cardiac field), the field's edge between the first and last ``mask`` pixel along it counts
    as closed, so lung air that reaches the edge there is still inside the patient. The field is
    the image's rectangle, or, in a slice ``padded`` says the scanner padded beyond the
    reconstruction circle inscribed in the matrix (one value everywhere outside it) and where
    the patient reaches that circle, the circle: its four quarter arcs then play the
    rectangle's four sides. Without ``padded`` the circle is never used: real air outside it
    cannot be told from padding by the mask alone."""
    if mask.shape[0] <= FILL_SLAB:
        return _fill_slab(mask, close_field_edge, padded)
    out = np.empty(mask.shape, dtype=bool)
    for z0 in range(0, mask.shape[0], FILL_SLAB):
        z1 = z0 + FILL_SLAB
        out[z0:z1] = _fill_slab(
            mask[z0:z1], close_field_edge, None if padded is None else padded[z0:z1]
        )
    return out


def _fill_slab(
    mask: NDArray[np.bool_], close_field_edge: bool, padded: NDArray[np.bool_] | None
) -> NDArray[np.bool_]:
    """:func:`fill_slices` on a slab of slices (no step connects slices, so slabs are
    independent: labelling slab by slab bounds the int32 labels to one slab's size)."""
    structure = np.zeros((3, 3, 3), dtype=bool)
    structure[1] = ndimage.generate_binary_structure(2, 1)
    circle = (
        _reconstruction_circle(mask.shape[1:])
        if close_field_edge and padded is not None and padded.any()
        else None
    )
    round_slices: NDArray[np.bool_] = np.zeros(mask.shape[0], dtype=bool)
    if circle is not None:
        outside, arcs = circle
        ring = np.concatenate(arcs)
        touching = mask[:, ring[:, 0], ring[:, 1]].any(axis=1)
        round_slices = np.asarray(
            np.asarray(padded, dtype=bool) & ~mask[:, outside].any(axis=1) & touching, dtype=bool
        )
    blocked = outside[None] & round_slices[:, None, None] if circle is not None else None
    free = ~mask if blocked is None else ~mask & ~blocked
    background, count = ndimage.label(free, structure=structure)
    reaches_edge = np.zeros(count + 1, dtype=bool)
    square, square_mask = background[~round_slices], mask[~round_slices]
    edges = [
        (square[:, 0], square_mask[:, 0]),
        (square[:, -1], square_mask[:, -1]),
        (square[:, :, 0], square_mask[:, :, 0]),
        (square[:, :, -1], square_mask[:, :, -1]),
    ]
    if circle is not None and round_slices.any():
        round_background, round_mask = background[round_slices], mask[round_slices]
        for arc in circle[1]:
            edges.append(
                (round_background[:, arc[:, 0], arc[:, 1]], round_mask[:, arc[:, 0], arc[:, 1]])
            )
    for edge, tissue in edges:
        open_ = np.ones(edge.shape, dtype=bool)
        if close_field_edge:
            index = np.arange(edge.shape[1])
            first = np.argmax(tissue, axis=1)[:, None]
            last = edge.shape[1] - 1 - np.argmax(tissue[:, ::-1], axis=1)[:, None]
            present = np.asarray(tissue.any(axis=1), dtype=bool)[:, None]
            between = (index >= first) & (index <= last) & present
            open_ = ~between
        reaches_edge[edge[open_]] = True
    reaches_edge[0] = False
    filled: NDArray[np.bool_] = ~reaches_edge[background]
    if blocked is not None:
        filled &= ~blocked
    return filled


def _reconstruction_circle(
    shape: tuple[int, ...],
) -> tuple[NDArray[np.bool_], tuple[NDArray[np.intp], ...]] | None:
    """The pixels outside the circle (ellipse) inscribed in a slice of ``shape``, and the pixels
    just inside its edge as four arcs (right, bottom, left, top), each ordered along the edge;
    ``None`` for a matrix too small to have one."""
    ny, nx = int(shape[0]), int(shape[1])
    if min(ny, nx) < 8:
        return None
    rows, cols = np.mgrid[0:ny, 0:nx]
    dy, dx = (rows - (ny - 1) / 2) / (ny / 2), (cols - (nx - 1) / 2) / (nx / 2)
    outside = dy**2 + dx**2 > 1.0
    cross = ndimage.generate_binary_structure(2, 1)
    ring = ~outside & ndimage.binary_dilation(outside, structure=cross)
    r, c = np.nonzero(ring)
    angle = np.arctan2(dy[r, c], dx[r, c])  # 0: right, pi/2: bottom (rows grow downwards)
    quarter = np.floor((angle + np.pi / 4) / (np.pi / 2)).astype(int) % 4
    arcs = []
    for q in range(4):
        sel = np.flatnonzero(quarter == q)
        turn = (angle[sel] - (q * np.pi / 2 - np.pi / 4)) % (2 * np.pi)
        order = sel[np.argsort(turn, kind="stable")]
        arcs.append(np.stack([r[order], c[order]], axis=1))
    return outside, tuple(arcs)


def _components(mask: NDArray[np.bool_]) -> tuple[NDArray[np.int32], NDArray[np.int64]]:
    labels, count = ndimage.label(mask)
    sizes = np.bincount(labels.ravel(), minlength=count + 1)
    sizes[0] = 0
    return np.asarray(labels, dtype=np.int32), sizes


def _body(
    work: NDArray[np.float32],
    spacing: Spacing,
    close_field_edge: bool = False,
    padded: NDArray[np.bool_] | None = None,
) -> tuple[NDArray[np.bool_], NDArray[np.bool_]]:
    """The body on the working grid (table removed, holes filled) and what was taken for the
    table (thin dense structures reaching beyond the body's margin)."""
    dense = work > AIR_BODY_HU
    opened = _inplane_opening(dense, spacing, TABLE_OPENING_MM)
    labels, sizes = _components(opened)
    if sizes.max(initial=0) == 0:
        return np.zeros_like(dense), np.zeros_like(dense)
    keep = sizes >= KEEP_FRACTION * sizes.max()
    keep[0] = False
    core = keep[labels]
    # The opening also took detail from the body (skin folds, ears, fingers). Thin pieces that
    # stay within the margin of what was kept are given back; a thin piece that reaches beyond
    # it (a table skin running under the patient, a head rest) is dropped whole, even where it
    # touches the body.
    inplane = (1e6, spacing[1], spacing[2])
    near = _dilate_mm(core, inplane, TABLE_OPENING_MM + max(spacing[1:]))
    thin = dense & ~opened
    pieces, _ = _components(thin)
    foreign = np.unique(pieces[thin & ~near])
    table = np.isin(pieces, foreign[foreign > 0])
    restored = core | (thin & near & ~table)
    return fill_slices(restored, close_field_edge=close_field_edge, padded=padded), table


def _side_of(
    centroid: NDArray[np.float64], reference: NDArray[np.float64], direction: NDArray[np.float64]
) -> int:
    """LUNG_LEFT when ``centroid`` lies to the patient's left (+L in LPS) of ``reference``."""
    # direction columns are the LPS vectors of x, y, z; indices here are (z, y, x)
    offset = (centroid - reference) @ np.array([direction[0, 2], direction[0, 1], direction[0, 0]])
    return LUNG_LEFT if offset > 0 else LUNG_RIGHT


def _lungs(
    work: NDArray[np.float32],
    body: NDArray[np.bool_],
    spacing: Spacing,
    direction: NDArray[np.float64],
) -> NDArray[np.uint8]:
    """Left/right lung labels on the working grid (0 elsewhere)."""
    out = np.zeros(work.shape, dtype=np.uint8)
    air = (work < LUNG_HU) & body
    labels, sizes = _components(air)
    if sizes.max(initial=0) == 0:
        return out
    voxel_ml = float(np.prod(spacing)) / 1000.0
    pixel_mm2 = spacing[1] * spacing[2]
    extent_mm = work.shape[0] * spacing[0]
    # largest cross-section of each component: counts per (component, slice)
    depth = work.shape[0]
    z_index = np.broadcast_to(np.arange(depth)[:, None, None], labels.shape)
    per_slice = np.bincount((labels * depth + z_index)[air], minlength=sizes.size * depth)
    per_slice = per_slice.reshape(sizes.size, depth)
    largest_slice = per_slice.max(axis=1) * pixel_mm2
    body_per_slice = np.maximum(np.count_nonzero(body, axis=(1, 2)), 1)
    largest_share = (per_slice / body_per_slice[None, :]).max(axis=1)
    keep = (largest_slice >= LUNG_MIN_AREA_MM2) & (largest_share >= LUNG_MIN_SECTION_SHARE)
    if extent_mm > 30.0:
        keep &= sizes * voxel_ml >= LUNG_MIN_VOLUME_ML
    keep[0] = False
    lung = keep[labels]
    if not lung.any():
        return out
    body_centre = np.array(ndimage.center_of_mass(body), dtype=np.float64)
    seeds = _split_seeds(lung, spacing)
    if seeds is None:  # one lung in view, or two that cannot be told apart: by side of the body
        parts, count = ndimage.label(lung)
        for index in range(1, count + 1):
            part = parts == index
            centre = np.array(ndimage.center_of_mass(part), dtype=np.float64)
            out[part] = _side_of(centre, body_centre, direction)
        return out
    first, second = seeds
    c1 = np.array(ndimage.center_of_mass(first), dtype=np.float64)
    c2 = np.array(ndimage.center_of_mass(second), dtype=np.float64)
    side1 = _side_of(c1, c2, direction)
    side2 = LUNG_RIGHT if side1 == LUNG_LEFT else LUNG_LEFT
    seed_labels = np.zeros(work.shape, dtype=np.uint8)
    seed_labels[first] = side1
    seed_labels[second] = side2
    # each lung voxel goes to the nearest seed (the seeds are the two lungs' cores)
    indices = ndimage.distance_transform_edt(
        seed_labels == 0, sampling=spacing, return_distances=False, return_indices=True
    )
    nearest = seed_labels[tuple(indices)]
    out[lung] = nearest[lung]
    return out


def _split_seeds(
    lung: NDArray[np.bool_], spacing: Spacing
) -> tuple[NDArray[np.bool_], NDArray[np.bool_]] | None:
    """The two lungs' cores: the shallowest depth at which the lung mask falls apart into two
    comparable parts (the airways and a thin anterior junction join them above it)."""
    depth = ndimage.distance_transform_edt(lung, sampling=spacing)
    step = min(spacing[1:])
    for d in np.arange(0.0, MAX_SPLIT_DEPTH_MM, step):
        core = depth > d
        labels, sizes = _components(core)
        if np.count_nonzero(sizes) < 2:
            if not core.any():
                return None
            continue
        order = np.argsort(sizes)[::-1]
        a, b = int(order[0]), int(order[1])
        if sizes[b] >= 0.1 * (sizes[a] + sizes[b]):
            return labels == a, labels == b
    return None


def _fill_holes_bright(bone: NDArray[np.bool_], hu: NDArray[Any]) -> NDArray[np.bool_]:
    """Per slice, fill holes inside bone whose mean is above MARROW_HU (marrow), not the canal."""
    out = bone.copy()
    for z in range(bone.shape[0]):
        if not bone[z].any():
            continue
        holes = ndimage.binary_fill_holes(bone[z]) & ~bone[z]
        if not holes.any():
            continue
        labels, count = ndimage.label(holes)
        means = ndimage.mean(hu[z], labels, index=np.arange(1, count + 1))
        marrow = np.concatenate([[False], np.asarray(means) > MARROW_HU])
        out[z] |= marrow[labels]
    return out


def _full_resolution_body(
    hu: NDArray[Any],
    body_work: NDArray[np.bool_],
    table_work: NDArray[np.bool_],
    f: tuple[int, int, int],
    work_spacing: Spacing,
    close_field_edge: bool = False,
    padded: NDArray[np.bool_] | None = None,
) -> NDArray[np.bool_]:
    """The body at full resolution: the threshold decides the boundary, the working grid decides
    membership (and keeps the table out)."""
    margin = max(work_spacing) * 1.5
    allowed = _dilate_mm(body_work, work_spacing, margin) & ~(table_work & ~body_work)
    near_body = _upsample(allowed, f, hu.shape)
    return fill_slices(
        (hu > AIR_BODY_HU) & near_body, close_field_edge=close_field_edge, padded=padded
    )


def patient_mask(
    hu: NDArray[Any], spacing: Spacing, work_mm: float = WORK_SPACING_MM
) -> NDArray[np.bool_]:
    """The patient on a CT in HU (z, y, x): tissue above -500 HU, holes filled per slice, the
    table and head rest left out. The body label of :func:`segment_ct`, and what confines the
    learned models' labels (:mod:`pacs_node.inference.anatomy`); a patient cut by the field's
    edge keeps what lies inside along that edge (see :func:`fill_slices`). ``work_mm`` is the
    grid the decisions (components, table) are made on; the boundary is always the full-resolution
    one."""
    if hu.ndim != 3:
        raise ValueError(f"expected a (z, y, x) array, got shape {hu.shape}")
    f = _factors(spacing, work_mm)
    work_spacing = (spacing[0] * f[0], spacing[1] * f[1], spacing[2] * f[2])
    padded = padded_slices(hu)
    padded_work = np.logical_and.reduce(
        np.pad(padded, (0, (-padded.size) % f[0]), mode="edge").reshape(-1, f[0]), axis=1
    )
    body_work, table_work = _body(
        _block_mean(hu, f), work_spacing, close_field_edge=True, padded=padded_work
    )
    if not body_work.any():
        return np.zeros(hu.shape, dtype=bool)
    return _full_resolution_body(
        hu, body_work, table_work, f, work_spacing, close_field_edge=True, padded=padded
    )


def padded_slices(hu: NDArray[Any]) -> NDArray[np.bool_]:
    """Per slice: one value everywhere outside the reconstruction circle inscribed in the
    matrix, as scanners pad there (real air outside a patient is noisy)."""
    circle = _reconstruction_circle(hu.shape[1:])
    if circle is None or not circle[0].any():
        return np.zeros(hu.shape[0], dtype=bool)
    outside = np.asarray(hu)[:, circle[0]]
    return np.asarray(outside.max(axis=1) == outside.min(axis=1), dtype=bool)


def segment_ct(
    hu: NDArray[Any], spacing: Spacing, direction: NDArray[np.float64]
) -> NDArray[np.uint8]:
    """Exclusive labels (see :data:`LABELS`) for a CT in HU on its own grid (z, y, x), with
    ``spacing`` (dz, dy, dx) mm and ``direction`` as :class:`~pacs_node.imaging.volume.Volume`."""
    if hu.ndim != 3:
        raise ValueError(f"expected a (z, y, x) array, got shape {hu.shape}")
    f = _factors(spacing)
    work = _block_mean(hu, f)
    work_spacing = (spacing[0] * f[0], spacing[1] * f[1], spacing[2] * f[2])
    body_work, table_work = _body(work, work_spacing)
    labels = np.zeros(hu.shape, dtype=np.uint8)
    if not body_work.any():
        return labels
    body = _full_resolution_body(hu, body_work, table_work, f, work_spacing)
    labels[body] = BODY
    margin = max(work_spacing) * 1.5

    lungs_work = _lungs(work, body_work, work_spacing, direction)
    if lungs_work.any():
        grown = np.zeros_like(lungs_work)
        for side in (LUNG_LEFT, LUNG_RIGHT):
            near = _dilate_mm(lungs_work == side, work_spacing, margin)
            grown[near & (grown == 0)] = side
        side_map = _upsample(grown, f, hu.shape)
        air = (hu < LUNG_HU) & body
        for side in (LUNG_LEFT, LUNG_RIGHT):
            lung = fill_slices(air & (side_map == side))
            labels[lung & (labels == BODY)] = side

    bone = _fill_holes_bright((hu > BONE_HU) & body, hu)
    parts, sizes = _components(bone)
    voxel_ml = float(np.prod(spacing)) / 1000.0
    keep = sizes * voxel_ml >= BONE_MIN_VOLUME_ML
    keep[0] = False
    labels[keep[parts]] = BONE
    return labels


ClassicalAlgorithm = Callable[[NDArray[Any], Spacing, NDArray[np.float64]], NDArray[np.uint8]]

# Name in a bundle's ``pacs_node.algorithm`` -> (function, label value -> vocabulary name)
ALGORITHMS: Mapping[str, tuple[ClassicalAlgorithm, Mapping[int, str]]] = {
    "ct-body-lungs-bone": (segment_ct, LABELS),
}
