"""Tests for mpcl.training.metrics: hand-computed values, empty-mask conventions, cropping, summaries,
and agreement with medpy (skipped where medpy, from the dev extra, is not installed)."""

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
    assert res[1] == {**binary_metrics(pred == 1, gt == 1, (1.0, 2.0)), "empty_prediction": False}
    assert res[2]["dice"] == 0.0 and math.isnan(res[2]["hd95"])
    assert res[2]["empty_prediction"] is True


# --- empty prediction conventions ("undefined" default, "zero" as in BCP's ACDC test script) -------


def _labels_with_missed_class() -> tuple[list[np.ndarray], list[np.ndarray]]:
    """Two 3D cases with classes 1 (LV) and 2 (RV). Case 0: class 2 is in gt but predicted nowhere.
    Case 1: both classes predicted with some error."""
    shape = (6, 16, 16)
    gt0 = np.zeros(shape, dtype=np.uint8)
    gt0[1:5, 2:7, 2:7] = 1
    gt0[1:5, 9:14, 9:14] = 2
    pred0 = np.zeros(shape, dtype=np.uint8)
    pred0[1:5, 3:8, 2:7] = 1  # class 1 shifted by one voxel, class 2 missed entirely
    gt1 = gt0.copy()
    pred1 = np.zeros(shape, dtype=np.uint8)
    pred1[1:5, 2:7, 2:7] = 1  # class 1 exact
    pred1[1:5, 9:14, 11:16] = 2  # class 2 shifted by two voxels
    return [pred0, pred1], [gt0, gt1]


def _nan_as_none(case: dict) -> dict:
    """A multiclass_metrics result with NaN replaced by None, so that == compares it exactly."""
    return {c: {k: None if v != v else v for k, v in values.items()} for c, values in case.items()}


def test_empty_prediction_zero_scores_a_missed_class_as_all_zeros() -> None:
    preds, gts = _labels_with_missed_class()
    spacing = (2.0, 1.0, 1.0)
    pairs = list(zip(preds, gts, strict=True))
    per_case = [multiclass_metrics(p, g, 3, spacing, empty_prediction="zero") for p, g in pairs]
    missed = per_case[0][2]
    assert missed == {"dice": 0.0, "jaccard": 0.0, "hd95": 0.0, "asd": 0.0, "empty_prediction": True}
    assert all(type(missed[m]) is float for m in metrics.METRIC_NAMES)
    # Classes that were predicted are scored exactly as in the default convention.
    default = [multiclass_metrics(p, g, 3, spacing) for p, g in pairs]
    assert per_case[0][1] == default[0][1]
    assert per_case[1] == default[1]

    s = summarize(per_case, CLASS_NAMES)
    rv_hd95_case1 = per_case[1][2]["hd95"]
    assert rv_hd95_case1 > 0
    assert s["RV"]["n_empty_prediction"] == 1
    assert s["LV"]["n_empty_prediction"] == 0
    assert s["mean"]["n_empty_prediction"] == 1
    # The zeros enter the means: nothing is undefined.
    assert s["RV"]["hd95"] == {
        "mean": pytest.approx(rv_hd95_case1 / 2),
        "std": pytest.approx(rv_hd95_case1 / 2),
        "n_undefined": 0,
    }
    assert s["RV"]["dice"]["mean"] == pytest.approx(per_case[1][2]["dice"] / 2)
    assert s["RV"]["asd"]["n_undefined"] == 0
    case0_mean_hd95 = (per_case[0][1]["hd95"] + 0.0) / 2
    case1_mean_hd95 = (per_case[1][1]["hd95"] + rv_hd95_case1) / 2
    assert s["mean"]["hd95"]["mean"] == pytest.approx((case0_mean_hd95 + case1_mean_hd95) / 2)
    assert s["mean"]["hd95"]["n_undefined"] == 0
    json.dumps(s, allow_nan=False)
    assert type(s["RV"]["n_empty_prediction"]) is int


