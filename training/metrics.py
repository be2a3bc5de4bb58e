"""Segmentation metrics (Dice, Jaccard, HD95, ASD) that match medpy, plus per-class summaries.

Why not medpy itself: it is unmaintained and pulls in a C++ build; these few functions only need
numpy and scipy.ndimage, and the definitions below reproduce ``medpy.metric.binary`` exactly:

* dice    = 2|P∩G| / (|P| + |G|)                                  (medpy ``dc``)
* jaccard = |P∩G| / |P∪G|                                         (medpy ``jc``)
* surface voxels of a mask M = M XOR binary_erosion(M, generate_binary_structure(ndim, 1)),
  eroded with voxels outside the array counted as background (so a mask touching the border
  has surface there);
* d(P→G) = for every surface voxel of P, the Euclidean distance (in ``spacing`` units) to the
  nearest surface voxel of G, via ``distance_transform_edt(~surface(G), sampling=spacing)``;
* hd95    = 95th percentile (numpy linear interpolation) of concat(d(P→G), d(G→P))  (medpy ``hd95``)
* asd     = mean of d(P→G): one-directional, from prediction to ground truth         (medpy ``asd``)

Conventions where medpy raises (HD95/ASD of an empty mask) or has no number (medpy 0.5.2's ``dc`` of
two empty masks is NaN, its ``jc`` 1):

* both masks empty        -> dice 1, jaccard 1, hd95 0, asd 0  (a perfect "nothing here" answer);
* ground truth empty, prediction not -> dice 0, jaccard 0, hd95 NaN, asd NaN. A distance to an
  empty set is undefined, so we never invent a number (such as the image diagonal); the NaNs are
  counted as ``n_undefined`` by :func:`summarize` and left out of its means.
* prediction empty, ground truth not: set by ``empty_prediction``. ``"undefined"`` (default) treats it
  like the case above (dice 0, jaccard 0, hd95 NaN, asd NaN). ``"zero"`` is the published BCP
  convention (its ACDC test script ``code/test_ACDC.py`` scores such a class 0, 0, 0, 0): all four
  metrics 0, and those zeros enter the means, so a missed structure gets the best possible distance;
  use it only to compare with numbers reported that way. In both modes :func:`multiclass_metrics`
  flags such classes (``empty_prediction``) and :func:`summarize` counts them (``n_empty_prediction``).

``spacing`` is per array axis, in the array's axis order (for a SimpleITK (z, y, x) array that is
(sz, sy, sx), see ``Volume.array_spacing``); ``None`` means 1 along every axis.

Distance transforms run only on the bounding box of both masks padded by one voxel. This gives
the same numbers as the full array: every surface voxel lies in the box, so the nearest one to any
voxel in the box is found inside it, and the erosion sees the same neighbourhood.

:func:`summarize` returns plain Python floats and ints; undefined statistics are ``None`` (not
``float('nan')``) so the result can be written with ``json.dump`` as strict JSON.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Literal

import numpy as np
from scipy import ndimage

METRIC_NAMES: tuple[str, ...] = ("dice", "jaccard", "hd95", "asd")
MEAN_KEY = "mean"
EMPTY_PREDICTION_KEY = "empty_prediction"  # per-class flag in multiclass_metrics results, not a metric
EmptyPrediction = Literal["zero", "undefined"]
EMPTY_PREDICTION_MODES: tuple[str, ...] = ("zero", "undefined")


def _as_binary_pair(pred: np.ndarray, gt: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Cast both masks to bool (nonzero = foreground) and refuse mismatched shapes early."""
    pred_b = np.asarray(pred).astype(bool, copy=False)
    gt_b = np.asarray(gt).astype(bool, copy=False)
    if pred_b.shape != gt_b.shape:
        raise ValueError(f"pred and gt must have the same shape, got {pred_b.shape} and {gt_b.shape}")
    if pred_b.ndim == 0:
        raise ValueError("pred and gt must be arrays with at least one axis, got scalars")
    return pred_b, gt_b


