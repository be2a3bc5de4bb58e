"""A sample volume whose correct segmentation is known, and the tiny model package that finds it; a
cardiac phantom for the bundled sample model.

The shipped test model (``Resources/TestModel``) is a valid mpcl model package whose ONNX network
scores each pixel by its distance to one intensity per class (logit_c = -s (x - mu_c)^2), with no
intensity normalisation and a patch equal to the sample's in-plane size (so no resizing happens). On
:func:`sample_volume` it must therefore return exactly :func:`sample_volume`'s expected labels: the
module self-test (in Slicer) and CI (on slicer-core) check segment names and voxel counts against
numbers that do not come from the runtime itself. Pure numpy, except :func:`write_test_model`
(needs ``onnx`` and ``mpcl``; used to regenerate the shipped files).
"""

from __future__ import annotations

import math
import os
from pathlib import Path

import numpy as np

from .geometry import ijk_to_ras_from_lps

CLASS_NAMES = ("background", "left ventricle", "myocardium", "right ventricle")
CLASS_INTENSITIES = (0.0, 100.0, 200.0, 300.0)
CLASS_COLORS = {
    "left ventricle": (216, 101, 79),
    "myocardium": (128, 174, 128),
    "right ventricle": (111, 184, 210),
}
LOGIT_SCALE = 1e-3
NOISE = 30.0  # well below half the distance between class intensities: the nearest class is the truth
SAMPLE_SHAPE = (5, 24, 32)  # (k, j, i); the coarsest spacing is along k, so the network sees (24, 32)
SAMPLE_SPACING = (0.7, 0.9, 4.0)  # (x, y, z) mm: anisotropic, thick slices
SAMPLE_ORIGIN = (12.5, -30.25, 47.0)  # LPS mm
TEST_MODEL_NAME = "MPCL Slicer test model"


def oblique_direction() -> tuple[float, ...]:
    """A rotation with no zero entry (LPS, row-major), so no voxel axis is aligned with the world."""
    a, b, c = math.radians(20.0), math.radians(-35.0), math.radians(10.0)
    rx = np.array([[1, 0, 0], [0, math.cos(a), -math.sin(a)], [0, math.sin(a), math.cos(a)]])
    ry = np.array([[math.cos(b), 0, math.sin(b)], [0, 1, 0], [-math.sin(b), 0, math.cos(b)]])
    rz = np.array([[math.cos(c), -math.sin(c), 0], [math.sin(c), math.cos(c), 0], [0, 0, 1]])
    return tuple(float(v) for v in (rz @ ry @ rx).ravel())


def sample_labels() -> np.ndarray:
    """The (k, j, i) ground truth: a disc (1) inside a ring (2) and a box beside them (3), per slice."""
    nz, ny, nx = SAMPLE_SHAPE
    j, i = np.meshgrid(np.arange(ny), np.arange(nx), indexing="ij")
    labels = np.zeros(SAMPLE_SHAPE, np.uint8)
    for k in range(nz):
        radius = np.hypot(j - 12.0, i - 12.0)
        inner = 3.0 + 0.5 * k
        labels[k][radius <= inner] = 1
        labels[k][(radius > inner) & (radius <= inner + 2.5)] = 2
        labels[k, 4 + k : 14 + k, 22:29] = 3
    return labels


