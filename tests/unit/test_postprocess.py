"""Model output back on the source grid, and per-segment clean-up."""

from __future__ import annotations

import numpy as np
import pytest
from scipy import ndimage

from pacs_node.imaging import Grid
from pacs_node.imaging.postprocess import (
    SegmentCleanup,
    clean_segments,
    fill_holes,
    keep_largest_component,
    label_sizes,
    labels_to_source,
    probabilities_to_source,
    remove_small_islands,
    smooth,
)
from pacs_node.imaging.preprocess import target_grid


def _linear_probabilities(model: Grid, weights: np.ndarray, bias: np.ndarray) -> np.ndarray:
    """Channel c = weights[c] . position + bias[c]: trilinear interpolation is exact on it."""
    points = model.index_to_patient(np.stack(np.indices(model.shape), axis=-1).reshape(-1, 3))
    return (points @ weights.T + bias).T.reshape(len(bias), *model.shape).astype(np.float32)


def _expected_argmax(source: Grid, weights: np.ndarray, bias: np.ndarray) -> np.ndarray:
    points = source.index_to_patient(np.stack(np.indices(source.shape), axis=-1).reshape(-1, 3))
    return np.argmax(points @ weights.T + bias, axis=1).reshape(source.shape)


_TILTED = np.array(
    [[0.9, -0.3, 0.31622777], [0.4, 0.8, -0.4472136], [0.17320508, 0.52, 0.83666003]]
)


@pytest.mark.parametrize(
    "orientation",
    ["RAS", "SAR", np.linalg.qr(_TILTED)[0] * np.sign(np.linalg.det(np.linalg.qr(_TILTED)[0]))],
    ids=["flipped", "permuted", "oblique"],
)
def test_probabilities_argmax_on_the_source_grid_slab_by_slab(
    orientation: str | np.ndarray,
) -> None:
    """Parallel axes take the separable path, an oblique model grid the general one; both must
    give the exact argmax of a field that trilinear interpolation reproduces exactly."""
    source = Grid.from_geometry((20, 16, 18), (2.5, 0.8, 0.9), (-10.0, 4.0, 50.0), np.eye(3))
    model = target_grid(source, (1.5, 0.7, 0.75), orientation)
    rng = np.random.default_rng(3)
    weights = rng.normal(size=(12, 3))
    centre = source.index_to_patient(np.array(source.shape) / 2.0)
    bias = -(weights @ centre) + rng.normal(size=12) * 3.0  # boundaries cross the scan
    probabilities = _linear_probabilities(model, weights, bias)
    expected = _expected_argmax(source, weights, bias)
    assert len(np.unique(expected)) > 2  # several labels meet inside the field of view

    whole = probabilities_to_source(probabilities, model, source)
    assert whole.dtype == np.uint8
    # Source voxels beyond the last model voxel centre see held edge values, not the field.
    corners = source.index_to_patient(np.stack(np.indices(source.shape), axis=-1).reshape(-1, 3))
    idx = model.patient_to_index(corners)
    interior = np.all((idx >= 0) & (idx <= np.array(model.shape) - 1), axis=1)
    interior = interior.reshape(source.shape)
    assert interior.mean() > 0.7
    np.testing.assert_array_equal(whole[interior], expected[interior])

    fetched: list[tuple[int, int]] = []

    def stream(z0: int, z1: int) -> np.ndarray:
        fetched.append((z0, z1))
        return probabilities[:, z0:z1]

    streamed = probabilities_to_source(stream, model, source, channels=12, slab_voxels=16 * 18 * 2)
    np.testing.assert_array_equal(streamed, whole)
    # Ten source slabs, each fetching only the model slices it overlaps (when the model's z
    # runs along the source's z; otherwise every slab crosses the whole model grid).
    assert len(fetched) == 10
    if isinstance(orientation, str) and orientation == "RAS":
        assert max(z1 - z0 for z0, z1 in fetched) <= 7 < model.shape[0]


def test_source_voxels_outside_the_model_grid_are_background() -> None:
    source = Grid.from_geometry((6, 4, 4), (1.0, 1.0, 1.0), (0.0, 0.0, 0.0), np.eye(3))
    model = Grid.from_geometry((3, 4, 4), (1.0, 1.0, 1.0), (0.0, 0.0, 0.0), np.eye(3))
    probabilities = np.zeros((2, 3, 4, 4), dtype=np.float32)
    probabilities[1] = 1.0  # the model says "foreground" everywhere it looked
    labels = probabilities_to_source(probabilities, model, source)
    assert labels[:3].min() == 1
    assert labels[3:].max() == 0
    back = labels_to_source(np.ones((3, 4, 4), dtype=np.uint8), model, source)
    np.testing.assert_array_equal(back, labels)


def test_probability_shapes_are_checked() -> None:
    grid = Grid.from_geometry((2, 2, 2), (1.0, 1.0, 1.0), (0.0, 0.0, 0.0), np.eye(3))
    with pytest.raises(ValueError, match="channels first"):
        probabilities_to_source(np.zeros((2, 2, 2)), grid, grid)
    with pytest.raises(ValueError, match="channels is required"):
        probabilities_to_source(lambda z0, z1: np.zeros((2, z1 - z0, 2, 2)), grid, grid)


