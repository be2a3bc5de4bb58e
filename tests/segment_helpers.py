"""Small builders shared by the runtime tests: a tiny model package and oblique, anisotropic scans."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import SimpleITK as sitk

from mpcl.io import ImageGeometry

CLASS_NAMES = ["background", "RV", "myocardium", "LV"]
TINY_CHANNELS = [4, 8, 8, 16, 16]
PATCH = [32, 32]


def auto_cpu_backend() -> str:
    """What ``backend="auto"`` picks on a CPU: OpenVINO where its optional extra is installed."""
    from mpcl.backends import module_available

    return "openvino" if module_available("openvino") else "onnxruntime"


def oblique_direction() -> tuple[float, ...]:
    """A proper rotation with no zero entries, so no axis of the grid is aligned with the world."""
    a, b, c = math.radians(25), math.radians(-40), math.radians(15)
    rx = np.array([[1, 0, 0], [0, math.cos(a), -math.sin(a)], [0, math.sin(a), math.cos(a)]])
    ry = np.array([[math.cos(b), 0, math.sin(b)], [0, 1, 0], [-math.sin(b), 0, math.cos(b)]])
    rz = np.array([[math.cos(c), -math.sin(c), 0], [math.sin(c), math.cos(c), 0], [0, 0, 1]])
    return tuple(float(v) for v in (rz @ ry @ rx).ravel())


# Anisotropic, thick slices along z (the usual cine-MRI case); size (x, y, z) = (48, 40, 6).
GEOMETRY = ImageGeometry(spacing=(0.8, 0.9, 6.5), origin=(-20.5, 14.25, 33.0), direction=oblique_direction())


def make_checkpoint(
    path: Path, seed: int = 0, normalization: dict | None = None, class_names=None, resize: str = "linear"
) -> Path:
    """A training-format checkpoint of a tiny, randomly initialised U-Net (BN statistics made non-trivial)."""
    import torch

    from mpcl.nn.checkpoint import build_metadata, save_checkpoint
    from mpcl.nn.unet import UNet

    names = list(class_names or CLASS_NAMES)
    config = {
        "data": {"patch_size": list(PATCH)},
        "model": {"channels": list(TINY_CHANNELS)},
        "evaluation": {"resize": resize},
    }
    metadata = build_metadata(config, names, normalization or {"scheme": "zscore"}, "mean_teacher")
    torch.manual_seed(seed)
    model = UNet(1, len(names), TINY_CHANNELS)
    with torch.no_grad():  # random running statistics, so eval-mode BN is not the identity
        for module in model.modules():
            if isinstance(module, torch.nn.BatchNorm2d):
                module.running_mean.uniform_(-0.2, 0.2)
                module.running_var.uniform_(0.5, 1.5)
    state = {"iteration": 7, "student": model.state_dict(), "metadata": metadata, "config": config}
    return save_checkpoint(path, state)


def make_package(folder: Path, **package_options) -> Path:
    from mpcl.export.pipeline import write_model_package

    checkpoint = make_checkpoint(folder / "best.pt")
    write_model_package(checkpoint, folder / "model", **package_options)
    return folder / "model"


def phantom_volume(shape=(6, 40, 48), seed: int = 0) -> np.ndarray:
    """A (z, y, x) MR-like volume: bright ring and blobs on noise, raw intensities (not normalised)."""
    rng = np.random.default_rng(seed)
    z, y, x = np.meshgrid(*(np.arange(n, dtype=np.float32) for n in shape), indexing="ij")
    cy, cx = shape[1] / 2, shape[2] / 2
    radius = np.hypot(y - cy, x - cx)
    image = 200 + 30 * rng.standard_normal(shape)
    image += 400 * ((radius > 6) & (radius < 10)) + 250 * (radius <= 6) + 20 * z
    return image.astype(np.float32)


def sitk_image(array: np.ndarray, geometry: ImageGeometry = GEOMETRY) -> sitk.Image:
    return geometry.apply_to(sitk.GetImageFromArray(array))


def write_dicom_series(
    array: np.ndarray, geometry: ImageGeometry, folder: Path, series_uid: str, description: str = "cine"
) -> None:
    """Write (z, y, x) int16 data as one DICOM file per slice with position/orientation tags."""
    folder.mkdir(parents=True, exist_ok=True)
    image = sitk_image(array.astype(np.int16), geometry)
    d = geometry.direction
    orientation = "\\".join(f"{v:.10g}" for v in (d[0], d[3], d[6], d[1], d[4], d[7]))
    writer = sitk.ImageFileWriter()
    writer.KeepOriginalImageUIDOn()
    for index in range(image.GetDepth()):
        plane = image[:, :, index]
        position = "\\".join(f"{v:.10g}" for v in image.TransformIndexToPhysicalPoint((0, 0, index)))
        tags = {
            "0008|0016": "1.2.840.10008.5.1.4.1.1.4",
            "0008|0018": f"{series_uid}.{index + 1}",
            "0008|0060": "MR",
            "0008|103e": description,
            "0010|0020": "TEST",
            "0020|000d": "1.2.826.0.1.3680043.2.1125.1",
            "0020|000e": series_uid,
            "0020|0013": str(index + 1),
            "0020|0032": position,
            "0020|0037": orientation,
            "0018|0050": f"{geometry.spacing[2]:.10g}",
        }
        for key, value in tags.items():
            plane.SetMetaData(key, value)
        writer.SetFileName(str(folder / f"{series_uid[-4:]}_{index:03d}.dcm"))
        writer.Execute(plane)


def reference_prediction(model, normalized: np.ndarray, spacing, patch, resize: str = "linear"):
    """What training evaluation computed before it shared the inference core, written out plainly: per
    slice along the thickest axis, resize to the patch, torch softmax there, then ``linear``: the
    probabilities resized back (bilinear) and their argmax; ``nearest``: the argmax zoomed back (order 0).
    Returns (labels, probabilities or None), both on the volume's grid."""
    import torch

    from mpcl.preprocessing import resize_2d, through_plane_axis, zoom_nearest

    axis = through_plane_axis(spacing)
    slices = np.moveaxis(normalized, axis, 0)
    to_patch = resize_2d(slices, patch, order=1) if resize == "linear" else zoom_nearest(slices, patch)
    model.eval()
    with torch.no_grad():
        probabilities = torch.softmax(model(torch.from_numpy(np.ascontiguousarray(to_patch[:, None]))), 1)
    probabilities = probabilities.numpy()
    if resize == "nearest":
        labels = zoom_nearest(probabilities.argmax(1).astype(np.uint8), slices.shape[1:])
        return np.moveaxis(labels, 0, axis), None
    back = resize_2d(probabilities, slices.shape[1:], order=1)  # (D, C, H, W) along the slicing axis
    volume_probabilities = np.moveaxis(np.moveaxis(back, 1, 0), 1, axis + 1)
    return volume_probabilities.argmax(0).astype(np.uint8), volume_probabilities
