"""A raw dataset in the nnU-Net v2 layout as ``mpcl-plan`` sees it, read the way ``mpcl-train`` reads it.

    root/dataset.json             channel_names, labels, numTraining, file_ending
    root/imagesTr/<case>_0000.nii.gz   (or <case>.nii.gz)
    root/labelsTr/<case>.nii.gz
    root/imagesUnlabelled/, imagesTs/, labelsTs/   optional

Nothing here raises on a defect of the data: every check returns :class:`Problem` rows (file, sentence),
so ``mpcl-plan --verify`` can list all of them at once and the fingerprint can stop at the first. File
names are matched to cases exactly as :mod:`mpcl.training.data.nifti_folder` does (image suffixes, a
``_0000`` channel suffix dropped), so what passes here is what training reads.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import SimpleITK as sitk

from mpcl.errors import InputError
from mpcl.io import ImageGeometry, read_image
from mpcl.training.data.nifti_folder import IMAGE_SUFFIXES, case_name

# Same tolerances as nifti_folder's label/image check: beyond them mpcl-train refuses the pair.
SPACING_TOLERANCE = {"rtol": 1e-4, "atol": 1e-5}
ORIGIN_TOLERANCE = {"rtol": 1e-4, "atol": 1e-3}
DIRECTION_TOLERANCE = {"rtol": 0.0, "atol": 1e-4}
# A voxel spacing outside this range (mm) is a broken or unit-less header rather than a real scan.
PLAUSIBLE_SPACING_MM = (1e-3, 100.0)
AXIS_NAMES = ("z", "y", "x")  # array axes 0, 1, 2 of a (z, y, x) SimpleITK array
PLANES = ("sagittal", "coronal", "axial")  # slices cut across patient L-R, A-P, S-I
REQUIRED_KEYS = ("channel_names", "labels", "numTraining", "file_ending")


@dataclass(frozen=True)
class Problem:
    """One line of the verify table: the file concerned (relative to the dataset) and what is wrong."""

    file: str
    message: str
    severity: str = "defect"  # "defect" stops training; "warning" is reported only
    topic: str = ""  # for dataset.json: "json", "labels", "channels" or "missing:<key>"


@dataclass
class DatasetDescription:
    """What dataset.json says, parsed; ``problems`` lists what is missing or malformed in it."""

    path: Path
    class_names: list[str] | None = None
    channel_names: dict[str, str] | None = None
    num_training: int | None = None
    file_ending: str | None = None
    problems: list[Problem] = field(default_factory=list)


@dataclass(frozen=True)
class CaseFiles:
    name: str
    image: Path | None
    label: Path | None


@dataclass
class CaseData:
    """One case read and checked: (z, y, x) float32 image, its label (or None) and geometry."""

    name: str
    image: np.ndarray
    label: np.ndarray | None
    geometry: ImageGeometry


def relative(path: Path, root: Path) -> str:
    try:
        return path.relative_to(root).as_posix()
    except ValueError:
        return str(path)


def orientation_code(direction) -> str:
    """Three letters (DICOM convention, e.g. ``LPS``): where each voxel index axis (i, j, k) points."""
    return sitk.DICOMOrientImageFilter_GetOrientationFromDirectionCosines([float(v) for v in direction])


def plane_across(array_axis: int, direction) -> str:
    """The anatomical plane of slices taken across ``array_axis`` (0, 1, 2 of a (z, y, x) array)."""
    matrix = np.asarray(direction, dtype=np.float64).reshape(3, 3)
    column = matrix[:, 2 - array_axis]  # array axis 0 is the voxel index axis k (column 2)
    return PLANES[int(np.argmax(np.abs(column)))]


def _parse_labels(labels, path: str) -> tuple[list[str] | None, list[Problem]]:
    """Class names by value from nnU-Net v2 (``{"name": value}``) or MSD (``{"value": "name"}``) labels."""
    if not isinstance(labels, dict) or not labels:
        return None, [
            Problem(path, f"'labels' must be a non-empty mapping of class names to values, got {labels!r}")
        ]
    pairs: dict[int, str] = {}
    for key, value in labels.items():
        if isinstance(value, list):
            return None, [
                Problem(path, f"label '{key}' is a region ({value}); mpcl-train needs one value per class")
            ]
        if isinstance(value, int) and not isinstance(value, bool):
            number, name = value, str(key)
        elif str(key).lstrip("-").isdigit():
            number, name = int(key), str(value)
        else:
            return None, [Problem(path, f"label '{key}': {value!r} is not an integer class value")]
        if number in pairs:
            return None, [Problem(path, f"label value {number} is given twice ('{pairs[number]}', '{name}')")]
        pairs[number] = name
    problems = []
    if 0 not in pairs:
        problems.append(
            Problem(path, f"'labels' has no background class with value 0 (values {sorted(pairs)})")
        )
    elif sorted(pairs) != list(range(len(pairs))):
        problems.append(
            Problem(path, f"label values {sorted(pairs)} are not 0..{len(pairs) - 1} without gaps")
        )
    elif len(pairs) < 2:
        problems.append(Problem(path, "'labels' lists only the background; at least one class is needed"))
    if problems:
        return None, problems
    return [pairs[value] for value in range(len(pairs))], []


def read_dataset_json(root: Path) -> DatasetDescription:
    """Parse ``root/dataset.json``; every missing or malformed key becomes one Problem."""
    path = root / "dataset.json"
    description = DatasetDescription(path)
    problems = description.problems
    name = "dataset.json"
    if not path.is_file():
        problems.append(
            Problem(
                name, "missing; it must give channel_names, labels, numTraining and file_ending", topic="json"
            )
        )
        return description
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as error:
        problems.append(Problem(name, f"not valid JSON ({error})", topic="json"))
        return description
    if not isinstance(data, dict):
        problems.append(Problem(name, f"must be a JSON object, got {type(data).__name__}", topic="json"))
        return description
    for key in REQUIRED_KEYS:
        if key not in data:
            hint = (
                " (it has MSD's 'modality': rename it to 'channel_names')"
                if key == "channel_names" and "modality" in data
                else ""
            )
            problems.append(Problem(name, f"incomplete: no '{key}'{hint}", topic=f"missing:{key}"))
    channels = data.get("channel_names", data.get("modality"))
    if channels is not None:
        if (
            not isinstance(channels, dict)
            or not channels
            or set(channels) != {str(i) for i in range(len(channels))}
        ):
            problems.append(
                Problem(
                    name,
                    f"'channel_names' must map '0', '1', ... to modality names, got {channels!r}",
                    topic="channels",
                )
            )
        else:
            description.channel_names = {str(k): str(v) for k, v in channels.items()}
            if len(channels) > 1:
                problems.append(
                    Problem(
                        name,
                        f"lists {len(channels)} channels {list(channels.values())}; mpcl-train reads one "
                        "channel (<case>_0000) per case",
                        topic="channels",
                    )
                )
    if "labels" in data:
        description.class_names, label_problems = _parse_labels(data["labels"], name)
        problems.extend(Problem(p.file, p.message, topic="labels") for p in label_problems)
    if "numTraining" in data:
        value = data["numTraining"]
        if isinstance(value, bool) or not isinstance(value, int) or value < 0:
            problems.append(
                Problem(name, f"'numTraining' must be a whole number, got {value!r}", topic="numTraining")
            )
        else:
            description.num_training = value
    if "file_ending" in data:
        value = data["file_ending"]
        if not isinstance(value, str) or value.lower() not in IMAGE_SUFFIXES:
            problems.append(
                Problem(
                    name,
                    f"'file_ending' {value!r} is not one of {', '.join(IMAGE_SUFFIXES)}",
                    topic="file_ending",
                )
            )
        else:
            description.file_ending = value
    return description


def image_files(folder: Path, root: Path, file_ending: str | None) -> tuple[dict[str, Path], list[Problem]]:
    """Case name -> image file in ``folder`` (named as mpcl-train names them), and naming problems."""
    files: dict[str, Path] = {}
    problems = []
    if not folder.is_dir():
        return files, problems
    for path in sorted(folder.iterdir()):
        if path.name.startswith(".") or not path.is_file():
            continue
        if not path.name.lower().endswith(IMAGE_SUFFIXES):
            problems.append(Problem(relative(path, root), "not an image file; ignored", "warning"))
            continue
        if file_ending and not path.name.endswith(file_ending):
            problems.append(
                Problem(relative(path, root), f"does not end in dataset.json's file_ending '{file_ending}'")
            )
        case = case_name(path)
        if case in files:
            problems.append(
                Problem(
                    relative(path, root),
                    f"names the same case '{case}' as {files[case].name}; keep one of them",
                )
            )
            continue
        files[case] = path
    return files, problems


def _channel_hint(case: str) -> str:
    match = re.search(r"_(\d{4})$", case)
    if match and match.group(1) != "0000":
        return f" (if it is channel {int(match.group(1))} of a case: mpcl-train reads one channel per case)"
    return ""


def pair_cases(
    root: Path, images_dir: str, labels_dir: str, file_ending: str | None, labels_required: bool = True
) -> tuple[list[CaseFiles], list[Problem]]:
    """Images matched with labels. In the training set (``labels_required``) an unmatched image or label
    is a defect, since training would stop there; in a test set an unmatched label is a warning."""
    images, problems = image_files(root / images_dir, root, file_ending)
    labels, label_problems = image_files(root / labels_dir, root, file_ending)
    problems.extend(label_problems)
    ending = file_ending or ".nii.gz"
    cases = []
    for case in sorted(set(images) | set(labels)):
        image, label = images.get(case), labels.get(case)
        if image is None:
            problems.append(
                Problem(
                    relative(label, root),
                    f"label without an image (expected {images_dir}/{case}_0000{ending})",
                    "defect" if labels_required else "warning",
                )
            )
            continue
        if label is None and labels_required:
            problems.append(
                Problem(
                    relative(image, root),
                    f"image without a label (expected {labels_dir}/{case}{ending}){_channel_hint(case)}",
                )
            )
        cases.append(CaseFiles(case, image, label))
    return cases, problems


def _error_sentence(error: Exception, path: Path) -> str:
    text = str(error)
    prefix = f"{path}: "
    return text[len(prefix) :] if text.startswith(prefix) else text


def _spacing_problems(geometry: ImageGeometry, where: str) -> list[Problem]:
    spacing = np.asarray(geometry.spacing, dtype=np.float64)
    low, high = PLAUSIBLE_SPACING_MM
    if not np.all(np.isfinite(spacing)) or np.any(spacing <= 0):
        return [Problem(where, f"spacing {tuple(geometry.spacing)} is not positive and finite")]
    if np.any(spacing < low) or np.any(spacing > high):
        return [
            Problem(
                where,
                f"spacing {tuple(round(float(s), 6) for s in spacing)} mm is implausible (outside "
                f"{low}-{high:g} mm per voxel); check the header's units",
            )
        ]
    return []


def _size_text(shape_zyx) -> str:
    return "x".join(str(int(n)) for n in shape_zyx[::-1])


def _geometry_problems(
    label_geometry: ImageGeometry,
    label_shape,
    geometry: ImageGeometry,
    shape,
    where: str,
    image_name: str,
) -> list[Problem]:
    problems = []
    if tuple(label_shape) != tuple(shape):
        problems.append(
            Problem(
                where,
                f"size {_size_text(label_shape)} differs from its image {image_name} ({_size_text(shape)})",
            )
        )
    checks = (
        ("spacing", label_geometry.spacing, geometry.spacing, SPACING_TOLERANCE),
        ("origin", label_geometry.origin, geometry.origin, ORIGIN_TOLERANCE),
        ("direction", label_geometry.direction, geometry.direction, DIRECTION_TOLERANCE),
    )
    for name, mine, theirs, tolerance in checks:
        if len(mine) != len(theirs) or not np.allclose(mine, theirs, **tolerance):
            problems.append(
                Problem(
                    where,
                    f"{name} {tuple(round(float(v), 5) for v in mine)} differs from its image {image_name} "
                    f"({tuple(round(float(v), 5) for v in theirs)})",
                )
            )
    return problems


def read_checked(path: Path, root: Path) -> tuple[np.ndarray | None, ImageGeometry | None, list[Problem]]:
    """Read one file with :func:`mpcl.io.read_image` (truncated NIfTI, NaN, sheared directions caught
    there, in its sentences) and check voxels are finite and the spacing is plausible."""
    where = relative(path, root)
    try:
        array, geometry = read_image(path)
    except InputError as error:
        return None, None, [Problem(where, _error_sentence(error, path))]
    problems = []
    bad = int(array.size - np.count_nonzero(np.isfinite(array)))
    if bad:
        problems.append(Problem(where, f"{bad} voxel(s) are not finite (NaN or inf)"))
    problems.extend(_spacing_problems(geometry, where))
    return array, geometry, problems


def check_case(case: CaseFiles, root: Path, num_classes: int | None) -> tuple[CaseData | None, list[Problem]]:
    """Read a case's image and label and check them as mpcl-train would, plus plausibility checks.

    Returns the data only when there is no defect (so a fingerprint never sees broken numbers)."""
    image, geometry, problems = read_checked(case.image, root)
    label = None
    if case.label is not None:
        label, label_geometry, label_problems = read_checked(case.label, root)
        problems.extend(label_problems)
        where = relative(case.label, root)
        if label is not None and image is not None:
            problems.extend(
                _geometry_problems(
                    label_geometry, label.shape, geometry, image.shape, where, relative(case.image, root)
                )
            )
        if label is not None and not label_problems:
            read = label
            label = read.astype(np.int32)
            if not np.array_equal(label, read):
                fractional = np.unique(read[label != read])[:10].tolist()
                problems.append(Problem(where, f"label values {fractional} are not whole numbers"))
            elif num_classes is not None and (label.min() < 0 or label.max() >= num_classes):
                outside = np.unique(label[(label < 0) | (label >= num_classes)])[:10]
                problems.append(
                    Problem(
                        where,
                        f"label value(s) {[int(v) for v in outside]} outside dataset.json's classes "
                        f"0..{num_classes - 1}",
                    )
                )
    if problems or image is None:
        return None, problems
    if label is not None and num_classes is not None and num_classes <= 256:
        label = label.astype(np.uint8)
    return CaseData(case.name, image, label, geometry), problems