def _box(labels: np.ndarray, value: int, z: slice, y: slice, x: slice) -> None:
    labels[z, y, x] = value


def test_largest_component_per_label() -> None:
    labels = np.zeros((10, 10, 10), dtype=np.uint8)
    _box(labels, 1, slice(0, 4), slice(0, 4), slice(0, 4))  # 64 voxels
    _box(labels, 1, slice(7, 9), slice(7, 9), slice(7, 9))  # 8 voxels, separate
    _box(labels, 2, slice(7, 8), slice(0, 2), slice(0, 2))  # label 2 alone, small
    out = keep_largest_component(labels)
    assert int((out == 1).sum()) == 64
    assert int((out == 2).sum()) == 4
    np.testing.assert_array_equal(keep_largest_component(labels, [2]), labels)


def test_fill_holes_fills_background_only() -> None:
    labels = np.zeros((7, 7, 7), dtype=np.uint8)
    _box(labels, 1, slice(1, 6), slice(1, 6), slice(1, 6))
    labels[2:5, 2:5, 2:5] = 0  # cavity
    labels[3, 3, 3] = 2  # another segment inside it
    out = fill_holes(labels)
    assert int((out[2:5, 2:5, 2:5] == 1).sum()) == 26
    assert out[3, 3, 3] == 2
    assert out[0].max() == 0  # outside background untouched


def test_small_islands_by_voxels_and_millilitres() -> None:
    labels = np.zeros((12, 12, 12), dtype=np.uint8)
    _box(labels, 1, slice(0, 3), slice(0, 3), slice(0, 3))  # 27 voxels
    _box(labels, 1, slice(6, 8), slice(6, 8), slice(6, 9))  # 12 voxels
    _box(labels, 1, slice(10, 11), slice(10, 11), slice(10, 11))  # 1 voxel
    by_count = remove_small_islands(labels, min_voxels=12)
    assert int((by_count == 1).sum()) == 27 + 12
    # 2 mm voxels hold 0.008 mL: 0.1 mL needs 12.5 voxels, so only the 27-voxel cube stays.
    by_volume = remove_small_islands(labels, min_volume_ml=0.1, spacing=(2.0, 2.0, 2.0))
    assert int((by_volume == 1).sum()) == 27
    with pytest.raises(ValueError, match="spacing"):
        remove_small_islands(labels, min_volume_ml=0.1)


def test_smoothing_removes_spurs_and_closes_notches_without_touching_others() -> None:
    labels = np.zeros((15, 15, 15), dtype=np.uint8)
    _box(labels, 1, slice(3, 12), slice(3, 12), slice(3, 12))
    labels[7, 7, 12:15] = 1  # one-voxel spur
    labels[7, 3:6, 7] = 0  # a slit three voxels deep into a face
    labels[0, 0, 0] = 2
    out = smooth(labels, (1.0, 1.0, 1.0), radius_mm=1.0, values=[1])
    assert out[7, 7, 13] == 0
    assert out[7, 5, 7] == 1  # the slit's depth, where a 1 mm ball cannot reach, is closed
    assert (out[4:11, 5:11, 4:11] == 1).all()  # only edges and corners are rounded
    assert out[0, 0, 0] == 2
    assert out[7, 7, 7] == 1


def test_clean_segments_applies_each_segments_recipe() -> None:
    labels = np.zeros((10, 10, 10), dtype=np.uint8)
    _box(labels, 1, slice(0, 4), slice(0, 4), slice(0, 4))
    _box(labels, 1, slice(8, 9), slice(8, 9), slice(8, 9))
    _box(labels, 2, slice(0, 3), slice(6, 9), slice(6, 9))
    labels[1, 7, 7] = 0  # a hole in segment 2 that its recipe leaves open
    _box(labels, 2, slice(6, 7), slice(0, 1), slice(0, 1))
    recipe = {1: SegmentCleanup(largest_component=True), 2: SegmentCleanup(min_voxels=2)}
    out = clean_segments(labels, (1.0, 1.0, 1.0), recipe)
    assert out[8, 8, 8] == 0
    assert out[6, 0, 0] == 0
    assert out[1, 7, 7] == 0
    assert int((out == 2).sum()) == 26
    assert labels[8, 8, 8] == 1  # input untouched


def test_label_sizes_are_counted_slab_by_slab_as_in_one_go() -> None:
    rng = np.random.default_rng(4)
    components, count = ndimage.label(rng.random((40, 330, 330)) > 0.6)  # several slabs
    where = rng.random(components.shape) > 0.3
    assert label_sizes(components, count).tolist() == np.bincount(components.ravel()).tolist()
    expected = np.bincount(components[where], minlength=count + 1)
    assert label_sizes(components, count, where).tolist() == expected.tolist()
