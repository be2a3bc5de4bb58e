"""ACDC in the SSL4MIS h5 layout (see shared/data/acdc/README.md).

Labelled = the first N lines of ``train_slices.list`` in file order (3 patients = 68 slices, 7 = 136);
every other training slice is unlabelled and its label is never read. Validation and test volumes are
read lazily, one at a time, so a training run does not hold the test set in memory.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import h5py
import numpy as np

from mpcl.errors import InputError
from mpcl.training.config_schema import ACDC_PATIENTS_TO_SLICES, DataConfig
from mpcl.training.data.base import SegmentationData, Slice2D, Volume

ACDC_CLASS_NAMES = ["background", "RV", "myocardium", "LV"]


def read_list(path: Path) -> list[str]:
    if not path.is_file():
        raise InputError(f"{path}: list file does not exist (is data.root the ACDC folder?)")
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError:
        raise InputError(f"{path}: list file is not UTF-8 text") from None
    return [line.strip() for line in text.splitlines() if line.strip()]


def read_h5_case(
    path: Path, num_classes: int, ndim: int, with_label: bool
) -> tuple[np.ndarray, np.ndarray | None]:
    """Read ``image`` (and ``label``) from one h5 file, checking keys, shapes and label range."""
    if not path.is_file():
        raise InputError(f"{path}: file named in the split list does not exist")
    try:
        with h5py.File(path, "r") as handle:
            keys = set(handle.keys())
            needed = {"image", "label"} if with_label else {"image"}
            missing = sorted(needed - keys)
            if missing:
                raise InputError(f"{path}: missing key(s) {missing}; found {sorted(keys)}")
            image = np.asarray(handle["image"][()], dtype=np.float32)
            label = np.asarray(handle["label"][()]) if with_label else None
    except OSError as error:
        raise InputError(f"{path}: not a readable HDF5 file ({error})") from None
    if image.ndim != ndim:
        raise InputError(f"{path}: 'image' has shape {image.shape}; expected {ndim} dimensions")
    if not np.all(np.isfinite(image)):
        raise InputError(f"{path}: 'image' contains NaN or infinite values")
    if label is not None:
        if label.shape != image.shape:
            raise InputError(f"{path}: 'label' shape {label.shape} differs from 'image' shape {image.shape}")
        if np.any(label != np.round(label)):
            raise InputError(
                f"{path}: 'label' holds non-integer values; expected class indices 0..{num_classes - 1}"
            )
        if label.size and (label.min() < 0 or label.max() >= num_classes):
            raise InputError(
                f"{path}: label values {sorted(np.unique(label).tolist())} "
                f"outside the class range 0..{num_classes - 1}"
            )
        label = label.astype(np.uint8)
    return image, label


class LazyVolumes(Sequence):
    """Volumes named in a list file, read from disk when indexed."""

    def __init__(self, root: Path, names: list[str], num_classes: int) -> None:
        self.paths = [root / "data" / f"{name}.h5" for name in names]
        self.num_classes = num_classes
        for path in self.paths:
            if not path.is_file():
                raise InputError(f"{path}: volume named in the split list does not exist")

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, index):  # type: ignore[override]
        if isinstance(index, slice):
            return [self[i] for i in range(*index.indices(len(self)))]
        path = self.paths[index]
        image, label = read_h5_case(path, self.num_classes, ndim=3, with_label=True)
        return Volume(name=path.stem, image=image, label=label)


def labeled_slice_count(config: DataConfig) -> int:
    if config.labeled_slices is not None:
        return config.labeled_slices
    if config.labeled_patients is not None:
        return ACDC_PATIENTS_TO_SLICES[config.labeled_patients]
    return ACDC_PATIENTS_TO_SLICES[3]


def load_acdc(config: DataConfig) -> SegmentationData:
    root = Path(config.root or "")
    if not root.is_dir():
        raise InputError(f"{root}: ACDC data root does not exist (set data.root or pass --data-root)")
    class_names = list(config.class_names or ACDC_CLASS_NAMES)
    names = read_list(root / "train_slices.list")
    n_labeled = labeled_slice_count(config)
    if not 0 < n_labeled <= len(names):
        raise InputError(
            f"{root / 'train_slices.list'}: asked for {n_labeled} labelled slices, list has {len(names)}"
        )
    slices_dir = root / "data" / "slices"
    labeled, unlabeled = [], []
    for position, name in enumerate(names):
        is_labeled = position < n_labeled
        image, label = read_h5_case(
            slices_dir / f"{name}.h5", len(class_names), ndim=2, with_label=is_labeled
        )
        (labeled if is_labeled else unlabeled).append(Slice2D(name, image, label))
    val = LazyVolumes(root, read_list(root / "val.list"), len(class_names))
    test = LazyVolumes(root, read_list(root / "test.list"), len(class_names))
    return SegmentationData(labeled, unlabeled, val, test, class_names, {"scheme": "minmax"})
