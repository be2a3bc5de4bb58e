"""A user's own data in the nnU-Net / Medical Segmentation Decathlon raw layout.

    root/imagesTr/<case>_0000.nii.gz (or <case>.nii.gz)   labelled images
    root/labelsTr/<case>.nii.gz                          their labels
    root/imagesUnlabelled/*.nii.gz                       optional unlabelled images
    root/imagesTs/, root/labelsTs/                       optional test set
    root/dataset.json                                    optional; class names from its "labels"

Volumes are read with SimpleITK, normalised per volume (the scheme is stored in the model metadata)
and cut into 2D slices along their through-plane axis. The last ``val_cases`` labelled cases (sorted by
name) are held out for validation.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from mpcl.errors import InputError
from mpcl.inputs import case_name  # a file's case: name without image suffix and nnU-Net _0000 tag
from mpcl.io import ImageGeometry, read_image
from mpcl.preprocessing import normalize_intensity, through_plane_axis
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


def read_case(image_path: Path, label_path: Path | None, num_classes: int, scheme: str) -> Volume:
    """Read, check and normalise one case; the label must share the image's grid exactly."""
    image, geometry = read_image(image_path)
    image = normalize_intensity(image, scheme)
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
    return Volume(case_name(image_path), image, label, geometry.spacing, geometry.origin, geometry.direction)


def volume_to_slices(volume: Volume) -> list[Slice2D]:
    axis = through_plane_axis(volume.spacing)
    image = np.moveaxis(volume.image, axis, 0)
    label = None if volume.label is None else np.moveaxis(volume.label, axis, 0)
    return [
        Slice2D(
            f"{volume.name}_slice_{z}",
            np.ascontiguousarray(image[z]),
            None if label is None else np.ascontiguousarray(label[z]),
        )
        for z in range(image.shape[0])
    ]


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
    n_classes, scheme = len(class_names), config.normalization
    labeled, unlabeled = [], []
    for position, case in enumerate(train_cases):
        is_labeled = position < n_labeled
        volume = read_case(images[case], labels[case] if is_labeled else None, n_classes, scheme)
        (labeled if is_labeled else unlabeled).extend(volume_to_slices(volume))
    for path in image_files(root / "imagesUnlabelled").values():
        unlabeled.extend(volume_to_slices(read_case(path, None, n_classes, scheme)))
    val = [read_case(images[c], labels[c], n_classes, scheme) for c in val_cases]
    test_images, test_labels = image_files(root / "imagesTs"), image_files(root / "labelsTs")
    test = [
        read_case(test_images[c], test_labels[c], n_classes, scheme)
        for c in sorted(test_images)
        if c in test_labels
    ]
    return SegmentationData(labeled, unlabeled, val, test, class_names, {"scheme": scheme})
