"""From a dataset fingerprint to a plan, as nnU-Net's experiment planner does for its 2D configuration.

Decided from the data (each decision written with the reason into ``plans.json``):

* **slicing axis**: the array axis with the coarsest median spacing. Spacings within 1 % are a tie; a tie
  is resolved by the most common acquisition plane — the candidate that is the single coarsest axis in
  the most cases — and, if no case settles it (isotropic data), by the plane most scans are acquired in,
  axial (from each case's direction matrix), then by the first array axis as mpcl-train itself does;
* **in-plane target spacing**: the dataset median along the two in-plane axes (the through-plane spacing
  is kept per case, as a 2D network never mixes slices); images are resampled bilinearly and labels
  through their interpolated one-hot maps, corner-aligned like every resize of the runtime;
* **cropping** to the non-zero region of each image;
* **patch size**: the median in-plane extent after cropping, at the target spacing, rounded up to a
  multiple of 16 (the U-Net halves it four times), at least 32, and capped by the preset;
* **normalisation** by modality from dataset.json's ``channel_names``: CT is clipped to the 0.5-99.5
  percentiles of the foreground intensities and z-scored with the dataset's foreground mean and std;
  ``noNorm`` is left alone; ``rescale_to_0_1`` is min-max; MR and everything else is z-scored per case;
* **batch sizes and iterations**: the preset's reference batch is scaled by the reference patch's pixel
  count over the planned one (even, 2 to twice the reference, equal labelled and unlabelled halves, as
  copy-paste methods need), and the iterations keep the pixels processed, i.e. the run time, about the
  preset's where the batch could not (at most halved or doubled).

Every decision has a config key (``data.slicing_axis``, ``data.target_spacing``, ``data.crop_to_nonzero``,
``data.normalization`` with ``data.ct_normalization``, ``data.patch_size``, the batch and iteration keys;
``evaluation.resize: linear``, the interpolation the resampling uses), which ``--config-out`` writes and
mpcl-train, the checkpoint, the model package and ``Segmenter`` apply (``mpcl.planned_geometry``). Each
section of the plan says ``applied_by_training`` and its config key; anything a config could not carry
would be listed by :func:`not_applied` and in the summary.
"""

from __future__ import annotations

import copy
import math
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from mpcl.errors import ConfigError, InputError
from mpcl.training.dataset_fingerprint import coarsest_axes
from mpcl.training.dataset_layout import AXIS_NAMES, plane_across

PLANS_FORMAT = "mpcl-plans"
PLANS_VERSION = 1
PATCH_MULTIPLE = 16
MIN_PATCH = 32
SPACING_MATCH = 0.01  # a case's in-plane spacing within 1 % of the target needs no resampling


@dataclass(frozen=True)
class Preset:
    """A compute budget: the largest patch side and a reference run the batch and iterations scale from."""

    name: str
    max_side: int
    reference_patch: int
    reference_batch: int
    reference_iterations: int
    description: str


PRESETS = {
    "cpu": Preset("cpu", 256, 128, 8, 1500, "a few CPU cores: 8 + 8 slices of 128² for 1500 iterations"),
    "gpu": Preset("gpu", 512, 256, 12, 30000, "one GPU: 12 + 12 slices of 256² for 30 000 iterations"),
}


def _fmt(values, digits: int = 3) -> str:
    return " x ".join(f"{float(v):.{digits}g}" for v in values)


