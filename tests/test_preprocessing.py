"""Tests for mpcl.preprocessing: corner-aligned resize, intensity normalisation, through-plane axis."""

from __future__ import annotations

import numpy as np
import pytest
from scipy import ndimage

from mpcl.errors import InputError
from mpcl.postprocessing import softmax
from mpcl.preprocessing import normalize_intensity, resize_2d, resized_argmax, through_plane_axis

# (leading axes, input HxW, output HxW): square, non-square, up- and down-sampling, 1-pixel axes.
RESIZE_CASES = [
    ((), (8, 8), (16, 16)),
    ((), (13, 7), (5, 11)),
    ((), (30, 32), (8, 24)),
    ((), (11, 15), (41, 52)),
    ((), (1, 26), (18, 12)),
    ((), (9, 4), (1, 6)),
    ((3,), (12, 20), (7, 9)),
    ((2, 3), (10, 6), (17, 13)),
]


def _zoom_reference(data: np.ndarray, out_hw: tuple[int, int], order: int) -> np.ndarray:
    """scipy.ndimage.zoom, corner-aligned (grid_mode=False), on the last two axes only.

    mode="nearest" rather than the default "constant": with "constant", scipy returns cval for the last
    row/column whenever k * (n_in - 1) / (n_out - 1) rounds a hair past n_in - 1 (e.g. 30 -> 8 rows gives
    29.000000000000004), which is a floating-point artefact, not the corner-aligned resize. Every sample
    of a corner-aligned resize lies inside [0, n_in - 1], so "nearest" changes nothing else.
    """
    factors = (1.0,) * (data.ndim - 2) + (out_hw[0] / data.shape[-2], out_hw[1] / data.shape[-1])
    result = ndimage.zoom(data, factors, order=order, grid_mode=False, mode="nearest")
    assert result.shape == data.shape[:-2] + tuple(out_hw)
    return result


@pytest.mark.parametrize(("leading", "in_hw", "out_hw"), RESIZE_CASES)
def test_resize_linear_matches_scipy_zoom(leading, in_hw, out_hw):
    rng = np.random.default_rng(sum(in_hw) * 31 + sum(out_hw))
    data = rng.random(leading + in_hw).astype(np.float32)
    result = resize_2d(data, out_hw, order=1)
    assert result.shape == leading + out_hw
    assert result.dtype == np.float32
    np.testing.assert_allclose(result, _zoom_reference(data, out_hw, order=1), atol=1e-5, rtol=0)


@pytest.mark.parametrize(("leading", "in_hw", "out_hw"), RESIZE_CASES)
def test_resize_nearest_matches_scipy_zoom(leading, in_hw, out_hw):
    rng = np.random.default_rng(sum(in_hw) * 17 + sum(out_hw))
    labels = rng.integers(0, 4, size=leading + in_hw).astype(np.uint8)
    result = resize_2d(labels, out_hw, order=0)
    assert result.shape == leading + out_hw
    assert result.dtype == np.uint8  # nearest keeps the label dtype
    np.testing.assert_array_equal(result, _zoom_reference(labels, out_hw, order=0))


def test_resize_matches_default_mode_zoom_when_no_edge_rounding():
    """Where scipy's default mode has no rounding artefact, it agrees too (corner-aligned convention)."""
    data = np.random.default_rng(0).random((2, 9, 17)).astype(np.float32)
    expected = ndimage.zoom(data, (1, 33 / 9, 5 / 17), order=1, grid_mode=False)
    assert expected.shape == (2, 33, 5)
    np.testing.assert_allclose(resize_2d(data, (33, 5), order=1), expected, atol=1e-5, rtol=0)


def test_resize_is_corner_aligned():
    data = np.random.default_rng(1).random((7, 10)).astype(np.float32)
    for out_hw in [(3, 4), (20, 31)]:
        result = resize_2d(data, out_hw, order=1)
        for row, col in [(0, 0), (0, -1), (-1, 0), (-1, -1)]:
            assert result[row, col] == pytest.approx(float(data[row, col]), abs=1e-6)


def test_resize_linear_of_a_ramp_is_exact():
    ramp = np.arange(5, dtype=np.float32)[:, None] * np.ones((1, 3), dtype=np.float32)
    result = resize_2d(ramp, (9, 3), order=1)
    np.testing.assert_allclose(result[:, 0], np.arange(9) / 2, atol=1e-6)


@pytest.mark.parametrize("order", [0, 1])
def test_resize_identity_size_returns_a_copy(order):
    data = np.random.default_rng(2).random((2, 6, 5)).astype(np.float32)
    result = resize_2d(data, (6, 5), order=order)
    np.testing.assert_array_equal(result, data)
    assert result is not data
    assert not np.shares_memory(result, data)
    result[0, 0, 0] = -1.0
    assert data[0, 0, 0] != -1.0


