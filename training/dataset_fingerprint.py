"""The dataset fingerprint: what ``mpcl-plan`` measures in every labelled case before it decides anything.

Per case: array shape, spacing, origin, direction and orientation code, which array axis is the coarsest
(and whether that is a tie), the acquisition plane that implies, the axis mpcl-train slices along today,
the bounding box of the non-zero region and the shape after cropping to it, intensity statistics inside
the foreground (label > 0: mean, std, min, max, 0.5/50/99.5 percentiles) and voxel counts and volumes per
class. Over the dataset: medians and ranges of spacing and shape, how often each axis is the coarsest,
orientations, and foreground intensity statistics pooled over cases — the mean and std exactly (per-case
moments merged), the percentiles from up to ``FOREGROUND_SAMPLES_PER_CASE`` voxels drawn per case with a
fixed seed (exact whenever no case has more foreground voxels than that).

Array axes are named z, y, x (0, 1, 2 of a SimpleITK (z, y, x) array); spacings are stored in both the
SimpleITK (x, y, z) order and the array order.
"""

from __future__ import annotations

import logging
from collections import Counter
from pathlib import Path

import numpy as np

from mpcl.errors import InputError
from mpcl.planned_geometry import nonzero_box as runtime_nonzero_box
from mpcl.preprocessing import through_plane_axis
from mpcl.training.dataset_layout import (
    AXIS_NAMES,
    CaseData,
    check_case,
    image_files,
    orientation_code,
    pair_cases,
    plane_across,
    read_dataset_json,
    relative,
)

log = logging.getLogger("mpcl.plan")

FOREGROUND_SAMPLES_PER_CASE = 10_000
PERCENTILES = (0.5, 50.0, 99.5)
# Spacings within 1 % of the coarsest count as equally coarse (a tie).
TIE_TOLERANCE = 0.01
SAMPLING_SEED = 1234
BLOCKING_TOPICS = ("json", "labels", "channels", "missing:labels")


def _percentile_key(q: float) -> str:
    return f"percentile_{q:04.1f}".replace(".", "_")  # 0.5 -> percentile_00_5, 99.5 -> percentile_99_5


def coarsest_axes(spacing_zyx, tolerance: float = TIE_TOLERANCE) -> list[int]:
    """Array axes whose spacing is within ``tolerance`` (relative) of the coarsest one."""
    spacing = np.asarray(spacing_zyx, dtype=np.float64)
    return [int(axis) for axis in np.flatnonzero(spacing >= spacing.max() * (1 - tolerance))]


def nonzero_box(image: np.ndarray) -> list[list[int]]:
    """[start, stop) per array axis of the region where the image is non-zero (the whole volume if none):
    the runtime's box (``mpcl.planned_geometry``), the one training and ``Segmenter`` crop to."""
    return [list(pair) for pair in runtime_nonzero_box(image)]


def _intensity_stats(values: np.ndarray) -> dict:
    if values.size == 0:
        return {"voxels": 0, "mean": None, "std": None, "min": None, "max": None} | {
            _percentile_key(q): None for q in PERCENTILES
        }
    values64 = values.astype(np.float64)
    stats = {
        "voxels": int(values.size),
        "mean": float(values64.mean()),
        "std": float(values64.std()),
        "min": float(values64.min()),
        "max": float(values64.max()),
    }
    for q, value in zip(PERCENTILES, np.percentile(values64, PERCENTILES), strict=True):
        stats[_percentile_key(q)] = float(value)
    return stats


def case_fingerprint(
    data: CaseData, num_classes: int, rng: np.random.Generator
) -> tuple[dict, np.ndarray, tuple[int, float, float]]:
    """One case's fingerprint, a sample of its foreground intensities, and the foreground's (count, mean,
    sum of squared deviations) for pooling."""
    geometry = data.geometry
    spacing_xyz = tuple(float(s) for s in geometry.spacing)
    spacing_zyx = spacing_xyz[::-1]
    tied = coarsest_axes(spacing_zyx)
    box = nonzero_box(data.image)
    label = data.label
    foreground = data.image[label > 0] if label is not None else np.empty(0, np.float32)
    counts = np.bincount(label.ravel(), minlength=num_classes) if label is not None else np.zeros(num_classes)
    voxel_mm3 = float(np.prod(spacing_xyz))
    if foreground.size > FOREGROUND_SAMPLES_PER_CASE:
        sample = rng.choice(foreground, FOREGROUND_SAMPLES_PER_CASE, replace=False)
    else:
        sample = foreground
    values64 = foreground.astype(np.float64)
    moments = (
        int(values64.size),
        float(values64.mean()) if values64.size else 0.0,
        float(values64.var() * values64.size) if values64.size else 0.0,
    )
    fingerprint = {
        "case": data.name,
        "shape_zyx": [int(n) for n in data.image.shape],
        "spacing_xyz": list(spacing_xyz),
        "spacing_zyx": list(spacing_zyx),
        "origin_xyz": [float(v) for v in geometry.origin],
        "direction": [float(v) for v in geometry.direction],
        "orientation": orientation_code(geometry.direction),
        "coarsest_axes": tied,
        "coarsest_axis": tied[0] if len(tied) == 1 else None,
        "acquisition_plane": plane_across(tied[0], geometry.direction) if len(tied) == 1 else None,
        "training_slicing_axis": through_plane_axis(spacing_xyz),
        "nonzero_box_zyx": box,
        "cropped_shape_zyx": [stop - start for start, stop in box],
        "foreground_intensity": _intensity_stats(foreground),
        "label_voxels": {str(c): int(n) for c, n in enumerate(counts)},
        "label_volumes_mm3": {str(c): float(n) * voxel_mm3 for c, n in enumerate(counts)},
    }
    return fingerprint, sample, moments


