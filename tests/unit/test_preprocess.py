"""Resampling to a model's grid and back, and the intensity recipes a bundle declares."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from pacs_node.imaging import Grid, Volume
from pacs_node.imaging.postprocess import labels_to_source
from pacs_node.imaging.preprocess import (
    denoise,
    orientation_matrix,
    percentile_scale,
    resample,
    resample_volume,
    scale_intensity_range,
    target_grid,
    window,
    zscore,
)


def _rotation(a: float, b: float, c: float) -> np.ndarray:
    """A rotation from three angles (radians), so hypothesis can draw any orientation."""
    ca, sa, cb, sb, cc, sc = np.cos(a), np.sin(a), np.cos(b), np.sin(b), np.cos(c), np.sin(c)
    rz = np.array([[ca, -sa, 0], [sa, ca, 0], [0, 0, 1]])
    ry = np.array([[cb, 0, sb], [0, 1, 0], [-sb, 0, cb]])
    rx = np.array([[1, 0, 0], [0, cc, -sc], [0, sc, cc]])
    return rz @ ry @ rx


def _volume(voxels: np.ndarray, spacing: tuple[float, float, float], direction: np.ndarray,
            origin: tuple[float, float, float] = (0.0, 0.0, 0.0)) -> Volume:  # fmt: skip
    return Volume(
        voxels=voxels,
        spacing=spacing,
        origin=origin,
        direction=direction,
        sop_instance_uids=tuple(f"1.2.{i}" for i in range(voxels.shape[0])),
        frame_numbers=(None,) * voxels.shape[0],
        headers=(),
        modality="CT",
    )


def test_orientation_codes() -> None:
    np.testing.assert_array_equal(orientation_matrix("LPS"), np.eye(3))
    np.testing.assert_array_equal(orientation_matrix("ras"), np.diag([-1.0, -1.0, 1.0]))
    np.testing.assert_array_equal(orientation_matrix("SAR")[:, 0], [0.0, 0.0, 1.0])
    for bad in ("LLS", "XYZ", "LP"):
        with pytest.raises(ValueError, match="orientation code"):
            orientation_matrix(bad)


def test_ras_target_flips_an_lps_axial_volume_exactly() -> None:
    voxels = np.arange(3 * 4 * 5, dtype=np.int16).reshape(3, 4, 5)
    volume = _volume(voxels, (2.0, 1.0, 1.5), np.eye(3), origin=(10.0, -5.0, 30.0))
    out, grid = resample_volume(volume, volume.spacing, "RAS", order=0)
    assert grid.shape == (3, 4, 5)
    np.testing.assert_array_equal(out, voxels[:, ::-1, ::-1].astype(np.float32))
    # The first RAS voxel is the LPS volume's last column and row.
    np.testing.assert_allclose(
        grid.index_to_patient([0, 0, 0]), volume.index_to_patient([0, 3, 4]), atol=1e-9
    )
    np.testing.assert_allclose(grid.spacing, volume.spacing)


def test_target_grid_covers_the_field_of_view() -> None:
    source = Grid.from_geometry((10, 20, 30), (2.0, 1.0, 1.0), (0.0, 0.0, 0.0), np.eye(3))
    grid = target_grid(source, (1.0, 1.0, 1.0), None)
    assert grid.shape == (20, 20, 30)
    # Centred: the centre of the field of view is the same point on both grids.
    np.testing.assert_allclose(
        grid.index_to_patient([9.5, 9.5, 14.5]), source.index_to_patient([4.5, 9.5, 14.5])
    )
    with pytest.raises(ValueError, match="positive"):
        target_grid(source, (1.0, 0.0, 1.0), None)
    with pytest.raises(ValueError, match="orthonormal"):
        target_grid(source, None, np.ones((3, 3)))


def test_trilinear_resampling_reproduces_a_linear_field() -> None:
    """Linear interpolation is exact on a linear function of patient position: a geometry check
    that any axis mix-up or off-by-half-voxel would fail."""
    direction = _rotation(0.3, -0.2, 0.5)
    source = Grid.from_geometry((8, 9, 10), (2.0, 1.5, 1.0), (5.0, -3.0, 12.0), direction)
    zyx = np.stack(np.indices(source.shape), axis=-1).reshape(-1, 3)
    weights, bias = np.array([0.7, -1.3, 2.1]), 4.0
    field = (source.index_to_patient(zyx) @ weights + bias).reshape(source.shape)
    target = target_grid(source, (1.1, 0.9, 1.3), "RAS")
    out = resample(field, source, target, order=1, fill=np.nan)
    points = target.index_to_patient(np.stack(np.indices(target.shape), axis=-1).reshape(-1, 3))
    inside = np.all(
        (source.patient_to_index(points) >= 0)
        & (source.patient_to_index(points) <= np.array(source.shape) - 1),
        axis=1,
    )
    assert inside.sum() > 100
    np.testing.assert_allclose(out.ravel()[inside], points[inside] @ weights + bias, atol=1e-6)


_CODES = ["LPS", "RAS", "LAS", "RPI", "SAR", "PLI", "IAR"]


@settings(max_examples=150, deadline=None)
@given(
    shape=st.tuples(st.integers(1, 5), st.integers(2, 6), st.integers(2, 6)),
    spacing=st.tuples(*[st.floats(1.0, 2.5)] * 3),
    angles=st.tuples(*[st.floats(-np.pi, np.pi)] * 3),
    oblique_source=st.booleans(),
    target=st.one_of(
        st.none(),
        st.sampled_from(_CODES),
        st.tuples(*[st.floats(-np.pi, np.pi)] * 3),
    ),
    factors=st.tuples(*[st.floats(0.3, 0.95)] * 3),
    origin=st.tuples(*[st.floats(-200.0, 200.0)] * 3),
    seed=st.integers(0, 2**16),
)
def test_label_round_trip_lands_on_the_exact_source_voxels(
    shape: tuple[int, int, int],
    spacing: tuple[float, float, float],
    angles: tuple[float, float, float],
    oblique_source: bool,
    target: str | tuple[float, float, float] | None,
    factors: tuple[float, float, float],
    origin: tuple[float, float, float],
    seed: int,
) -> None:
    """Any source orientation, any target orientation, any target spacing fine enough that
    each source voxel owns a model voxel: forward (nearest) then inverse gives back every label.
    Fine enough means smaller than the source's smallest spacing / sqrt(3) (worst rotation)."""
    direction = _rotation(*angles) if oblique_source else np.eye(3)
    labels = np.random.default_rng(seed).integers(0, 5, size=shape).astype(np.uint8)
    source = Grid.from_geometry(shape, spacing, origin, direction)
    orientation = _rotation(*target) if isinstance(target, tuple) else target
    step = min(spacing) / np.sqrt(3.0)
    model_spacing = (factors[0] * step, factors[1] * step, factors[2] * step)
    model = target_grid(source, model_spacing, orientation)
    on_model = resample(labels, source, model, order=0)
    back = labels_to_source(on_model, model, source)
    np.testing.assert_array_equal(back, labels)