def choose_slicing_axis(fingerprint: dict) -> dict:
    """The array axis 2D slices are cut across, how it was decided, and how mpcl-train's own choice
    (each case's coarsest axis, ties to z) compares."""
    cases = fingerprint["per_case"]
    n = len(cases)
    median = fingerprint["spacing_median_zyx"]
    candidates = coarsest_axes(median)
    thick = Counter(c["coarsest_axis"] for c in cases if c["coarsest_axis"] is not None)
    tie = None
    if len(candidates) == 1:
        axis = candidates[0]
        others = ", ".join(f"{AXIS_NAMES[a]} {median[a]:.3g}" for a in range(3) if a != axis)
        rule = f"coarsest median spacing ({AXIS_NAMES[axis]} {median[axis]:.3g} mm against {others} mm)"
    else:
        names = "/".join(AXIS_NAMES[a] for a in candidates)
        counts = ", ".join(f"{AXIS_NAMES[a]} in {thick.get(a, 0)}" for a in candidates)
        best = max(thick.get(a, 0) for a in candidates)
        leaders = [a for a in candidates if thick.get(a, 0) == best]
        if best > 0 and len(leaders) == 1:
            axis = leaders[0]
            resolved = (
                f"the most common acquisition plane: {AXIS_NAMES[axis]} is the single coarsest axis of "
                f"{best} of {n} case(s) ({counts})"
            )
        else:
            axial = {a: sum(plane_across(a, c["direction"]) == "axial" for c in cases) for a in leaders}
            most = max(axial.values())
            top = [a for a in leaders if axial[a] == most]
            axis = top[0]
            resolved = (
                f"no case settles it ({counts}), so the most common acquisition plane in medical imaging, "
                f"axial, decides: slices across {AXIS_NAMES[axis]} are axial in {most} of {n} case(s)"
            )
            if len(top) > 1:
                resolved += "; still tied, so the first array axis, as mpcl-train does"
        tie = {
            "axes": [AXIS_NAMES[a] for a in candidates],
            "median_spacing_mm": [float(median[a]) for a in candidates],
            "resolved_by": resolved,
        }
        rule = f"tie between axes {names} (median spacing {median[candidates[0]]:.3g} mm); {resolved}"
    differs = [c["case"] for c in cases if c["training_slicing_axis"] != axis]
    return {
        "axis": int(axis),
        "name": AXIS_NAMES[axis],
        "rule": rule,
        "tie": tie,
        "cases_coarsest_along_it": int(thick.get(axis, 0)),
        "cases_with_tied_spacing": sum(1 for c in cases if c["coarsest_axis"] is None),
        "cases": n,
        "planes": dict(Counter(plane_across(axis, c["direction"]) for c in cases).most_common()),
        # without data.slicing_axis, mpcl-train would slice these across their own coarsest axis (ties: z)
        "unplanned_slices_otherwise": differs,
        "config_key": "data.slicing_axis",
        "applied_by_training": True,
    }


def _normalisation(fingerprint: dict) -> dict:
    channels = fingerprint.get("channel_names") or {}
    modality = channels.get("0")
    key = (modality or "").strip().lower()
    if key == "ct":
        stats = fingerprint["foreground_intensity"]
        if not stats["voxels"]:
            raise InputError(
                f"{fingerprint['root']}: no foreground (label > 0) voxel in any case, so CT intensity "
                "statistics cannot be measured"
            )
        lower, upper = stats["percentile_00_5"], stats["percentile_99_5"]
        mean, std = stats["mean"], max(stats["std"], 1e-8)
        return {
            "modality": modality,
            "scheme": "ct",
            "rule": (
                f"CT: clip to the foreground 0.5-99.5 percentiles [{lower:.4g}, {upper:.4g}], then z-score "
                f"with the dataset's foreground mean {mean:.4g} and std {std:.4g}"
            ),
            "clip": [lower, upper],
            "mean": mean,
            "std": std,
            # mpcl.preprocessing.NormalizationAffine: (clip(x, lower, upper) - offset) / divisor
            "affine": [lower, upper, mean, std],
            "config_value": "ct",
            "config_statistics": {"clip_lower": lower, "clip_upper": upper, "mean": mean, "std": std},
            "applied_by_training": True,
        }
    if key in ("nonorm", "none"):
        scheme, rule = "none", f"{modality}: intensities left as they are"
    elif key in ("rescale_to_0_1", "rgb_to_0_1"):
        scheme, rule = "minmax", f"{modality}: rescaled to [0, 1] per case (inside its non-zero crop box)"
    else:
        described = modality if modality else "no channel_names in dataset.json, so treated as MR"
        scheme, rule = "zscore", f"{described}: z-score per case (mean 0, std 1 inside its non-zero crop box)"
    return {
        "modality": modality,
        "scheme": scheme,
        "rule": rule,
        "config_value": scheme,
        "applied_by_training": True,
    }