def _progress(items: list, show: bool):
    if not show:
        return items
    from tqdm import tqdm

    return tqdm(items, desc="fingerprint", unit="case", leave=False)


def _median(values) -> list[float]:
    return [float(v) for v in np.median(np.asarray(values, dtype=np.float64), axis=0)]


def dataset_fingerprint(root: str | Path, progress: bool = True) -> dict:
    """Read every labelled case of ``root`` (nnU-Net v2 layout) and measure it.

    The first defect stops with one sentence naming the file (``mpcl-plan --verify`` lists them all)."""
    root = Path(root)
    if not root.is_dir():
        raise InputError(f"{root}: dataset folder does not exist")
    description = read_dataset_json(root)
    # Planning needs the classes and a single channel; a missing numTraining or file_ending does not stop
    # it (--verify reports those).
    blocking = [p for p in description.problems if p.topic in BLOCKING_TOPICS]
    if blocking:
        raise InputError(
            f"{root / 'dataset.json'}: {blocking[0].message} (mpcl-plan --verify lists every problem)"
        )
    cases, pairing = pair_cases(root, "imagesTr", "labelsTr", description.file_ending)
    unlabelled, _ = image_files(root / "imagesUnlabelled", root, description.file_ending)
    pairing = [p for p in pairing if p.severity == "defect"]
    if pairing:
        raise InputError(
            f"{root / pairing[0].file}: {pairing[0].message} (mpcl-plan --verify lists every problem)"
        )
    if not cases:
        raise InputError(f"{root / 'imagesTr'}: no images found (expected <case>_0000.nii.gz files)")
    num_classes = len(description.class_names)
    rng = np.random.default_rng(SAMPLING_SEED)
    per_case, samples = [], []
    total_count, total_mean, total_m2 = 0, 0.0, 0.0
    log.info("fingerprinting %d labelled case(s) in %s", len(cases), root)
    for case in _progress(cases, progress):
        data, problems = check_case(case, root, num_classes)
        defects = [p for p in problems if p.severity == "defect"]
        if data is None or defects:
            first = defects[0]
            raise InputError(f"{root / first.file}: {first.message} (mpcl-plan --verify lists every problem)")
        fingerprint, sample, (count, mean, m2) = case_fingerprint(data, num_classes, rng)
        fingerprint["image"] = relative(case.image, root)
        fingerprint["label"] = relative(case.label, root)
        per_case.append(fingerprint)
        samples.append(sample)
        if count:  # pooled mean and variance, merged case by case (Chan et al.), no cancellation
            delta, merged = mean - total_mean, total_count + count
            total_mean += delta * count / merged
            total_m2 += m2 + delta * delta * total_count * count / merged
            total_count = merged
    pooled = np.concatenate(samples) if samples else np.empty(0, np.float32)
    intensity = _intensity_stats(pooled)
    intensity["voxels"] = total_count
    intensity["sampled_voxels"] = int(pooled.size)
    if total_count:
        intensity["mean"] = total_mean
        intensity["std"] = float(np.sqrt(total_m2 / total_count))
        with_foreground = [c["foreground_intensity"] for c in per_case if c["foreground_intensity"]["voxels"]]
        intensity["min"] = min(stats["min"] for stats in with_foreground)
        intensity["max"] = max(stats["max"] for stats in with_foreground)
    coarsest = Counter(
        AXIS_NAMES[c["coarsest_axis"]] if c["coarsest_axis"] is not None else "tie" for c in per_case
    )
    spacings = [c["spacing_zyx"] for c in per_case]
    shapes = [c["shape_zyx"] for c in per_case]
    label_totals = {str(k): sum(c["label_voxels"][str(k)] for c in per_case) for k in range(num_classes)}
    return {
        "root": str(root.resolve()),
        "cases": len(per_case),
        "unlabelled_images": len(unlabelled),  # imagesUnlabelled/, counted, not fingerprinted
        "class_names": description.class_names,
        "channel_names": description.channel_names,
        "axes": "array axes z, y, x = 0, 1, 2 (SimpleITK order); spacing_xyz is SimpleITK's (x, y, z)",
        "spacing_median_zyx": _median(spacings),
        "spacing_min_zyx": [float(v) for v in np.min(spacings, axis=0)],
        "spacing_max_zyx": [float(v) for v in np.max(spacings, axis=0)],
        "shape_median_zyx": _median(shapes),
        "cropped_shape_median_zyx": _median([c["cropped_shape_zyx"] for c in per_case]),
        "coarsest_axis_counts": {name: coarsest.get(name, 0) for name in (*AXIS_NAMES, "tie")},
        "orientation_counts": dict(Counter(c["orientation"] for c in per_case).most_common()),
        "foreground_intensity": intensity,
        "label_voxels": label_totals,
        "cases_with_class": {
            str(k): sum(1 for c in per_case if c["label_voxels"][str(k)] > 0) for k in range(num_classes)
        },
        "per_case": per_case,
    }
