"""MPCL runtime: reading images, preprocessing shared with training, model packages and the Segmenter.

This package must import with numpy, SimpleITK, nibabel, onnxruntime and click only: no torch here.
``import mpcl`` does no work: the Segmenter and model-package helpers are imported on first use, and a
backend's library (onnxruntime, torch, TensorRT) only when a Segmenter is built on it.
"""

__version__ = "0.1.0"

from mpcl.errors import Cancelled, ConfigError, InputError, ModelPackageError, MPCLError

_LAZY = {
    "Segmenter": "mpcl.segmenter",
    "SegmentationResult": "mpcl.segmenter",
    "ModelPackage": "mpcl.model_package",
    "ClassLabel": "mpcl.model_package",
    "load_model_package": "mpcl.model_package",
}

__all__ = [
    "__version__",
    "Cancelled",
    "ConfigError",
    "InputError",
    "ModelPackageError",
    "MPCLError",
    *_LAZY,
]


def __getattr__(name: str):
    if name in _LAZY:
        import importlib

        value = getattr(importlib.import_module(_LAZY[name]), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'mpcl' has no attribute {name!r}")


def __dir__():
    return sorted(set(globals()) | set(_LAZY))