def test_empty_prediction_undefined_is_the_unchanged_default() -> None:
    preds, gts = _labels_with_missed_class()
    pairs = list(zip(preds, gts, strict=True))
    per_case = [multiclass_metrics(p, g, 3, empty_prediction="undefined") for p, g in pairs]
    default = [multiclass_metrics(p, g, 3) for p, g in pairs]
    missed = per_case[0][2]
    assert missed["dice"] == 0.0 and missed["jaccard"] == 0.0
    assert math.isnan(missed["hd95"]) and math.isnan(missed["asd"])
    assert missed["empty_prediction"] is True
    assert [_nan_as_none(case) for case in per_case] == [_nan_as_none(case) for case in default]
    # Per class, binary_metrics' own default is the same convention.
    assert binary_metrics(preds[0] == 1, gts[0] == 1) == {
        k: v for k, v in per_case[0][1].items() if k != "empty_prediction"
    }

    s = summarize(per_case, CLASS_NAMES)
    rv_hd95_case1 = per_case[1][2]["hd95"]
    assert s["RV"]["hd95"] == {"mean": pytest.approx(rv_hd95_case1), "std": 0.0, "n_undefined": 1}
    assert s["RV"]["asd"]["n_undefined"] == 1
    assert s["RV"]["dice"]["n_undefined"] == 0
    assert s["RV"]["n_empty_prediction"] == 1
    assert s["LV"]["n_empty_prediction"] == 0
    assert s["mean"]["n_empty_prediction"] == 1
    # Case 0's mean hd95 is over its defined class only (LV).
    case1_mean_hd95 = (per_case[1][1]["hd95"] + rv_hd95_case1) / 2
    assert s["mean"]["hd95"]["mean"] == pytest.approx((per_case[0][1]["hd95"] + case1_mean_hd95) / 2)
    json.dumps(s, allow_nan=False)


@pytest.mark.parametrize("mode", ["zero", "undefined"])
def test_empty_prediction_modes_agree_when_gt_is_empty(mode: str) -> None:
    gt = np.zeros((10, 10), dtype=np.uint8)
    gt[2:5, 2:5] = 1  # class 2 absent from gt
    pred = gt.copy()
    res = multiclass_metrics(pred, gt, 4, empty_prediction=mode)
    pred[7:9, 7:9] = 3  # class 3 predicted although absent from gt
    res_fp = multiclass_metrics(pred, gt, 4, empty_prediction=mode)
    # Both masks empty: a perfect "nothing here" in both modes.
    assert res[2] == {"dice": 1.0, "jaccard": 1.0, "hd95": 0.0, "asd": 0.0, "empty_prediction": False}
    # Ground truth empty, prediction not: undefined distances in both modes.
    assert res_fp[3]["dice"] == 0.0 and math.isnan(res_fp[3]["hd95"]) and math.isnan(res_fp[3]["asd"])
    assert res_fp[3]["empty_prediction"] is False
    assert summarize([res_fp], ["background", "a", "b", "c"])["mean"]["n_empty_prediction"] == 0


def test_empty_prediction_rejects_unknown_mode() -> None:
    labels = np.zeros((4, 4), dtype=np.uint8)
    with pytest.raises(ValueError, match="empty_prediction"):
        multiclass_metrics(labels, labels, 2, empty_prediction="nan")
    with pytest.raises(ValueError, match="empty_prediction"):
        binary_metrics(labels, labels, empty_prediction="Zero")


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


def test_summarize_without_empty_prediction_flags_reports_none() -> None:
    # Hand-built per-case dicts (PER_CASE) carry no flag: the count is unknown, not 0.
    s = summarize(PER_CASE, CLASS_NAMES)
    assert s["LV"]["n_empty_prediction"] is None and s["mean"]["n_empty_prediction"] is None


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


# --- agreement with medpy.metric.binary ------------------------------------------------------------

MEDPY_SPACINGS = [None, (10.0, 1.5, 1.5), (1.0, 0.7, 2.0)]


@pytest.fixture(scope="module")
def medpy_binary():
    return pytest.importorskip(
        "medpy.metric.binary", reason="medpy is not installed (pip install -e '.[dev]' provides it)"
    )


def _assert_matches_medpy(medpy_binary, pred: np.ndarray, gt: np.ndarray, spacing) -> None:
    """Our four metrics equal medpy's dc, jc, hd95, asd (same argument order: result, reference)."""
    got = binary_metrics(pred, gt, spacing)
    expected = {
        "dice": medpy_binary.dc(pred, gt),
        "jaccard": medpy_binary.jc(pred, gt),
        "hd95": medpy_binary.hd95(pred, gt, voxelspacing=spacing),
        "asd": medpy_binary.asd(pred, gt, voxelspacing=spacing),
    }
    for key, value in expected.items():
        assert got[key] == pytest.approx(float(value), rel=1e-9, abs=0.0), (key, got[key], value)