def _normalize_spacing(spacing: Sequence[float] | float | None, ndim: int) -> tuple[float, ...]:
    """One positive voxel size per array axis, so distances come out in physical units."""
    if spacing is None:
        return (1.0,) * ndim
    values = np.atleast_1d(np.asarray(spacing, dtype=float))
    if values.ndim != 1 or values.size not in (1, ndim):
        raise ValueError(f"spacing must have one value per array axis ({ndim}), got {spacing!r}")
    if not np.all(np.isfinite(values)) or np.any(values <= 0):
        raise ValueError(f"spacing values must be finite and positive, got {spacing!r}")
    if values.size == 1:
        values = np.repeat(values, ndim)
    return tuple(float(v) for v in values)


def _padded_bbox(mask: np.ndarray, pad: int = 1) -> tuple[slice, ...]:
    """Slices of the bounding box of a non-empty mask, grown by ``pad`` and clipped to the array."""
    slices = []
    for axis in range(mask.ndim):
        other_axes = tuple(a for a in range(mask.ndim) if a != axis)
        idx = np.flatnonzero(np.any(mask, axis=other_axes))
        slices.append(slice(max(int(idx[0]) - pad, 0), min(int(idx[-1]) + 1 + pad, mask.shape[axis])))
    return tuple(slices)


def _surface(mask: np.ndarray) -> np.ndarray:
    """Surface voxels as medpy defines them: the mask minus its face-connected erosion."""
    footprint = ndimage.generate_binary_structure(mask.ndim, 1)
    return mask ^ ndimage.binary_erosion(mask, structure=footprint, iterations=1)


def _surface_distances(
    source_surface: np.ndarray, target_surface: np.ndarray, spacing: tuple[float, ...]
) -> np.ndarray:
    """Distance from each source surface voxel to the nearest target surface voxel (medpy's d(A→B))."""
    dt = ndimage.distance_transform_edt(~target_surface, sampling=spacing)
    return np.asarray(dt[source_surface], dtype=np.float64)


def _overlap_scores(pred: np.ndarray, gt: np.ndarray) -> tuple[float, float]:
    """Dice and Jaccard from voxel counts; both empty counts as perfect agreement."""
    n_pred = int(np.count_nonzero(pred))
    n_gt = int(np.count_nonzero(gt))
    if n_pred + n_gt == 0:
        return 1.0, 1.0
    inter = int(np.count_nonzero(pred & gt))
    union = n_pred + n_gt - inter
    return 2.0 * inter / (n_pred + n_gt), inter / union


def _check_empty_prediction(empty_prediction: str) -> None:
    if empty_prediction not in EMPTY_PREDICTION_MODES:
        raise ValueError(
            f"empty_prediction must be one of {EMPTY_PREDICTION_MODES}, got {empty_prediction!r}"
        )


def binary_metrics(
    pred: np.ndarray,
    gt: np.ndarray,
    spacing: Sequence[float] | None = None,
    empty_prediction: EmptyPrediction = "undefined",
) -> dict[str, float]:
    """Dice, Jaccard, HD95 and ASD of one binary mask pair, identical to medpy (see module docstring).

    ``pred``/``gt``: same-shape arrays (2D or 3D), nonzero = foreground. ``spacing``: voxel size per
    array axis in array order (None = 1). Distances are in ``spacing`` units; NaN when exactly one
    mask is empty, except that ``empty_prediction="zero"`` scores an empty ``pred`` with non-empty
    ``gt`` as 0 for all four metrics (the BCP convention).
    """
    _check_empty_prediction(empty_prediction)
    pred_b, gt_b = _as_binary_pair(pred, gt)
    sampling = _normalize_spacing(spacing, pred_b.ndim)
    dice, jaccard = _overlap_scores(pred_b, gt_b)
    pred_empty = not pred_b.any()
    gt_empty = not gt_b.any()
    if pred_empty and gt_empty:
        return {"dice": dice, "jaccard": jaccard, "hd95": 0.0, "asd": 0.0}
    if pred_empty and empty_prediction == "zero":
        return {"dice": 0.0, "jaccard": 0.0, "hd95": 0.0, "asd": 0.0}
    if pred_empty or gt_empty:
        return {"dice": dice, "jaccard": jaccard, "hd95": float("nan"), "asd": float("nan")}

    box = _padded_bbox(pred_b | gt_b, pad=1)
    pred_surface = _surface(pred_b[box])
    gt_surface = _surface(gt_b[box])
    d_pred_to_gt = _surface_distances(pred_surface, gt_surface, sampling)
    d_gt_to_pred = _surface_distances(gt_surface, pred_surface, sampling)
    hd95 = float(np.percentile(np.concatenate([d_pred_to_gt, d_gt_to_pred]), 95))
    asd = float(d_pred_to_gt.mean())
    return {"dice": dice, "jaccard": jaccard, "hd95": hd95, "asd": asd}


