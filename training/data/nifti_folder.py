"""A user's own data in the nnU-Net / Medical Segmentation Decathlon raw layout.

    root/imagesTr/<case>_0000.nii.gz (or <case>.nii.gz)   labelled images
    root/labelsTr/<case>.nii.gz                          their labels
    root/imagesUnlabelled/*.nii.gz                       optional unlabelled images
    root/imagesTs/, root/labelsTs/                       optional test set
    root/dataset.json                                    optional; class names from its "labels"

Volumes are read with SimpleITK, normalised per volume (the scheme is stored in the model metadata)
and cut into 2D slices along their through-plane axis. The last ``val_cases`` labelled cases (sorted by
name) are held out for validation.

A planned config (``mpcl-plan --config-out``: ``data.crop_to_nonzero``, ``data.slicing_axis``,
``data.target_spacing``, ``data.normalization: ct``) is applied here with the runtime's own functions
(``mpcl.inference.prepare_volume``, ``mpcl.planned_geometry``), so training sees what a deployed model
is given: each case is cropped to its image's non-zero box (found on the raw image, statistics measured
inside it), sliced across the planned axis, and each slice resampled to the target spacing (image
bilinear, label through its interpolated one-hot maps). At a target spacing the patch is a window, not
the whole slice: every slice is padded (with the case's lowest normalised value) to at least the patch
and cut into the same overlapping patch-sized windows inference uses, each window one training sample,
so the batch pipeline (seeded per iteration) and its augmentation are unchanged. Validation and test
volumes stay whole, normalised, on their own grid, carrying their plan and crop box
(``Volume.planned``), so validation segments them exactly as ``Segmenter`` does a new scan.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np

from mpcl.errors import InputError
from mpcl.inference import InferenceSettings, prepare_volume
from mpcl.inputs import case_name  # a file's case: name without image suffix and nnU-Net _0000 tag
from mpcl.io import ImageGeometry, read_image
from mpcl.planned_geometry import (
    PlannedGeometry,
    PlannedInput,
    box_slices,
    in_plane_spacing,
    resample_images,
    resample_labels,
    resampled_shape,
    training_windows,
    whole_box,
)
from mpcl.preprocessing import through_plane_axis
from mpcl.training.config_schema import DataConfig
from mpcl.training.data.base import SegmentationData, Slice2D, Volume

IMAGE_SUFFIXES = (".nii.gz", ".nii", ".nrrd", ".mha", ".mhd")


def image_files(folder: Path) -> dict[str, Path]:
    """Case name -> image file for every image in ``folder`` (sorted; empty if there is no folder)."""
    if not folder.is_dir():
        return {}
    return {case_name(p): p for p in sorted(folder.iterdir()) if p.name.endswith(IMAGE_SUFFIXES)}


def class_names_from_dataset_json(root: Path) -> list[str] | None:
    """Class names from nnU-Net v2 (``{"name": value}``) or MSD (``{"value": "name"}``) labels."""
    path = root / "dataset.json"
    if not path.is_file():
        return None
    try:
        labels = json.loads(path.read_text(encoding="utf-8")).get("labels", {})
    except (UnicodeDecodeError, json.JSONDecodeError) as error:
        raise InputError(f"{path}: not valid JSON ({error})") from None
    pairs = {}
    for key, value in labels.items():
        if str(key).isdigit():
            pairs[int(key)] = str(value)
        elif isinstance(value, int):
            pairs[value] = str(key)
    if sorted(pairs) != list(range(len(pairs))):
        raise InputError(f"{path}: label values {sorted(pairs)} are not 0..N-1")
    return [pairs[i] for i in range(len(pairs))] or None


def _same_geometry(a: ImageGeometry, b: ImageGeometry, shape_a, shape_b) -> bool:
    return (
        shape_a == shape_b
        and np.allclose(a.spacing, b.spacing, rtol=1e-4, atol=1e-5)
        and np.allclose(a.origin, b.origin, rtol=1e-4, atol=1e-3)
        and np.allclose(a.direction, b.direction, atol=1e-4)
    )


def planned_geometry(config: DataConfig) -> PlannedGeometry:
    """The plan's slicing axis, target spacing and cropping in a data config (all off by default)."""
    return PlannedGeometry(config.slicing_axis, config.target_spacing, config.crop_to_nonzero)


def normalization_of(config: DataConfig) -> dict[str, Any]:
    """The normalisation as the model metadata stores it: the scheme, and the ct scheme's statistics."""
    if config.normalization != "ct":
        return {"scheme": config.normalization}
    ct = config.ct_normalization
    return {
        "scheme": "ct",
        "clip_lower": ct.clip_lower,
        "clip_upper": ct.clip_upper,
        "mean": ct.mean,
        "std": ct.std,
    }


def read_case(
    image_path: Path,
    label_path: Path | None,
    num_classes: int,
    normalization: str | Mapping[str, Any],
    planned: PlannedGeometry | None = None,
) -> Volume:
    """Read, check and normalise one case; the label must share the image's grid exactly.

    ``normalization`` is a scheme name or ``{"scheme": ..., **params}``; with a ``planned`` crop, the
    statistics are measured inside the raw image's non-zero box, which the Volume keeps
    (``Volume.planned``) with the plan, exactly as ``mpcl.inference.prepare_volume`` does for a new scan.
    """
    if isinstance(normalization, str):
        normalization = {"scheme": normalization}
    planned = planned or PlannedGeometry()
    raw, geometry = read_image(image_path)
    settings = InferenceSettings((1, 1), normalization=dict(normalization), planned=planned)
    image, _, crop_box = prepare_volume(raw, settings)
    del raw
    label = None
    if label_path is not None:
        label_array, label_geometry = read_image(label_path)
        if not _same_geometry(geometry, label_geometry, image.shape, label_array.shape):
            raise InputError(
                f"{label_path}: geometry (size {label_array.shape[::-1]}, spacing {label_geometry.spacing}, "
                f"origin {label_geometry.origin}) does not match its image {image_path.name} "
                f"(size {image.shape[::-1]}, spacing {geometry.spacing}, origin {geometry.origin})"
            )
        if (
            np.any(label_array != np.round(label_array))
            or label_array.min() < 0
            or label_array.max() >= num_classes
        ):
            values = np.unique(label_array)[:10].tolist()
            raise InputError(
                f"{label_path}: label values {values} outside the class range 0..{num_classes - 1}"
            )
        label = label_array.astype(np.uint8)
    return Volume(
        case_name(image_path),
        image,
        label,
        geometry.spacing,
        geometry.origin,
        geometry.direction,
        PlannedInput(planned, crop_box) if planned.active else None,
    )


