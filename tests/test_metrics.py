"""Tests for mpcl.training.metrics: hand-computed values, empty-mask conventions, cropping, summaries."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
from scipy import ndimage

from mpcl.training import metrics
from mpcl.training.metrics import binary_metrics, format_table, multiclass_metrics, summarize


def _square(shape: tuple[int, int], top: int, left: int, side: int) -> np.ndarray:
    mask = np.zeros(shape, dtype=bool)
    mask[top : top + side, left : left + side] = True
    return mask


def _reference_metrics(pred: np.ndarray, gt: np.ndarray, spacing=None) -> dict[str, float]:
    """Brute-force medpy-style metrics on the full array (no cropping), for non-empty masks."""
    pred = pred.astype(bool)
    gt = gt.astype(bool)
    footprint = ndimage.generate_binary_structure(pred.ndim, 1)
    pred_border = pred ^ ndimage.binary_erosion(pred, structure=footprint, iterations=1)
    gt_border = gt ^ ndimage.binary_erosion(gt, structure=footprint, iterations=1)
    d_pg = ndimage.distance_transform_edt(~gt_border, sampling=spacing)[pred_border]
    d_gp = ndimage.distance_transform_edt(~pred_border, sampling=spacing)[gt_border]
    inter = np.count_nonzero(pred & gt)
    return {
        "dice": 2.0 * inter / (np.count_nonzero(pred) + np.count_nonzero(gt)),
        "jaccard": inter / np.count_nonzero(pred | gt),
        "hd95": float(np.percentile(np.hstack((d_pg, d_gp)), 95)),
        "asd": float(d_pg.mean()),
    }


# --- binary_metrics: hand-computed cases -------------------------------------------------------


def test_identical_masks_are_perfect() -> None:
    mask = _square((20, 20), 4, 6, 5)
    m = binary_metrics(mask, mask)
    assert m == {"dice": 1.0, "jaccard": 1.0, "hd95": 0.0, "asd": 0.0}


def test_returns_python_floats_and_accepts_0_1_ints() -> None:
    mask = _square((10, 10), 2, 2, 4).astype(np.uint8)
    m = binary_metrics(mask, mask)
    assert set(m) == {"dice", "jaccard", "hd95", "asd"}
    assert all(type(v) is float for v in m.values())


def test_two_single_voxels() -> None:
    pred = np.zeros((12, 12), dtype=bool)
    gt = np.zeros((12, 12), dtype=bool)
    pred[2, 3] = True
    gt[7, 7] = True
    # Each mask is its own surface; the only distance is |(5, 4)| = sqrt(41) in both directions.
    m = binary_metrics(pred, gt)
    assert m["dice"] == 0.0 and m["jaccard"] == 0.0
    assert m["hd95"] == pytest.approx(math.sqrt(41))
    assert m["asd"] == pytest.approx(math.sqrt(41))


def test_disjoint_squares_at_known_offset() -> None:
    # 3x3 squares, rows 2-4; pred at cols 2-4, gt at cols 10-12. Surface = the 8 voxels around the centre.
    # Pred surface -> nearest gt surface voxel is (same row, col 10): cols 2, 3, 4 are 8, 7, 6 away.
    # Pred surface: top row 8,7,6; middle row 8,6 (centre excluded); bottom row 8,7,6 -> sum 56 / 8 = 7.
    # gt -> pred is the mirror image (same multiset). Concatenation of 16: six 6s, four 7s, six 8s;
    # 95th percentile sits at index 0.95 * 15 = 14.25, between two 8s -> 8.
    pred = _square((8, 16), 2, 2, 3)
    gt = _square((8, 16), 2, 10, 3)
    m = binary_metrics(pred, gt)
    assert m["dice"] == 0.0 and m["jaccard"] == 0.0
    assert m["asd"] == pytest.approx(7.0)
    assert m["hd95"] == pytest.approx(8.0)


def test_square_shifted_by_k() -> None:
    side, k = 6, 2
    gt = _square((20, 20), 5, 5, side)  # rows 5-10, cols 5-10
    pred = _square((20, 20), 5, 5 + k, side)  # rows 5-10, cols 7-12
    m = binary_metrics(pred, gt)
    # Overlap is side x (side - k); both masks have side^2 voxels.
    assert m["dice"] == pytest.approx(2 * side * (side - k) / (2 * side * side))  # = (s-k)/s = 2/3
    assert m["jaccard"] == pytest.approx(side * (side - k) / (side * (side + k)))  # = (s-k)/(s+k) = 1/2
    assert m["hd95"] == pytest.approx(k)
    # ASD by hand: the pred surface is the 20-voxel ring of rows 5-10 x cols 7-12; gt's ring is cols 5-10.
    #   top row (row 5), cols 7..12:    0 0 0 0 1 2   (cols 7-10 lie on gt's top edge)  sum 3
    #   bottom row (row 10), same:      0 0 0 0 1 2                                      sum 3
    #   left column (col 7), rows 6..9: 1 2 2 1       (nearest is gt's top/bottom edge or col 5) sum 6
    #   right column (col 12), rows 6..9: 2 2 2 2     (nearest is gt's right edge, col 10)  sum 8
    # 20 / 20 voxels -> ASD = 1. (gt -> pred is the mirror image, so the pooled 40 distances are
    # 16 zeros, 8 ones, 16 twos and the 95th percentile is 2 = k, as asserted above.)
    assert m["asd"] == pytest.approx(1.0)


def test_asd_is_one_directional_pred_to_gt() -> None:
    # gt is a single voxel inside a 3x3 pred: pred's 8 surface voxels are 1 or sqrt(2) from it,
    # while gt's only surface voxel is 1 away from pred's surface.
    pred = _square((9, 9), 3, 3, 3)
    gt = np.zeros((9, 9), dtype=bool)
    gt[4, 4] = True
    assert binary_metrics(pred, gt)["asd"] == pytest.approx((4 * 1 + 4 * math.sqrt(2)) / 8)
    assert binary_metrics(gt, pred)["asd"] == pytest.approx(1.0)


# --- empty masks ---------------------------------------------------------------------------------


def test_empty_prediction_nonempty_gt() -> None:
    gt = _square((10, 10), 2, 2, 3)
    m = binary_metrics(np.zeros_like(gt), gt)
    assert m["dice"] == 0.0 and m["jaccard"] == 0.0
    assert math.isnan(m["hd95"]) and math.isnan(m["asd"])


def test_nonempty_prediction_empty_gt() -> None:
    pred = _square((10, 10), 2, 2, 3)
    m = binary_metrics(pred, np.zeros_like(pred))
    assert m["dice"] == 0.0 and m["jaccard"] == 0.0
    assert math.isnan(m["hd95"]) and math.isnan(m["asd"])


def test_both_empty() -> None:
    empty = np.zeros((6, 7, 8), dtype=bool)
    assert binary_metrics(empty, empty) == {"dice": 1.0, "jaccard": 1.0, "hd95": 0.0, "asd": 0.0}


def test_shape_mismatch_raises() -> None:
    with pytest.raises(ValueError, match="same shape"):
        binary_metrics(np.zeros((4, 4)), np.zeros((4, 5)))


def test_bad_spacing_raises() -> None:
    mask = _square((6, 6), 1, 1, 2)
    with pytest.raises(ValueError, match="spacing"):
        binary_metrics(mask, mask, spacing=(1.0, 1.0, 1.0))
    with pytest.raises(ValueError, match="spacing"):
        binary_metrics(mask, mask, spacing=(1.0, 0.0))


# --- spacing -------------------------------------------------------------------------------------


def test_spacing_scales_distances_along_its_axis() -> None:
    # Same squares as test_disjoint_squares_at_known_offset: offset only along axis 1 (asd 7, hd95 8),
    # and the nearest voxel is always in the same row, so only axis 1's spacing matters.
    pred = _square((8, 16), 2, 2, 3)
    gt = _square((8, 16), 2, 10, 3)
    m = binary_metrics(pred, gt, spacing=(1.0, 0.5))
    assert m["asd"] == pytest.approx(3.5) and m["hd95"] == pytest.approx(4.0)
    m = binary_metrics(pred, gt, spacing=(3.0, 1.0))
    assert m["asd"] == pytest.approx(7.0) and m["hd95"] == pytest.approx(8.0)
    # Spacing never changes overlap scores.
    assert m["dice"] == 0.0


def test_spacing_follows_array_axis_order() -> None:
    pred = np.zeros((12, 12), dtype=bool)
    gt = np.zeros((12, 12), dtype=bool)
    pred[2, 3] = True
    gt[5, 7] = True  # offset (3, 4)
    m = binary_metrics(pred, gt, spacing=(2.0, 1.0))
    assert m["hd95"] == pytest.approx(math.hypot(3 * 2.0, 4 * 1.0))  # sqrt(52)
    m = binary_metrics(pred, gt, spacing=(1.0, 2.0))
    assert m["hd95"] == pytest.approx(math.hypot(3 * 1.0, 4 * 2.0))  # sqrt(73)


# --- 3D ------------------------------------------------------------------------------------------


def _cube(shape: tuple[int, int, int], z: int, y: int, x: int, side: int) -> np.ndarray:
    mask = np.zeros(shape, dtype=bool)
    mask[z : z + side, y : y + side, x : x + side] = True
    return mask


def test_3d_cube_shifted_along_z() -> None:
    # 3x3x3 cubes: gt at z 2-4, pred at z 3-5 (same y, x). Overlap 2x3x3 = 18 -> dice 36/54, jaccard 18/36.
    # Each cube's surface is its 26 voxels minus the centre. Pred surface -> gt surface:
    #   8 voxels of pred's z=3 face (all but (3,3,3)) lie on gt's surface: 0;
    #   the 8 ring voxels of pred's z=4 layer lie on gt's z=4 face: 0;
    #   (3,3,3) is gt's centre, its in-plane neighbour (3,3,4) is gt surface: 1;
    #   the 9 voxels of pred's z=5 face are one z-step above gt's z=4 face: 1 (or sz with spacing).
    gt = _cube((8, 8, 8), 2, 2, 2, 3)
    pred = _cube((8, 8, 8), 3, 2, 2, 3)
    m = binary_metrics(pred, gt)
    assert m["dice"] == pytest.approx(2 / 3)
    assert m["jaccard"] == pytest.approx(0.5)
    assert m["asd"] == pytest.approx(10 / 26)
    # Pooled (mirror-symmetric) 52 distances: 32 zeros, 20 ones -> 95th percentile 1.
    assert m["hd95"] == pytest.approx(1.0)

    sz = 2.5
    m = binary_metrics(pred, gt, spacing=(sz, 1.0, 1.0))
    assert m["asd"] == pytest.approx((9 * sz + 1.0) / 26)
    # Pooled: 32 zeros, 2 ones, 18 values of sz; index 0.95 * 51 = 48.45 lies among the sz values.
    assert m["hd95"] == pytest.approx(sz)


# --- cropping ------------------------------------------------------------------------------------


def _random_blob(
    rng: np.random.Generator, shape: tuple[int, ...], sigma: float, fraction: float
) -> np.ndarray:
    """Smoothed noise thresholded so that about ``fraction`` of the voxels are foreground (a few blobs)."""
    field = ndimage.gaussian_filter(rng.standard_normal(shape), sigma)
    return field > np.quantile(field, 1.0 - fraction)


@pytest.mark.parametrize("seed", range(6))
def test_cropped_equals_full_array_reference(seed: int) -> None:
    rng = np.random.default_rng(seed)
    shape = (40, 50) if seed % 2 == 0 else (18, 22, 26)
    spacing = tuple(rng.uniform(0.3, 3.0, size=len(shape)))
    pred = _random_blob(rng, shape, sigma=3.0, fraction=0.15)
    gt = _random_blob(rng, shape, sigma=3.0, fraction=0.15)
    if seed == 0:  # small, far-apart objects: the padded bounding box is much smaller than the array
        pred = np.zeros(shape, dtype=bool)
        gt = np.zeros(shape, dtype=bool)
        pred[5:9, 6:10] = True
        gt[12:15, 8:13] = True
    if seed == 1:  # objects touching the array border: the crop must not invent surface or hide it
        pred[0, :, :] = True
        gt[:, :, -1] = True
    assert pred.any() and gt.any()
    expected = _reference_metrics(pred, gt, spacing)
    got = binary_metrics(pred, gt, spacing)
    for key in expected:
        assert got[key] == pytest.approx(expected[key], rel=1e-12, abs=0.0), key


def test_distance_transforms_run_on_padded_bounding_box(monkeypatch: pytest.MonkeyPatch) -> None:
    seen_shapes: list[tuple[int, ...]] = []
    real_edt = ndimage.distance_transform_edt

    def spy(image, *args, **kwargs):
        seen_shapes.append(np.shape(image))
        return real_edt(image, *args, **kwargs)

    monkeypatch.setattr(metrics.ndimage, "distance_transform_edt", spy)
    pred = _square((100, 100), 10, 20, 5)  # rows 10-14, cols 20-24
    gt = _square((100, 100), 12, 30, 4)  # rows 12-15, cols 30-33
    binary_metrics(pred, gt)
    # Union bounding box rows 10-15, cols 20-33, padded by 1 -> 8 x 16.
    assert seen_shapes and all(s == (8, 16) for s in seen_shapes)


# --- multiclass ----------------------------------------------------------------------------------


def test_multiclass_matches_per_class_binary() -> None:
    gt = np.zeros((20, 20), dtype=np.uint8)
    pred = np.zeros((20, 20), dtype=np.uint8)
    gt[2:8, 2:8] = 1
    pred[3:9, 2:8] = 1
    gt[12:16, 12:16] = 2  # class 2 missing from pred -> NaN distances
    res = multiclass_metrics(pred, gt, num_classes=3, spacing=(1.0, 2.0))
    assert sorted(res) == [1, 2]
    assert res[1] == binary_metrics(pred == 1, gt == 1, (1.0, 2.0))
    assert res[2]["dice"] == 0.0 and math.isnan(res[2]["hd95"])


def test_multiclass_label_out_of_range_raises() -> None:
    ok = np.zeros((5, 5), dtype=np.int64)
    bad = ok.copy()
    bad[1, 1] = 3
    with pytest.raises(ValueError, match="outside"):
        multiclass_metrics(bad, ok, num_classes=3)
    bad[1, 1] = -1
    with pytest.raises(ValueError, match="outside"):
        multiclass_metrics(ok, bad, num_classes=3)


def test_multiclass_shape_mismatch_raises() -> None:
    with pytest.raises(ValueError, match="same shape"):
        multiclass_metrics(np.zeros((4, 4), dtype=int), np.zeros((4, 4, 1), dtype=int), num_classes=2)


# --- summarize / format_table --------------------------------------------------------------------

NAN = float("nan")
CLASS_NAMES = ["background", "LV", "RV"]
PER_CASE = [
    {
        1: {"dice": 0.8, "jaccard": 0.6, "hd95": 2.0, "asd": 1.0},
        2: {"dice": 0.6, "jaccard": 0.4, "hd95": NAN, "asd": NAN},
    },
    {
        1: {"dice": 0.9, "jaccard": 0.8, "hd95": 4.0, "asd": 3.0},
        2: {"dice": 0.4, "jaccard": 0.2, "hd95": 6.0, "asd": 2.0},
    },
]


def test_summarize_per_class_and_mean() -> None:
    s = summarize(PER_CASE, CLASS_NAMES)
    assert set(s) == {"LV", "RV", "mean"}
    assert s["LV"]["dice"]["mean"] == pytest.approx(0.85)
    assert s["LV"]["dice"]["std"] == pytest.approx(0.05)  # population std of (0.8, 0.9)
    assert s["LV"]["hd95"] == {"mean": pytest.approx(3.0), "std": pytest.approx(1.0), "n_undefined": 0}
    # RV hd95/asd: one NaN, left out and counted.
    assert s["RV"]["hd95"] == {"mean": pytest.approx(6.0), "std": pytest.approx(0.0), "n_undefined": 1}
    assert s["RV"]["asd"]["n_undefined"] == 1
    assert s["RV"]["jaccard"]["mean"] == pytest.approx(0.3)
    # "mean": per case over classes first -> dice (0.7, 0.65); hd95 (nanmean(2, nan) = 2, 5); asd (1, 2.5).
    assert s["mean"]["dice"]["mean"] == pytest.approx(0.675)
    assert s["mean"]["dice"]["std"] == pytest.approx(0.025)
    assert s["mean"]["hd95"] == {"mean": pytest.approx(3.5), "std": pytest.approx(1.5), "n_undefined": 0}
    assert s["mean"]["asd"]["mean"] == pytest.approx(1.75)
    assert s["mean"]["asd"]["std"] == pytest.approx(0.75)


def test_summarize_all_undefined_is_none_and_strict_json() -> None:
    per_case = [
        {1: {"dice": 0.0, "jaccard": 0.0, "hd95": NAN, "asd": NAN}},
        {1: {"dice": 0.0, "jaccard": 0.0, "hd95": NAN, "asd": NAN}},
    ]
    s = summarize(per_case, ["background", "tumour"])
    assert s["tumour"]["hd95"] == {"mean": None, "std": None, "n_undefined": 2}
    assert s["mean"]["asd"] == {"mean": None, "std": None, "n_undefined": 2}
    assert s["tumour"]["dice"] == {"mean": 0.0, "std": 0.0, "n_undefined": 0}
    json.dumps(s, allow_nan=False)  # raises if any NaN slipped through


def test_summarize_rejects_missing_class() -> None:
    with pytest.raises(ValueError, match="class ids"):
        summarize([{1: PER_CASE[0][1]}], CLASS_NAMES)


def test_format_table() -> None:
    table = format_table(summarize(PER_CASE, CLASS_NAMES), CLASS_NAMES)
    lines = table.splitlines()
    assert lines[0].split() == ["class", "Dice", "%", "Jaccard", "%", "HD95", "ASD"]
    lv = next(line for line in lines if line.startswith("LV"))
    assert "85.00 ± 5.00" in lv and "70.00 ± 10.00" in lv and "3.00 ± 1.00" in lv and "2.00 ± 1.00" in lv
    mean_row = next(line for line in lines if line.startswith("mean"))
    assert "67.50 ± 2.50" in mean_row and "3.50 ± 1.50" in mean_row
    assert "RV: 1 case(s)" in table