def sample_volume(seed: int = 0) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(intensities int16 (k, j, i), IJK-to-RAS 4x4, expected labels uint8 (k, j, i))."""
    labels = sample_labels()
    rng = np.random.default_rng(seed)
    intensities = np.asarray(CLASS_INTENSITIES)[labels] + rng.uniform(-NOISE, NOISE, labels.shape)
    ijk_to_ras = ijk_to_ras_from_lps(SAMPLE_SPACING, SAMPLE_ORIGIN, oblique_direction())
    return np.round(intensities).astype(np.int16), ijk_to_ras, labels


# A short-axis cardiac cine MRI look-alike for the bundled sample model (Resources/SampleModel): ACDC's
# in-plane size and spacing, thick slices, the LV blood pool as a bright disc in a dark myocardial ring,
# the RV as a bright crescent beside it, a bright fat rim around the body (as ACDC intensities: 0-1).
PHANTOM_SHAPE = (6, 256, 216)  # (k, j, i)
PHANTOM_SPACING = (1.5, 1.5, 10.0)  # (x, y, z) mm
PHANTOM_ORIGIN = (-160.0, -190.0, 35.0)  # LPS mm
PHANTOM_CLASS_NAMES = ("background", "RV", "myocardium", "LV")  # the ACDC labels 0-3


def cardiac_phantom(seed: int = 0) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(intensities int16 (k, j, i) 0-1000, IJK-to-RAS 4x4 (oblique), labels uint8 (k, j, i): 1 RV,
    2 myocardium, 3 LV). The LV shrinks from base to apex; no ACDC data is used."""
    nz, ny, nx = PHANTOM_SHAPE
    j, i = np.meshgrid(np.arange(ny), np.arange(nx), indexing="ij")
    body = ((j - 128.0) / 105.0) ** 2 + ((i - 108.0) / 95.0) ** 2
    from_lv = np.hypot(j - 120.0, i - 100.0)
    from_rv = np.hypot((j - 128.0) / 1.2, i - 66.0)
    image = np.zeros(PHANTOM_SHAPE, np.float32)
    labels = np.zeros(PHANTOM_SHAPE, np.uint8)
    for k in range(nz):
        radius = 20.0 - 1.5 * k  # the LV cavity, in voxels
        labels[k][(from_rv <= radius + 6.0) & (from_lv > radius + 9.0)] = 1
        labels[k][(from_lv > radius) & (from_lv <= radius + 7.0)] = 2
        labels[k][from_lv <= radius] = 3
        image[k] = np.where(body <= 1.0, 0.9, 0.02)  # the fat rim, the air outside
        image[k][body <= 0.85] = 0.18
        image[k][labels[k] > 0] = np.asarray([0.0, 0.42, 0.12, 0.45], np.float32)[labels[k][labels[k] > 0]]
    image += np.random.default_rng(seed).normal(0.0, 0.02, PHANTOM_SHAPE).astype(np.float32)
    intensities = np.round(np.clip(image, 0.0, 1.0) * 1000.0).astype(np.int16)
    return intensities, ijk_to_ras_from_lps(PHANTOM_SPACING, PHANTOM_ORIGIN, oblique_direction()), labels


def default_test_model() -> Path:
    """The shipped test model package (``Resources/TestModel`` next to this package)."""
    return Path(__file__).resolve().parent.parent / "Resources" / "TestModel"


def write_test_model(folder: str | os.PathLike) -> Path:
    """Write the nearest-intensity test model package into ``folder`` (needs onnx and mpcl)."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    import mpcl
    from mpcl.model_package import build_model_json, sha256_of, write_model_json

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    count = len(CLASS_NAMES)
    centres = np.asarray(CLASS_INTENSITIES, np.float32).reshape(1, count, 1, 1)
    graph = helper.make_graph(
        [
            helper.make_node("Sub", ["image", "centres"], ["difference"]),
            helper.make_node("Mul", ["difference", "difference"], ["squared"]),
            helper.make_node("Mul", ["squared", "negative_scale"], ["logits"]),
        ],
        "nearest_intensity",
        [helper.make_tensor_value_info("image", TensorProto.FLOAT, ["batch", 1, "height", "width"])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["batch", count, "height", "width"])],
        initializer=[
            numpy_helper.from_array(centres, "centres"),
            numpy_helper.from_array(np.asarray(-LOGIT_SCALE, np.float32), "negative_scale"),
        ],
    )
    model = helper.make_model(
        graph, opset_imports=[helper.make_opsetid("", 13)], producer_name="MPCLSegmentation test data"
    )
    model.ir_version = 7  # readable by every onnxruntime from 1.8 on
    onnx.checker.check_model(model)
    onnx.save(model, str(folder / "model.onnx"))
    metadata = {
        "class_names": list(CLASS_NAMES),
        "normalization": {"scheme": "none"},
        "patch_size": [SAMPLE_SHAPE[1], SAMPLE_SHAPE[2]],
        "method": "nearest-intensity (test data)",
        "in_channels": 1,
        "mpcl_version": mpcl.__version__,
        "network": {"architecture": "nearest-intensity", "class_intensities": list(CLASS_INTENSITIES)},
    }
    files = {"onnx": {"path": "model.onnx", "sha256": sha256_of(folder / "model.onnx")}}
    write_model_json(folder, build_model_json(metadata, files, name=TEST_MODEL_NAME, colors=CLASS_COLORS))
    return folder


if __name__ == "__main__":  # regenerate the shipped files: python -m MPCLSegmentationLib.testdata
    print(write_test_model(default_test_model()))