@pytest.mark.parametrize("spacing", MEDPY_SPACINGS)
@pytest.mark.parametrize("seed", range(8))
def test_matches_medpy_on_random_3d_blobs(medpy_binary, seed: int, spacing) -> None:
    rng = np.random.default_rng(1000 + seed)
    shape = tuple(int(n) for n in rng.integers(12, 30, size=3))
    sigma = float(rng.choice([0.8, 1.5, 3.0]))
    fraction = float(rng.choice([0.003, 0.03, 0.15, 0.5]))
    gt = _random_blob(rng, shape, sigma, fraction)
    if seed % 2 == 0:  # a prediction correlated with the ground truth, as a trained model's would be
        flipped = _random_blob(rng, shape, sigma, 0.1)  # blobby regions where pred and gt disagree
        pred = (gt ^ flipped) | (rng.random(shape) < 0.002)  # plus a few isolated false positives
    else:  # independent blobs of a different size
        pred = _random_blob(rng, shape, float(rng.choice([1.0, 2.0])), float(rng.choice([0.01, 0.1, 0.4])))
    if seed % 4 == 1:  # both touch the array border, on different faces
        pred[0, : shape[1] // 2, :] = True
        gt[:, :, -1] = True
    assert pred.any() and gt.any()
    _assert_matches_medpy(medpy_binary, pred, gt, spacing)
    _assert_matches_medpy(medpy_binary, gt, pred, spacing)  # asd is one-directional


@pytest.mark.parametrize("spacing", [None, (0.7, 2.0)])
def test_matches_medpy_in_2d(medpy_binary, spacing) -> None:
    rng = np.random.default_rng(7)
    pred = _random_blob(rng, (48, 40), 2.0, 0.1)
    gt = _random_blob(rng, (48, 40), 2.0, 0.1)
    gt[:, 0] = True
    _assert_matches_medpy(medpy_binary, pred, gt, spacing)


def _edge_case_pairs() -> dict[str, tuple[np.ndarray, np.ndarray]]:
    shape = (7, 9, 8)
    empty = np.zeros(shape, dtype=bool)
    full = np.ones(shape, dtype=bool)
    voxel = empty.copy()
    voxel[3, 4, 5] = True
    corner = empty.copy()
    corner[0, 0, 0] = True
    far_corner = empty.copy()
    far_corner[-1, -1, -1] = True
    cube = _cube(shape, 2, 3, 2, 3)
    other_cube = _cube(shape, 0, 0, 5, 2)
    return {
        "single voxel, identical": (voxel, voxel.copy()),
        "single voxel vs other single voxel": (corner, far_corner),
        "single voxel at the cube's centre": (_single(shape, (3, 4, 3)), cube),
        "single voxel vs cube": (corner, cube),
        "identical cubes": (cube, cube.copy()),
        "disjoint cubes": (cube, other_cube),
        "full vs full": (full, full.copy()),
        "full vs cube": (full, cube),
        "full vs single corner voxel": (full, corner),
        "full vs single inner voxel": (full, voxel),
    }


def _single(shape: tuple[int, ...], index: tuple[int, ...]) -> np.ndarray:
    mask = np.zeros(shape, dtype=bool)
    mask[index] = True
    return mask


@pytest.mark.parametrize("spacing", MEDPY_SPACINGS)
@pytest.mark.parametrize("case", list(_edge_case_pairs()))
def test_matches_medpy_on_edge_cases(medpy_binary, case: str, spacing) -> None:
    pred, gt = _edge_case_pairs()[case]
    _assert_matches_medpy(medpy_binary, pred, gt, spacing)
    _assert_matches_medpy(medpy_binary, gt, pred, spacing)


def test_empty_masks_against_medpy(medpy_binary) -> None:
    """Where medpy has no number, ours is our documented convention; elsewhere we agree."""
    empty = np.zeros((5, 6, 7), dtype=bool)
    cube = _cube((5, 6, 7), 1, 1, 1, 3)
    for pred, gt in ((empty, cube), (cube, empty)):  # exactly one empty: dice and jaccard 0 in both
        got = binary_metrics(pred, gt)
        assert got["dice"] == medpy_binary.dc(pred, gt) == 0.0
        assert got["jaccard"] == medpy_binary.jc(pred, gt) == 0.0
    # Both empty: jc falls back to 1 like ours; medpy 0.5.2's dc divides numpy integers 0 / 0.0, which
    # gives NaN (with a RuntimeWarning) instead of reaching its ZeroDivisionError fallback of 1.
    assert binary_metrics(empty, empty)["jaccard"] == medpy_binary.jc(empty, empty) == 1.0
    with np.errstate(invalid="ignore"):
        medpy_dice = medpy_binary.dc(empty, empty)
    assert binary_metrics(empty, empty)["dice"] == 1.0 and (medpy_dice == 1.0 or math.isnan(medpy_dice))
    with pytest.raises(RuntimeError):
        medpy_binary.hd95(empty, cube)
    with pytest.raises(RuntimeError):
        medpy_binary.asd(cube, empty)