def _batches(patch: tuple[int, int], preset: Preset) -> dict:
    pixels = patch[0] * patch[1]
    reference_pixels = preset.reference_patch**2
    raw = preset.reference_batch * reference_pixels / pixels
    batch = int(min(2 * preset.reference_batch, max(2, 2 * math.floor(raw / 2))))  # round down: memory
    work = preset.reference_batch * reference_pixels / (batch * pixels)
    iterations = max(50, int(round(preset.reference_iterations * min(2.0, max(0.5, work)) / 50) * 50))
    val_every = max(10, int(round(iterations / 10 / 10)) * 10)
    return {
        "labeled_batch": batch,
        "unlabeled_batch": batch,
        "iterations": iterations,
        "val_every": val_every,
        "checkpoint_every": max(val_every, iterations // 5),
        "rule": (
            f"{preset.name} preset ({preset.description}) scaled to {patch[0]}x{patch[1]}: batch "
            f"{preset.reference_batch} x {preset.reference_patch}² / {pixels} px ≈ {raw:.3g} -> {batch} "
            f"(even, 2..{2 * preset.reference_batch}); iterations keep the pixels processed "
            f"(within x0.5..x2) -> {iterations}"
        ),
    }


def make_plan(fingerprint: dict, preset: str = "cpu") -> dict:
    """The plan for ``fingerprint`` (from :func:`dataset_fingerprint`) under a budget preset."""
    if preset not in PRESETS:
        raise ConfigError(f"preset {preset!r} is unknown; choose one of {sorted(PRESETS)}")
    budget = PRESETS[preset]
    cases = fingerprint["per_case"]
    if len(cases) < 2:
        raise InputError(
            f"{fingerprint['root']}: {len(cases)} labelled case(s); at least 2 are needed (one is held "
            "out for validation)"
        )
    slicing = choose_slicing_axis(fingerprint)
    in_plane = [a for a in range(3) if a != slicing["axis"]]
    median = fingerprint["spacing_median_zyx"]
    target = [float(median[a]) for a in in_plane]
    off_target = [
        c["case"]
        for c in cases
        if any(
            abs(c["spacing_zyx"][a] - t) > SPACING_MATCH * t for a, t in zip(in_plane, target, strict=True)
        )
    ]
    extents = np.median(
        [
            [
                c["cropped_shape_zyx"][a] * c["spacing_zyx"][a] / t
                for a, t in zip(in_plane, target, strict=True)
            ]
            for c in cases
        ],
        axis=0,
    )
    wanted = [max(MIN_PATCH, PATCH_MULTIPLE * math.ceil(e / PATCH_MULTIPLE - 1e-9)) for e in extents]
    patch = tuple(min(side, budget.max_side) for side in wanted)
    capped = [w > p for w, p in zip(wanted, patch, strict=True)]
    shapes = np.array([c["shape_zyx"] for c in cases], dtype=np.float64)
    cropped = np.array([c["cropped_shape_zyx"] for c in cases], dtype=np.float64)
    n_cropped = int(np.sum(np.any(cropped < shapes, axis=1)))
    batches = _batches(patch, budget)
    normalisation = _normalisation(fingerprint)
    val_cases = min(len(cases) - 1, max(1, round(0.2 * len(cases))))
    in_plane_names = [AXIS_NAMES[a] for a in in_plane]
    plan = {
        "preset": preset,
        "slicing_axis": slicing,
        "resampling": {
            "in_plane_axes": in_plane_names,
            "target_spacing_mm": target,
            "target_spacing_zyx": [None if a == slicing["axis"] else float(median[a]) for a in range(3)],
            "rule": f"dataset median in-plane spacing ({_fmt(target)} mm along {'/'.join(in_plane_names)}); "
            "the through-plane spacing is kept per case",
            "image": "bilinear, corner-aligned (evaluation.resize: linear)",
            "label": "bilinear interpolation of one-hot maps, then argmax",
            "windows": "the patch is a window at the target spacing: smaller slices are padded, larger ones "
            "cut into overlapping windows (training samples; at inference their probabilities are averaged)",
            "cases_off_target": off_target,
            "config_key": "data.target_spacing",
            "applied_by_training": True,
        },
        "cropping": {
            "to": "non-zero region of the image",
            "median_shape_zyx": fingerprint["shape_median_zyx"],
            "median_cropped_shape_zyx": fingerprint["cropped_shape_median_zyx"],
            "median_fraction_kept": float(np.median(np.prod(cropped, axis=1) / np.prod(shapes, axis=1))),
            "cases_cropped": n_cropped,
            "config_key": "data.crop_to_nonzero",
            "applied_by_training": True,
        },
        "patch_size": {
            "size": list(patch),
            "axes": in_plane_names,
            "median_extent_px": [float(e) for e in extents],
            "covers_median_extent": not any(capped),
            "rule": (
                f"median in-plane extent {_fmt(extents, 4)} px after cropping, at the target spacing, "
                f"rounded up to multiples of {PATCH_MULTIPLE}"
                + (
                    f" ({wanted[0]}x{wanted[1]}), capped at {budget.max_side} by the {preset} preset"
                    if any(capped)
                    else ""
                )
            ),
        },
        "normalization": normalisation,
        "batches": batches,
        "val_cases": val_cases,
        "training_cases": len(cases) - val_cases,
        "unlabelled_images": int(fingerprint.get("unlabelled_images", 0)),
    }
    plan["config_keys"] = {
        "data.slicing_axis": slicing["name"],
        "data.target_spacing": target,
        "data.crop_to_nonzero": True,
        "data.patch_size": list(patch),
        "data.normalization": normalisation["config_value"],
        **(
            {"data.ct_normalization": normalisation["config_statistics"]}
            if "config_statistics" in normalisation
            else {}
        ),
        "data.val_cases": val_cases,
        "evaluation.resize": "linear",
        "train.iterations": batches["iterations"],
        "train.labeled_batch": batches["labeled_batch"],
        "train.unlabeled_batch": batches["unlabeled_batch"],
        "train.val_every": batches["val_every"],
        "train.checkpoint_every": batches["checkpoint_every"],
    }
    plan["not_applied_by_training"] = not_applied(plan)
    return plan


def not_applied(plan: dict) -> list[str]:
    """Sentences for the planned decisions mpcl-train would not apply (a section whose
    ``applied_by_training`` is false); every decision has a config key now, so this is normally empty."""
    names = {
        "slicing_axis": "slicing axis",
        "resampling": "in-plane resampling",
        "cropping": "cropping",
        "normalization": "normalisation",
    }
    return [
        f"{label}: {plan[key].get('rule', 'planned')}"
        for key, label in names.items()
        if not plan[key].get("applied_by_training", True)
    ]


def plans_document(fingerprint: dict, plan: dict) -> dict:
    """What plans.json holds: format tag, the plan, and the fingerprint it came from."""
    return {
        "format": PLANS_FORMAT,
        "version": PLANS_VERSION,
        "dataset": fingerprint["root"],
        "plan": plan,
        "fingerprint": fingerprint,
    }


def _has_unlabelled(plan: dict, labeled_cases: int | None) -> bool:
    partly = labeled_cases is not None and labeled_cases < plan["training_cases"]
    return plan["unlabelled_images"] > 0 or partly


def config_from_plan(
    plan: dict,
    dataset_root: str | Path,
    method: str | None = None,
    base: dict | None = None,
    labeled_cases: int | None = None,
) -> dict:
    """A ready-to-run mpcl-train config (plain mapping) with the planned values in their config keys.

    ``base`` (a parsed config) keeps its model, augmentation, method and other train keys; its data
    section is replaced. ``method`` names the method when there is no base or replaces the base's; by
    default it is mean_teacher when there are unlabelled images (imagesUnlabelled/, or training cases
    beyond ``labeled_cases``) and supervised when there are none. A semi-supervised method without
    unlabelled images is refused, as mpcl-train would refuse it after loading the data."""
    base = copy.deepcopy(base or {})
    if not isinstance(base, dict):
        raise ConfigError(f"the base config must be a mapping of config sections, got {type(base).__name__}")
    if labeled_cases is not None and labeled_cases < 1:
        raise ConfigError(f"--labeled-cases must be at least 1, got {labeled_cases}")
    name = Path(dataset_root).resolve().name
    unlabelled = _has_unlabelled(plan, labeled_cases)
    if method is not None or "method" not in base:
        base["method"] = {"name": method or ("mean_teacher" if unlabelled else "supervised"), "params": {}}
    method_name = base["method"].get("name", "method") if isinstance(base["method"], dict) else "method"
    if not unlabelled:
        from mpcl.training.methods import method_class

        if method_class(str(method_name)).uses_unlabeled:
            raise ConfigError(
                f"method {method_name} learns from unlabelled images, but {dataset_root} has no "
                f"imagesUnlabelled/ and all {plan['training_cases']} training case(s) are labelled; add "
                "unlabelled images, pass --labeled-cases N (fewer than that) or use --method supervised"
            )
    config: dict = {"experiment": f"{name}_{method_name}", "output_dir": f"runs/{name}_{method_name}"}
    for key, value in base.items():
        if key not in ("experiment", "output_dir", "data", "train", "method"):
            config[key] = value
    keys = plan["config_keys"]
    config["data"] = {
        "kind": "nifti_folder",
        "root": str(Path(dataset_root).resolve()),
        **({} if labeled_cases is None else {"labeled_cases": labeled_cases}),
    }
    config["train"] = dict(base.get("train") or {})
    config["evaluation"] = dict(base.get("evaluation") or {})
    for dotted, value in keys.items():
        section, key = dotted.split(".", 1)
        config[section][key] = copy.deepcopy(value)
    config["method"] = base["method"]
    return config


def config_header(plan: dict, dataset_root: str | Path, plans_path: str | Path) -> str:
    """Comment lines for the top of the YAML config: where the values came from, what is not applied."""
    lines = [
        f"Written by mpcl-plan from {Path(dataset_root).resolve()} (preset {plan['preset']});",
        f"the plan and its reasons are in {plans_path}.",
        "Planned values set here (edit any of them; mpcl-plan does not read this file back); mpcl-train,",
        "the checkpoint, the model package and Segmenter apply them:",
        *(f"  {key}: {value}" for key, value in plan["config_keys"].items()),
    ]
    if plan["not_applied_by_training"]:
        lines += [
            "Planned but not applied by mpcl-train:",
            *(f"  - {note}" for note in plan["not_applied_by_training"]),
        ]
    return "".join(f"# {line}\n" for line in lines)


def summary_lines(fingerprint: dict, plan: dict) -> list[str]:
    """The plan as a person reads it, one decision a line, with what training does not apply yet."""
    classes = ", ".join(fingerprint["class_names"])
    channels = fingerprint.get("channel_names") or {}
    slicing, resampling, crop = plan["slicing_axis"], plan["resampling"], plan["cropping"]
    patch, norm, batches = plan["patch_size"], plan["normalization"], plan["batches"]
    median = fingerprint["spacing_median_zyx"]
    lines = [
        f"Dataset {fingerprint['root']}: {fingerprint['cases']} labelled case(s), "
        f"{plan['unlabelled_images']} unlabelled image(s), classes {classes}, "
        f"channel 0: {channels.get('0', 'not named')}",
        f"  median spacing z/y/x {_fmt(median)} mm, median shape z/y/x "
        f"{_fmt(fingerprint['shape_median_zyx'], 4)}, orientations {fingerprint['orientation_counts']}",
        f"Slicing axis   {slicing['name']} ({slicing['rule']}); coarsest in "
        f"{slicing['cases_coarsest_along_it']} of {slicing['cases']} case(s), "
        f"{slicing['cases_with_tied_spacing']} with tied spacing",
        f"Target spacing {_fmt(resampling['target_spacing_mm'])} mm in-plane "
        f"({'/'.join(resampling['in_plane_axes'])}, dataset median)",
        f"Cropping       to the non-zero region: median shape {_fmt(crop['median_shape_zyx'], 4)} -> "
        f"{_fmt(crop['median_cropped_shape_zyx'], 4)} ({crop['cases_cropped']} case(s) shrink)",
        f"Patch size     {patch['size'][0]}x{patch['size'][1]} ({patch['rule']})",
        f"Normalisation  {norm['rule']}",
        f"Batches        {batches['labeled_batch']} labelled + {batches['unlabeled_batch']} unlabelled, "
        f"{batches['iterations']} iterations, validation every {batches['val_every']} "
        f"({plan['val_cases']} case(s) held out)",
        "In the config:  " + ", ".join(f"{k}={v}" for k, v in plan["config_keys"].items()),
    ]
    if plan["not_applied_by_training"]:
        lines += [
            "Not applied by training (recorded in plans.json only):",
            *(f"  - {note}" for note in plan["not_applied_by_training"]),
        ]
    else:
        lines.append(
            "Applied by training: every planned value above (crop, slicing axis, target spacing, "
            "normalisation, patch), and by the model package and Segmenter on new scans"
        )
    return lines