def _check_labels(labels: np.ndarray, num_classes: int, name: str) -> None:
    """Reject label maps with values that are not class ids, rather than silently ignoring them."""
    if labels.size == 0:
        return
    if not (np.issubdtype(labels.dtype, np.integer) or labels.dtype == bool):
        if not np.all(np.isfinite(labels)) or not np.all(labels == np.round(labels)):
            raise ValueError(f"{name} must hold integer class labels, got non-integer values")
    low, high = labels.min(), labels.max()
    if low < 0 or high >= num_classes:
        raise ValueError(
            f"{name} has label values in [{low}, {high}], outside [0, {num_classes}) "
            f"for num_classes={num_classes}"
        )


def multiclass_metrics(
    pred_labels: np.ndarray,
    gt_labels: np.ndarray,
    num_classes: int,
    spacing: Sequence[float] | None = None,
    empty_prediction: EmptyPrediction = "undefined",
) -> dict[int, dict[str, float | bool]]:
    """binary_metrics for every foreground class 1..num_classes-1 (label 0 is background).

    Each class's dict holds the four metrics plus ``"empty_prediction"``: True when that class is
    absent from the prediction but present in the ground truth (a fact, whichever
    ``empty_prediction`` convention scored it; see the module docstring).
    """
    _check_empty_prediction(empty_prediction)
    pred_arr = np.asarray(pred_labels)
    gt_arr = np.asarray(gt_labels)
    if pred_arr.shape != gt_arr.shape:
        raise ValueError(
            f"pred_labels and gt_labels must have the same shape, got {pred_arr.shape} and {gt_arr.shape}"
        )
    if int(num_classes) != num_classes or num_classes < 2:
        raise ValueError(
            f"num_classes must be an integer >= 2 (background + foreground), got {num_classes!r}"
        )
    _check_labels(pred_arr, num_classes, "pred_labels")
    _check_labels(gt_arr, num_classes, "gt_labels")
    per_class: dict[int, dict[str, float | bool]] = {}
    for c in range(1, int(num_classes)):
        pred_c, gt_c = pred_arr == c, gt_arr == c
        per_class[c] = {
            **binary_metrics(pred_c, gt_c, spacing, empty_prediction),
            EMPTY_PREDICTION_KEY: bool(gt_c.any() and not pred_c.any()),
        }
    return per_class


def _nan_stats(values: Sequence[float]) -> dict[str, float | int | None]:
    """Mean and population std over defined values, plus how many were undefined (NaN)."""
    arr = np.asarray(values, dtype=np.float64)
    defined = arr[~np.isnan(arr)]
    n_undefined = int(arr.size - defined.size)
    if defined.size == 0:
        return {"mean": None, "std": None, "n_undefined": n_undefined}
    return {"mean": float(defined.mean()), "std": float(defined.std(ddof=0)), "n_undefined": n_undefined}


def _nanmean_or_nan(values: Sequence[float]) -> float:
    """Mean over defined values, NaN if there are none (without numpy's empty-slice warning)."""
    arr = np.asarray(values, dtype=np.float64)
    defined = arr[~np.isnan(arr)]
    return float(defined.mean()) if defined.size else float("nan")


def _count_flag(flags: Sequence[bool | None]) -> int | None:
    """How many flags are True; None (unknown) if any case lacks the flag (hand-built per-case dicts)."""
    if any(flag is None for flag in flags):
        return None
    return sum(bool(flag) for flag in flags)