def volume_to_slices(
    volume: Volume, patch_size: tuple[int, int] | None = None, num_classes: int | None = None
) -> list[Slice2D]:
    """A volume's training slices: whole slices across its coarsest axis, or, for a planned volume, its
    crop box's slices across the planned axis (at a target spacing: the patch-sized windows of each
    resampled slice, which needs ``patch_size`` and ``num_classes``)."""
    if volume.planned is not None:
        return _planned_slices(volume, volume.planned, patch_size, num_classes)
    axis = through_plane_axis(volume.spacing)
    label = None if volume.label is None else np.moveaxis(volume.label, axis, 0)
    return _whole_slices(volume.name, np.moveaxis(volume.image, axis, 0), label)


def _whole_slices(name: str, image: np.ndarray, label: np.ndarray | None) -> list[Slice2D]:
    """One training slice per index of the first axis of (d, h, w) ``image`` (and ``label``)."""
    return [
        Slice2D(
            f"{name}_slice_{z}",
            np.ascontiguousarray(image[z]),
            None if label is None else np.ascontiguousarray(label[z]),
        )
        for z in range(image.shape[0])
    ]


def _planned_slices(
    volume: Volume,
    planned: PlannedInput,
    patch_size: tuple[int, int] | None,
    num_classes: int | None,
) -> list[Slice2D]:
    geometry = planned.geometry
    region = box_slices(planned.crop_box or whole_box(volume.image.shape))
    axis = geometry.axis_for(volume.spacing)
    image = np.moveaxis(volume.image[region], axis, 0)
    label = None if volume.label is None else np.moveaxis(volume.label[region], axis, 0)
    if geometry.target_spacing is None:  # whole (cropped) slices, zoomed to the patch by the augmentation
        return _whole_slices(volume.name, image, label)
    if patch_size is None or num_classes is None:
        raise ValueError("slices at a target spacing need the patch size and the number of classes")
    size = resampled_shape(image.shape[1:], in_plane_spacing(volume.spacing, axis), geometry.target_spacing)
    pad_value = float(image.min()) if image.size else 0.0  # as mpcl.inference pads a new scan's slices
    images = resample_images(image, size)
    labels = None if label is None else resample_labels(label, size, num_classes)
    slices = []
    for z in range(images.shape[0]):
        windows = training_windows(images[z], None if labels is None else labels[z], patch_size, pad_value)
        slices.extend(
            Slice2D(f"{volume.name}_slice_{z}_window_{w}", window_image, window_label)
            for w, (window_image, window_label) in enumerate(windows)
        )
    return slices


def load_nifti_folder(config: DataConfig) -> SegmentationData:
    root = Path(config.root or "")
    if not root.is_dir():
        raise InputError(f"{root}: data root does not exist (set data.root or pass --data-root)")
    class_names = list(config.class_names or class_names_from_dataset_json(root) or [])
    if len(class_names) < 2:
        raise InputError(
            f"{root}: class names unknown; set data.class_names or add dataset.json with 'labels'"
        )
    images = image_files(root / "imagesTr")
    labels = image_files(root / "labelsTr")
    if not images:
        raise InputError(f"{root / 'imagesTr'}: no images found (expected <case>_0000.nii.gz files)")
    missing = sorted(set(images) - set(labels))
    if missing:
        raise InputError(f"{root / 'labelsTr'}: no label for case(s) {missing[:5]}")
    cases = sorted(images)
    if len(cases) <= config.val_cases:
        raise InputError(
            f"{root / 'imagesTr'}: {len(cases)} labelled case(s) cannot leave "
            f"{config.val_cases} for validation"
        )
    train_cases, val_cases = cases[: len(cases) - config.val_cases], cases[len(cases) - config.val_cases :]
    n_labeled = len(train_cases) if config.labeled_cases is None else config.labeled_cases
    n_classes, normalization = len(class_names), normalization_of(config)
    planned, patch = planned_geometry(config), tuple(config.patch_size)

    def read(image: Path, label: Path | None) -> Volume:
        return read_case(image, label, n_classes, normalization, planned)

    def slices(volume: Volume) -> list[Slice2D]:
        return volume_to_slices(volume, patch, n_classes)

    labeled, unlabeled = [], []
    for position, case in enumerate(train_cases):
        is_labeled = position < n_labeled
        volume = read(images[case], labels[case] if is_labeled else None)
        (labeled if is_labeled else unlabeled).extend(slices(volume))
    for path in image_files(root / "imagesUnlabelled").values():
        unlabeled.extend(slices(read(path, None)))
    val = [read(images[c], labels[c]) for c in val_cases]
    test_images, test_labels = image_files(root / "imagesTs"), image_files(root / "labelsTs")
    test = [read(test_images[c], test_labels[c]) for c in sorted(test_images) if c in test_labels]
    return SegmentationData(labeled, unlabeled, val, test, class_names, normalization)
