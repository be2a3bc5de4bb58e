"""Small nnU-Net v2 raw datasets written by the planning tests themselves (a few 3D NIfTI cases)."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import SimpleITK as sitk

LABELS = {"background": 0, "heart": 1, "liver": 2}
IDENTITY = (1.0, 0.0, 0.0, 0.0, 1.0, 0.0, 0.0, 0.0, 1.0)
# Voxel index axis i (array axis x) points head-foot: slices across array x are axial.
I_ALONG_SI = (0.0, 0.0, 1.0, 0.0, 1.0, 0.0, 1.0, 0.0, 0.0)


@dataclass
class Case:
    name: str
    image: np.ndarray  # (z, y, x)
    label: np.ndarray  # (z, y, x)
    spacing: tuple[float, float, float]  # (x, y, z)
    direction: tuple[float, ...] = IDENTITY
    origin: tuple[float, float, float] = (0.0, 0.0, 0.0)
    extra: dict = field(default_factory=dict)


def write_volume(array, path: Path, spacing, direction=IDENTITY, origin=(0.0, 0.0, 0.0)) -> Path:
    image = sitk.GetImageFromArray(np.ascontiguousarray(array))
    image.SetSpacing(tuple(float(s) for s in spacing))
    image.SetDirection(tuple(float(d) for d in direction))
    image.SetOrigin(tuple(float(o) for o in origin))
    path.parent.mkdir(parents=True, exist_ok=True)
    sitk.WriteImage(image, str(path))
    return path


def mr_case(name: str, shape_zyx, spacing_xyz, seed: int = 0, direction=IDENTITY) -> Case:
    """Positive noise (no zero voxel, so nothing to crop), class 1 and 2 in known boxes."""
    rng = np.random.default_rng(seed)
    image = rng.normal(300.0, 20.0, size=shape_zyx).astype(np.float32)
    label = np.zeros(shape_zyx, np.uint8)
    label[:2, 2:6, 2:7] = 1  # 2*4*5 = 40 voxels
    label[-1, -3:, -2:] = 2  # 1*3*2 = 6 voxels
    return Case(name, image, label, spacing_xyz, direction)


def write_dataset(
    root: Path,
    cases: list[Case],
    channel_names: dict | None = None,
    labels: dict | None = None,
    dataset_json: dict | None = None,
) -> Path:
    for case in cases:
        write_volume(
            case.image,
            root / "imagesTr" / f"{case.name}_0000.nii.gz",
            case.spacing,
            case.direction,
            case.origin,
        )
        write_volume(
            case.label, root / "labelsTr" / f"{case.name}.nii.gz", case.spacing, case.direction, case.origin
        )
    description = {
        "name": root.name,
        "channel_names": channel_names or {"0": "MRI"},
        "labels": labels or LABELS,
        "numTraining": len(cases),
        "file_ending": ".nii.gz",
    }
    if dataset_json is not None:
        description = dataset_json
    root.mkdir(parents=True, exist_ok=True)
    (root / "dataset.json").write_text(json.dumps(description), encoding="utf-8")
    return root


# Anisotropic MR: thick z slices, one case at another in-plane spacing, one with a zero border.
MR_SHAPES = [(6, 40, 50), (7, 44, 48), (5, 40, 52), (6, 36, 40)]
MR_SPACINGS = [(0.8, 0.8, 4.0), (0.8, 0.8, 4.0), (0.8, 0.8, 4.5), (0.9, 0.9, 5.0)]


def mr_dataset(root: Path) -> tuple[Path, list[Case]]:
    cases = [
        mr_case(f"case_{i:03d}", shape, spacing, seed=i)
        for i, (shape, spacing) in enumerate(zip(MR_SHAPES, MR_SPACINGS, strict=True))
    ]
    # case_002: zero outside z 1..4, y 2..37, x 3..44 (the non-zero box to crop to)
    border = np.zeros_like(cases[2].image)
    border[1:5, 2:38, 3:45] = 1
    cases[2].image *= border
    return write_dataset(root, cases), cases


def ct_dataset(root: Path) -> tuple[Path, list[Case]]:
    """CT-like: air at -1000 (non-zero, nothing cropped), foreground intensities known exactly."""
    cases = []
    for i in range(3):
        shape = (4, 30, 30)
        rng = np.random.default_rng(10 + i)
        image = np.full(shape, -1000.0, np.float32)
        label = np.zeros(shape, np.uint8)
        label[1:3, 5:25, 5:25] = 1  # 800 voxels
        label[3, 10:14, 10:14] = 2  # 16 voxels
        foreground = label > 0
        image[foreground] = rng.normal(40.0 + 20 * i, 15.0, size=int(foreground.sum())).astype(np.float32)
        image[1, 5, 5] = 3000.0  # one bright outlier the clip removes
        cases.append(Case(f"ct_{i:03d}", image, label, (0.7, 0.7, 2.5)))
    return write_dataset(root, cases, channel_names={"0": "CT"}), cases


def train_slim(config: dict, config_path: Path, output_dir: Path, iterations: int):
    """Train a config ``mpcl-plan --config-out`` wrote for ``iterations`` steps with a slim network and
    batches of 2 (seconds on one thread); returns the CliRunner result."""
    import yaml
    from click.testing import CliRunner

    from mpcl.training.cli import train_main

    config["model"] = {"channels": [4, 8, 8, 16, 16]}
    config["output_dir"] = str(output_dir)
    config["train"].update(
        iterations=iterations,
        val_every=iterations,
        checkpoint_every=iterations,
        labeled_batch=2,
        unlabeled_batch=2,
        device="cpu",
        num_threads=1,
    )
    config_path.write_text(yaml.safe_dump(config))
    return CliRunner().invoke(train_main, ["--config", str(config_path), "--no-progress"])