def summarize(per_case: list[dict[int, dict[str, float | bool]]], class_names: list[str]) -> dict:
    """Per-class and overall mean/std/n_undefined of each metric over cases, JSON-ready.

    ``per_case``: one :func:`multiclass_metrics` result per case. ``class_names``: all class names
    indexed by label value, index 0 being background (as ``SegmentationData.class_names``); one
    entry per foreground name is produced, plus ``"mean"``.

    Returns ``{name: {metric: {"mean", "std", "n_undefined"}, "n_empty_prediction": int}}``. NaNs are
    left out of mean and std (population std, ddof=0) and counted in ``n_undefined``; a statistic with
    no defined value is ``None``. For ``"mean"`` each case is first averaged over its foreground
    classes with defined values (NaN if none), then those per-case means are summarised the same way.

    ``n_empty_prediction`` counts the cases whose ``"empty_prediction"`` flag is set for that class
    (prediction empty, ground truth not); for ``"mean"``, the cases where it is set for at least one
    class. Those cases are in ``n_undefined`` of hd95/asd under the "undefined" convention and in the
    means (as 0) under "zero". It is ``None`` when some case has no flag (per-case dicts not made by
    :func:`multiclass_metrics`).
    """
    if not per_case:
        raise ValueError("summarize needs at least one case, got an empty list")
    if len(class_names) < 2:
        raise ValueError(
            f"class_names must list background and at least one foreground class, got {class_names}"
        )
    fg_names = list(class_names[1:])
    if MEAN_KEY in fg_names or len(set(fg_names)) != len(fg_names):
        raise ValueError(f"foreground class names must be unique and not {MEAN_KEY!r}, got {fg_names}")
    fg_ids = range(1, len(class_names))
    for i, case in enumerate(per_case):
        missing = [c for c in fg_ids if c not in case]
        if missing:
            raise ValueError(f"case {i} has no metrics for class ids {missing} (class_names: {class_names})")

    summary: dict = {}
    flags = [[case[c].get(EMPTY_PREDICTION_KEY) for c in fg_ids] for case in per_case]
    for index, (c, name) in enumerate(zip(fg_ids, fg_names, strict=True)):
        summary[name] = {m: _nan_stats([case[c][m] for case in per_case]) for m in METRIC_NAMES}
        summary[name]["n_empty_prediction"] = _count_flag([case_flags[index] for case_flags in flags])
    summary[MEAN_KEY] = {
        m: _nan_stats([_nanmean_or_nan([case[c][m] for c in fg_ids]) for case in per_case])
        for m in METRIC_NAMES
    }
    summary[MEAN_KEY]["n_empty_prediction"] = _count_flag(
        [None if None in case_flags else any(case_flags) for case_flags in flags]
    )
    return summary


def _cell(stats: dict, scale: float) -> str:
    """'mean ± std' with 2 decimals, or 'n/a' when nothing was defined."""
    if stats["mean"] is None:
        return "n/a"
    return f"{stats['mean'] * scale:.2f} ± {stats['std'] * scale:.2f}"


def format_table(summary: dict, class_names: list[str]) -> str:
    """Plain-text table of a :func:`summarize` result: one row per foreground class, then "mean".

    Dice and Jaccard are shown in percent; HD95 and ASD in spacing units. ``class_names`` is the same
    list given to :func:`summarize` (background first). A footnote lists undefined-distance counts.
    """
    columns = (
        ("Dice %", "dice", 100.0),
        ("Jaccard %", "jaccard", 100.0),
        ("HD95", "hd95", 1.0),
        ("ASD", "asd", 1.0),
    )
    row_names = [*class_names[1:], MEAN_KEY]
    header = ["class", *(title for title, _, _ in columns)]
    rows = [[name, *(_cell(summary[name][key], scale) for _, key, scale in columns)] for name in row_names]
    widths = [max(len(r[i]) for r in [header, *rows]) for i in range(len(header))]

    def fmt(cells: list[str]) -> str:
        padded = [
            cell.ljust(w) if i == 0 else cell.rjust(w)
            for i, (cell, w) in enumerate(zip(cells, widths, strict=True))
        ]
        return "  ".join(padded)

    lines = [fmt(header), "  ".join("-" * w for w in widths), *(fmt(r) for r in rows)]
    # HD95 and ASD are undefined together (exactly one mask empty), so one count per row suffices.
    notes = [
        f"  {name}: {summary[name]['hd95']['n_undefined']} case(s)"
        for name in row_names
        if summary[name]["hd95"]["n_undefined"]
    ]
    if notes:
        lines += ["", "HD95/ASD undefined (exactly one mask empty), left out of mean ± std:", *notes]
    return "\n".join(lines)
