"""A small own-data example: the cardiac phantom written as an nnU-Net v2 raw dataset at mixed resolutions.

A user trying ``mpcl-plan`` needs a dataset whose geometry varies the way real own data does; ACDC does
not (one layout, no spacing stored). Every case here shows the same 192 mm field of view at one of several
in-plane spacings, inside a zero-filled border of its own width (scanners with other fields of view), so
whole-slice zooming sees the heart at a different scale in every case and the plan's crop and target
spacing have something to fix. ``mpcl-plan --write-example``, the tests and ``benchmarks/own_data_plan.py``
all write it with :func:`write_phantom_raw_dataset`.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from mpcl.errors import InputError
from mpcl.io import ImageGeometry, check_writable_folder, write_atomically, write_image
from mpcl.training.data.phantom import CLASS_NAMES, PhantomSpec, make_phantom_volume

FIELD_OF_VIEW_MM = 192.0
THROUGH_PLANE_MM = 8.0
SLICES = 8
# (in-plane spacing mm, zero border as a fraction of the matrix on each side)
TRAIN_CASES: tuple[tuple[float, float], ...] = (
    (1.0, 0.0),
    (1.5, 0.25),
    (2.0, 0.5),
    (1.0, 0.4),
    (1.5, 0.0),
    (2.0, 0.1),
    (1.25, 0.3),
    (1.75, 0.15),
    (1.25, 0.0),
    (1.5, 0.45),
)
TEST_CASES: tuple[tuple[float, float], ...] = ((0.8, 0.2), (2.4, 0.0), (1.2, 0.6), (1.6, 0.35))


def phantom_case(
    seed: int, spacing: float, border: float, slices: int = SLICES
) -> tuple[np.ndarray, np.ndarray]:
    """One phantom volume at ``spacing`` mm in-plane (matrix = field of view / spacing) with a zero border
    of ``border`` times the matrix on each side; MR-like raw intensities (strictly positive inside)."""
    matrix = int(round(FIELD_OF_VIEW_MM / spacing))
    spec = PhantomSpec(
        size=(matrix, matrix), slices_per_volume=slices, spacing=(spacing, spacing, THROUGH_PLANE_MM)
    )
    volume, _ = make_phantom_volume(seed, spec)
    pad = int(round(border * matrix))
    image = np.pad(volume.image * 1000.0 + 20.0, ((0, 0), (pad, pad), (pad, pad)))
    label = np.pad(volume.label, ((0, 0), (pad, pad), (pad, pad)))
    return image.astype(np.float32), label.astype(np.uint8)


def write_phantom_raw_dataset(
    root: str | Path,
    seed: int = 1,
    train_cases: Sequence[tuple[float, float]] = TRAIN_CASES,
    test_cases: Sequence[tuple[float, float]] = TEST_CASES,
    slices: int = SLICES,
) -> Path:
    """Write imagesTr/labelsTr (``train_cases``), imagesTs/labelsTs (``test_cases``) and dataset.json
    under ``root``, which must be absent or empty (an existing dataset is never overwritten)."""
    root = Path(root)
    if root.exists() and (not root.is_dir() or any(root.iterdir())):
        raise InputError(f"{root}: exists and is not an empty folder; choose a new folder for the example")
    root.mkdir(parents=True, exist_ok=True)
    check_writable_folder(root)
    for split, cases, offset in (("Tr", train_cases, 0), ("Ts", test_cases, 100)):
        for index, (spacing, border) in enumerate(cases):
            image, label = phantom_case(seed * 1000 + offset + index, spacing, border, slices)
            geometry = ImageGeometry(
                spacing=(spacing, spacing, THROUGH_PLANE_MM),
                origin=(-FIELD_OF_VIEW_MM / 2, -FIELD_OF_VIEW_MM / 2, 0.0),
            )
            name = f"phantom_{offset + index:03d}"
            for folder, array, file in (
                ("images", image, f"{name}_0000.nii.gz"),
                ("labels", label, f"{name}.nii.gz"),
            ):
                (root / f"{folder}{split}").mkdir(exist_ok=True)
                write_image(array, geometry, root / f"{folder}{split}" / file)
    description = {
        "name": root.name,
        "channel_names": {"0": "MRI"},
        "labels": {name: value for value, name in enumerate(CLASS_NAMES)},
        "numTraining": len(train_cases),
        "file_ending": ".nii.gz",
    }
    text = json.dumps(description, indent=2) + "\n"
    write_atomically(root / "dataset.json", lambda temporary: temporary.write_text(text, encoding="utf-8"))
    return root