def test_window_and_range_scaling() -> None:
    hu = np.array([-1000.0, -160.0, 40.0, 240.0, 3000.0])
    np.testing.assert_allclose(window(hu, 40, 400), [0.0, 0.0, 0.5, 1.0, 1.0])
    scaled = scale_intensity_range(hu, -1000, 1000, -1.0, 1.0, clip=False)
    np.testing.assert_allclose(scaled, [-1.0, -0.16, 0.04, 0.24, 3.0], atol=1e-6)
    assert scaled.dtype == np.float32
    with pytest.raises(ValueError, match="positive"):
        window(hu, 40, 0)


def test_zscore_uses_the_mask_or_nonzero_voxels() -> None:
    values = np.array([0.0, 0.0, 2.0, 4.0, 6.0])
    plain = zscore(values)
    assert float(plain.mean()) == pytest.approx(0.0, abs=1e-6)
    assert float(plain.std()) == pytest.approx(1.0, rel=1e-5)
    nonzero = zscore(values, nonzero=True)
    np.testing.assert_allclose(nonzero[2:], np.array([-1.0, 0.0, 1.0]) * np.sqrt(1.5), rtol=1e-5)
    masked = zscore(values, mask=np.array([True, True, False, False, False]))
    np.testing.assert_allclose(masked, values)  # mask all zeros: mean 0, std 0


def test_denoise_smooths_in_millimetres() -> None:
    spike = np.zeros((9, 9, 9), dtype=np.float32)
    spike[4, 4, 4] = 1.0
    out = denoise(spike, (4.0, 1.0, 1.0), sigma_mm=2.0)
    assert out.sum() == pytest.approx(1.0, rel=1e-4)
    # Thick slices: the kernel spans fewer voxels along z than along x.
    assert out[5, 4, 4] < out[4, 4, 5]
    np.testing.assert_array_equal(denoise(spike, (1.0, 1.0, 1.0), 0.0), spike)


def test_percentile_scale_ignores_absolute_values_and_outliers() -> None:
    rng = np.random.default_rng(3)
    image = rng.normal(1000.0, 200.0, (64, 64)).astype(np.float32)
    base = percentile_scale(image)
    assert float(base.min()) == 0.0
    assert float(base.max()) == 1.0
    # another bit depth or exposure (any positive gain and offset): the same network input
    np.testing.assert_allclose(percentile_scale(image * 16.0 + 300.0), base, atol=1e-5)
    # a burned-in marker (0.5 % of pixels at the maximum) hardly moves the scale, where it
    # squeezes a z-score's range
    marked = image.copy()
    marked[:4, :5] = 65535.0
    np.testing.assert_allclose(percentile_scale(marked)[8:], base[8:], atol=0.05)
    assert np.ptp(zscore(marked)[8:]) < 0.5 * np.ptp(zscore(image)[8:])
    assert np.array_equal(percentile_scale(np.full((4, 4), 7.0)), np.zeros((4, 4)))