def test_resize_rejects_bad_input():
    with pytest.raises(InputError, match="at least 2 dimensions"):
        resize_2d(np.zeros(5, dtype=np.float32), (3, 3))
    with pytest.raises(InputError, match="order"):
        resize_2d(np.zeros((4, 4), dtype=np.float32), (3, 3), order=3)


def _smooth_probabilities(
    rng: np.random.Generator, shape: tuple[int, int, int, int], noise: float
) -> np.ndarray:
    """Softmax of a coarse random field upsampled to ``shape`` plus pixel noise: regions and boundaries."""
    batch, classes, h, w = shape
    coarse = rng.normal(size=(batch, classes, max(h // 6, 1), max(w // 6, 1))).astype(np.float32) * 4
    logits = resize_2d(coarse, (h, w)) + rng.normal(size=shape).astype(np.float32) * noise
    shifted = np.exp(logits - logits.max(axis=1, keepdims=True))
    return (shifted / shifted.sum(axis=1, keepdims=True)).astype(np.float32)


@pytest.mark.parametrize(("leading", "in_hw", "out_hw"), RESIZE_CASES)
@pytest.mark.parametrize("noise", [0.0, 0.5])
def test_resized_argmax_equals_argmax_of_the_full_resize(leading, in_hw, out_hw, noise):
    rng = np.random.default_rng(sum(in_hw) + 7 * sum(out_hw))
    probabilities = _smooth_probabilities(rng, (3, 4, *in_hw), noise)
    expected = resize_2d(probabilities, out_hw, order=1).argmax(axis=1)
    result = resized_argmax(probabilities, out_hw)
    assert result.dtype == np.uint8 and result.shape == (3, *out_hw)
    np.testing.assert_array_equal(result, expected)


@pytest.mark.parametrize(("leading", "in_hw", "out_hw"), RESIZE_CASES)
def test_resized_argmax_of_logits_equals_argmax_of_the_resized_softmax(leading, in_hw, out_hw):
    rng = np.random.default_rng(3 * sum(in_hw) + sum(out_hw))
    logits = np.log(_smooth_probabilities(rng, (3, 4, *in_hw), 0.5)) * 1.7 + 0.3  # softmax undoes both
    expected = resize_2d(softmax(logits), out_hw, order=1).argmax(axis=1)
    np.testing.assert_array_equal(resized_argmax(logits, out_hw, to_probabilities=softmax), expected)


def test_resized_argmax_interpolates_probabilities_not_logits():
    # left pixel: class 1 almost surely (p1 = 0.99995), right: class 0 (p1 = 0.269); the probabilities
    # cross 0.5 at t = 0.68, the logit difference (10 to -1) only at t = 0.91
    logits = np.array([[[[0.0, 1.0]], [[10.0, 0.0]]]], dtype=np.float32)  # (1, 2, 1, 2)
    labels = resized_argmax(logits, (1, 11), to_probabilities=softmax)[0, 0]
    np.testing.assert_array_equal(labels, [1] * 7 + [0] * 4)


def test_resized_argmax_interpolates_boundaries_rather_than_copying_neighbours():
    # one row, two classes: class 1 wins the left source pixel narrowly, class 0 the right one clearly;
    # between them class 0 takes over at 1/9 of the way (0.1 = 0.9 t), long before nearest-neighbour's
    # midpoint: of the samples at t = 0, 0.1, ..., 1 only the first two stay class 1
    probabilities = np.array([[[[0.45, 0.9]], [[0.55, 0.1]]]], dtype=np.float32)  # (1, 2, 1, 2)
    labels = resized_argmax(probabilities, (1, 11))[0, 0]
    np.testing.assert_array_equal(labels, [1, 1, 0, 0, 0, 0, 0, 0, 0, 0, 0])


def test_resized_argmax_resolves_exact_ties_to_the_lowest_class_like_argmax():
    uniform = np.full((2, 4, 5, 6), 0.25, dtype=np.float32)
    np.testing.assert_array_equal(resized_argmax(uniform, (9, 4)), np.zeros((2, 9, 4), np.uint8))


def test_resized_argmax_rejects_other_ranks_and_more_classes_than_uint8_holds():
    with pytest.raises(InputError, match="batch, classes"):
        resized_argmax(np.zeros((4, 5, 5), dtype=np.float32), (3, 3))
    with pytest.raises(InputError, match="256 classes"):
        resized_argmax(np.zeros((1, 257, 2, 2), dtype=np.float32), (3, 3))


def test_resized_argmax_with_more_than_128_classes():
    probabilities = _smooth_probabilities(np.random.default_rng(5), (2, 200, 12, 10), 0.5)
    expected = resize_2d(probabilities, (17, 23), order=1).argmax(axis=1)
    assert expected.max() >= 128  # the class values use the whole byte
    np.testing.assert_array_equal(resized_argmax(probabilities, (17, 23)), expected)


def test_normalize_minmax_maps_to_unit_range():
    volume = np.random.default_rng(3).normal(50.0, 20.0, size=(4, 8, 8))
    result = normalize_intensity(volume, "minmax")
    assert result.dtype == np.float32
    assert result.shape == volume.shape
    assert float(result.min()) == pytest.approx(0.0, abs=1e-7)
    assert float(result.max()) == pytest.approx(1.0, abs=1e-6)
    # monotone: the order of voxels is kept
    order = np.argsort(volume.astype(np.float32), axis=None)
    np.testing.assert_array_equal(np.argsort(result, axis=None), order)


def test_normalize_is_over_the_whole_volume_not_per_slice():
    volume = np.stack([np.full((3, 3), 10.0), np.full((3, 3), 20.0), np.full((3, 3), 30.0)])
    result = normalize_intensity(volume, "minmax")
    np.testing.assert_allclose(result[:, 0, 0], [0.0, 0.5, 1.0], atol=1e-7)


def test_normalize_zscore_mean_and_std():
    volume = np.random.default_rng(4).gamma(2.0, 30.0, size=(3, 16, 16))
    result = normalize_intensity(volume, "zscore")
    assert result.dtype == np.float32
    assert float(result.mean()) == pytest.approx(0.0, abs=1e-5)
    assert float(result.std()) == pytest.approx(1.0, abs=1e-4)


def test_normalize_percentile_clips_outliers():
    rng = np.random.default_rng(5)
    volume = rng.random((10, 10, 10)).astype(np.float32)
    volume[0, 0, 0] = 1000.0  # one extreme outlier
    volume[0, 0, 1] = -1000.0
    result = normalize_intensity(volume, "percentile", {"lower": 1.0, "upper": 99.0})
    assert float(result.min()) == pytest.approx(0.0, abs=1e-7)
    assert float(result.max()) == pytest.approx(1.0, abs=1e-6)
    lower, upper = np.percentile(volume, [1.0, 99.0])
    expected = (np.clip(volume, lower, upper) - lower) / (upper - lower)
    np.testing.assert_allclose(result, expected, atol=1e-5)
    # the outliers no longer squash the body of the histogram (plain min-max would put it near 0.5)
    assert float(np.median(result)) == pytest.approx(0.5, abs=0.1)
    body = np.ones(volume.shape, dtype=bool)
    body[0, 0, :2] = False
    assert float(np.std(result[body])) > 0.2
    assert float(np.std(normalize_intensity(volume, "minmax")[body])) < 0.01


def test_normalize_percentile_default_bounds():
    volume = np.random.default_rng(6).normal(size=(20, 20, 20))
    lower, upper = np.percentile(volume.astype(np.float32), [0.5, 99.5])
    expected = (np.clip(volume.astype(np.float32), lower, upper) - lower) / (upper - lower)
    np.testing.assert_allclose(normalize_intensity(volume, "percentile"), expected, atol=1e-5)


@pytest.mark.parametrize("scheme", ["minmax", "zscore", "percentile"])
def test_normalize_constant_image_gives_zeros(scheme):
    result = normalize_intensity(np.full((2, 4, 4), 7.5), scheme)
    assert result.dtype == np.float32
    np.testing.assert_array_equal(result, np.zeros((2, 4, 4), dtype=np.float32))


def test_normalize_none_only_casts():
    volume = np.arange(8, dtype=np.int16).reshape(2, 2, 2)
    result = normalize_intensity(volume, "none")
    assert result.dtype == np.float32
    np.testing.assert_array_equal(result, volume.astype(np.float32))


@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
@pytest.mark.parametrize("scheme", ["none", "minmax", "zscore", "percentile"])
def test_normalize_non_finite_raises(bad, scheme):
    volume = np.ones((2, 3, 3), dtype=np.float32)
    volume[1, 2, 0] = bad
    with pytest.raises(InputError, match="non-finite"):
        normalize_intensity(volume, scheme)


def test_normalize_unknown_scheme_raises():
    with pytest.raises(InputError, match="unknown normalisation scheme"):
        normalize_intensity(np.ones((2, 2, 2)), "histogram")


@pytest.mark.parametrize(
    ("spacing_xyz", "axis"),
    [
        ((1.0, 1.0, 1.0), 0),  # isotropic: ties go to the array's first axis (z)
        ((1.25, 1.25, 10.0), 0),  # thick z, as in short-axis cine MRI
        ((6.0, 1.0, 1.0), 2),  # thick x: the array's last axis
        ((0.8, 5.0, 0.8), 1),  # thick y
        ((3.0, 1.0, 3.0), 0),  # tie between x and z goes to z (array axis 0)
        ((3.0, 3.0, 1.0), 1),  # tie between x and y goes to y (array axis 1)
    ],
)
def test_through_plane_axis(spacing_xyz, axis):
    assert through_plane_axis(spacing_xyz) == axis


def test_through_plane_axis_tolerates_rounding_noise():
    # spacings read back from float32 headers differ in the last bits; that is still a tie
    assert through_plane_axis((1.0000001, 1.0, 1.0)) == 0
